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
import time
from collections.abc import Callable, Iterable
from typing import Any

from vault_runner.kernel.sandbox import launch

__all__ = (
    "RELEASE_GRACE",
    "WATCH_INTERVAL",
    "MemoryBudget",
    "MemoryWatchdog",
    "kill_pid",
    "launcher_command",
    "launcher_runs",
    "memory_budget",
    "process_memory",
    "process_start",
    "process_tree",
    "signal_process",
    "wrapped_process",
    "resident_memory",
    "resident_size",
    "run_quiet",
    "succeeded",
    "user_tasks",
)

WATCH_INTERVAL = 0.1  # seconds between two looks at the kernel's memory
RELEASE_GRACE = 1.0  # seconds a killed kernel is given to free its memory before another is stopped


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


def process_start(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, who it is, since a
    pid is reused once its process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def wrapped_process(root: int, wrapper: str) -> tuple[int, int] | None:
    """(pid, start) of the first process under `root` that is not the `wrapper` program
    (bubblewrap and its pid-namespace init): the command it wraps, as pids are on the host."""
    wrapper = os.path.realpath(wrapper)
    for pid in process_tree(root):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        start = process_start(pid)
        if os.path.realpath(exe) != wrapper and start is not None:
            return pid, start
    return None


def signal_process(pid: int, start: int, signum: int) -> bool:
    """Send `signum` to the process `pid` if it is still the one that started at `start`."""
    if process_start(pid) != start:
        return False
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


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


class MemoryWatchdog:
    """One kernel's place in a `MemoryBudget`: kills the kernel when its processes hold more
    than `limit` (None: its cgroup enforces that), or when it is the kernel that took all the
    kernels of the budget past their total. `start` joins the budget (a budget of its own by
    default), `stop` leaves it."""

    def __init__(
        self,
        limit: int | None,
        pids: Callable[[], list[int]],
        kill: Callable[[], None],
        extra: Callable[[list[int]], int] = lambda pids: 0,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.limit = limit
        self.pids = pids
        self.kill = kill
        self.extra = extra  # memory held outside the processes (the sandbox's tmpfs files)
        self.budget = budget if budget is not None else MemoryBudget(None)
        self.peak = 0
        self.last = 0  # what it held at the budget's previous look
        self.tripped: int | None = None  # the memory that tripped it, until taken
        self.shared = False  # whether the budget's total tripped it, not its own limit
        self.killed_at: float | None = None  # monotonic time of the last kill

    def start(self) -> None:
        self.budget.join(self)

    def stop(self) -> None:
        self.budget.leave(self)

    def trip(self, used: int, shared: bool) -> None:
        self.tripped, self.shared, self.killed_at = used, shared, time.monotonic()
        self.kill()


class MemoryBudget:
    """The memory of several kernels: each within its own limit, all together within `total`
    (None: no shared limit), so that `render -j 2` with two hungry notes cannot take the
    machine down. One thread looks at every member each WATCH_INTERVAL, while there are
    members. Past the total, the kernel stopped is the one that grew most since the previous
    look (the one asking for more); what the others already hold, they keep."""

    def __init__(self, total: int | None, at_limit: Callable[[], bool] | None = None) -> None:
        self.total = total
        # Whether the machine's own accounting (the one cgroup over all the budget's kernels,
        # cgroup.BudgetCgroup.at_limit) holds them at the total now (v2: throttled there):
        # time to choose. Read once a look; None: no such cgroup.
        self.at_limit = at_limit
        self.peak = 0  # the most all members held together at one look
        self._members: list[MemoryWatchdog] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def join(self, member: MemoryWatchdog) -> None:
        with self._lock:
            member.last = 0
            self._members.append(member)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vault-runner-memory", daemon=True)
                self._thread.start()

    def leave(self, member: MemoryWatchdog) -> None:
        with self._lock:
            if member in self._members:
                self._members.remove(member)

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL)
            with self._lock:
                members = list(self._members)
                if not members:
                    self._thread = None
                    return
            self.look(members)

    def look(self, members: list[MemoryWatchdog]) -> None:
        """One look at every member: stop the ones over their limit, then the total."""
        seen = [(member, member.pids()) for member in members]
        seen = [(member, pids) for member, pids in seen if pids]  # none: between two kernels
        # Resident size from statm is cheap; the proportional count (smaps_rollup) walks
        # page tables under the kernel's mm lock and slows it down (import torch took
        # 0.2 s longer polled every 0.1 s), so it is only taken near a limit.
        extra = [member.extra(pids) for member, pids in seen]
        cheap = [resident_size(pids) + more for (_, pids), more in zip(seen, extra, strict=True)]
        at_limit = self.at_limit
        held_at_total = self.total is not None and bool(seen) and at_limit is not None and at_limit()
        near_total = self.total is not None and (held_at_total or sum(cheap) > self.total)
        within: list[tuple[MemoryWatchdog, int]] = []
        for (member, pids), more, held in zip(seen, extra, cheap, strict=True):
            if near_total or (member.limit is not None and held > member.limit):
                held = resident_memory(pids) + more
            member.peak = max(member.peak, held)
            if member.limit is not None and held > member.limit:
                member.trip(held, shared=False)
            else:
                within.append((member, held))
        total = sum(held for _, held in within)
        self.peak = max(self.peak, total)
        # A kernel just killed may still be giving its memory back (a big exit takes a while):
        # wait for it rather than stop another one for memory that is about to be free.
        now = time.monotonic()
        if any(m.killed_at is not None and now - m.killed_at < RELEASE_GRACE for m, _ in seen):
            return  # and growth is measured from before the kill: a kernel waiting now grew then
        if self.total is not None and (total > self.total or held_at_total) and within:
            # The one asking for more: the one that grew most since the previous look.
            member, held = max(within, key=lambda pair: (pair[1] - pair[0].last, pair[1]))
            member.trip(held, shared=True)
        for member, held in within:
            member.last = held


_budgets: dict[int, MemoryBudget] = {}
_budgets_lock = threading.Lock()


def memory_budget(total: int | None, at_limit: Callable[[], bool] | None = None) -> MemoryBudget:
    """The budget shared by every kernel of this process with this total (None: a new one
    without a total). `at_limit`: the budget cgroup's (one per budget, shared by its
    kernels), kept from the first kernel that has one."""
    if total is None:
        return MemoryBudget(None, at_limit)
    with _budgets_lock:
        budget = _budgets.setdefault(total, MemoryBudget(total))
        if budget.at_limit is None:
            budget.at_limit = at_limit
        return budget


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
