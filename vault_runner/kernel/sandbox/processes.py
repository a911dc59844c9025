"""The kernel's processes as /proc shows them: the tree, its memory, a watchdog, kills.

Also the launcher's command line (launch.py, run by path) and the quiet subprocess runner
the probes use to try it (a child that must not hang or print).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from vault_runner.kernel.sandbox import launch

__all__ = (
    "WATCH_INTERVAL",
    "MemoryWatchdog",
    "kill_pid",
    "launcher_command",
    "launcher_runs",
    "process_memory",
    "process_tree",
    "resident_memory",
    "resident_size",
    "run_quiet",
    "succeeded",
    "user_tasks",
)

WATCH_INTERVAL = 0.1  # seconds between two looks at the kernel's memory


def run_quiet(argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None


def succeeded(done: subprocess.CompletedProcess[str] | None) -> bool:
    return done is not None and done.returncode == 0


def launcher_command() -> list[str]:
    """The launcher, run as a script by path: isolated (-I) and without site (-S), to start fast."""
    return [sys.executable, "-I", "-S", launch.__file__]


def launcher_runs(spec: dict[str, Any]) -> bool:
    """Whether the launcher can apply `spec` here: tried for real on an empty Python."""
    return succeeded(run_quiet([*launcher_command(), json.dumps(spec), "--", sys.executable, "-I", "-S", "-c", ""]))


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def process_tree(root: int) -> list[int]:
    """root and its descendants, from /proc (children files, else a scan of every ppid)."""
    found = [root]
    try:
        index = 0
        while index < len(found):
            pid = found[index]
            index += 1
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    found.extend(int(c) for c in handle.read().split())
        return found
    except FileNotFoundError:
        return found  # the process is gone, or /proc has no children files
    except OSError:
        pass
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, index = [root], 0
    while index < len(found):
        found.extend(parents.get(found[index], []))
        index += 1
    return found


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_memory(pid: int) -> int:
    """Memory a process holds that only exits or a kill gives back: its proportional share
    of anonymous and shared-memory pages. Proportional, so 40 forks of a 1 GB kernel that
    share their pages copy-on-write count about 1 GB, not 40; mapped library files, which
    the system can drop at will, do not count."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            fields = dict(line.split(":", 1) for line in handle.read().splitlines()[1:] if ":" in line)
        if "Pss_Anon" in fields:
            return (int(fields["Pss_Anon"].split()[0]) + int(fields.get("Pss_Shmem", "0 kB").split()[0])) * 1024
        return int(fields["Pss"].split()[0]) * 1024
    except (OSError, ValueError, KeyError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def resident_size(pids: Iterable[int]) -> int:
    """Upper bound of `resident_memory`: plain resident pages, shared ones counted per process."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as handle:
                total += int(handle.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def resident_memory(pids: Iterable[int]) -> int:
    return sum(process_memory(pid) for pid in pids)


class MemoryWatchdog(threading.Thread):
    """Kills a kernel whose processes together hold more resident memory than the cap."""

    def __init__(
        self,
        limit: int,
        pids: Callable[[], list[int]],
        kill: Callable[[], None],
        extra: Callable[[list[int]], int] = lambda pids: 0,
    ) -> None:
        super().__init__(name="vault-runner-memory-watchdog", daemon=True)
        self.limit = limit
        self.pids = pids
        self.kill = kill
        self.extra = extra  # memory held outside the processes (the sandbox's tmpfs files)
        self.peak = 0
        self.tripped: int | None = None  # the resident size that tripped it, until taken
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(WATCH_INTERVAL):
            pids = self.pids()
            if not pids:
                continue
            # Resident size from statm is cheap; the proportional count (smaps_rollup) walks
            # page tables under the kernel's mm lock and slows it down (import torch took
            # 0.2 s longer polled every 0.1 s), so it is only taken near the limit.
            extra = self.extra(pids)
            used = resident_size(pids) + extra
            if used > self.limit:
                used = resident_memory(pids) + extra
            self.peak = max(self.peak, used)
            if used > self.limit:
                self.tripped = used
                self.kill()

    def stop(self) -> None:
        self._stop_event.set()


def user_tasks() -> int:
    """Threads this uid already runs: RLIMIT_NPROC counts them all outside a user namespace."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                count += len(os.listdir(f"/proc/{entry}/task"))
        except OSError:
            continue
    return count
