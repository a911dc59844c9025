"""The cgroup of one kernel: v2 with memory+pids limits, or v1 pids; joined by the launcher.

A cgroup is only used where this process may create one that a child can really join
(tried once per parent folder); otherwise the sandbox falls back to a memory watchdog
and RLIMIT_NPROC.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
from pathlib import Path

from vault_runner.kernel.sandbox.policy import Policy
from vault_runner.kernel.sandbox.processes import kill_pid, launcher_runs

__all__ = ("CGROUP_ROOT", "Cgroup", "cgroup_support")

_cgroup_counter = itertools.count()
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path for a v1 controller, or the v2 path (controller None)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if controller is None and number == "0" and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return None


class Cgroup:
    """A cgroup of one kernel: v2 with memory+pids, or v1 pids. Created, joined by the launcher."""

    def __init__(self, path: Path, version: int, memory: bool, controllers: tuple[str, ...] = ()) -> None:
        self.path = path
        self.version = version
        self.memory = memory  # memory.max is enforced by the kernel (v2)
        self.controllers = controllers  # v2: what the parent enables for its children
        self._oom_kills = self._read_oom_kills()

    @classmethod
    def create(cls, policy: Policy) -> Cgroup | None:
        name = f"vault-runner.{os.getpid()}.{next(_cgroup_counter)}"
        v2 = _own_cgroup(None)
        if v2 is not None:
            parent = CGROUP_ROOT / v2.lstrip("/")
            if not (parent / "cgroup.controllers").exists():
                parent = CGROUP_ROOT / "unified" / v2.lstrip("/")
            try:
                enabled = (parent / "cgroup.subtree_control").read_text().split()
            except OSError:
                enabled = []
            if "pids" in enabled or "memory" in enabled:
                made = cls._make(parent / name, 2, "memory" in enabled, tuple(enabled))
                if made is not None:
                    made.limit(policy)  # without memory.max (`memory` False), the watchdog caps it
                    return made
        v1 = _own_cgroup("pids")
        if v1 is not None and (CGROUP_ROOT / "pids").is_dir():
            parent = CGROUP_ROOT / "pids" / v1.lstrip("/")
            _remove_stale(parent)
            made = cls._make(parent / name, 1, False)
            if made is not None and not made.limit(policy):
                made.remove()
                return None
            return made
        return None

    @classmethod
    def _make(cls, path: Path, version: int, memory: bool, controllers: tuple[str, ...] = ()) -> Cgroup | None:
        if not _joinable(path.parent):
            return None
        try:
            path.mkdir()
        except OSError:
            return None
        if not os.access(path / "cgroup.procs", os.W_OK):
            _rmdir(path)
            return None
        return cls(path, version, memory, controllers)

    def limit(self, policy: Policy) -> bool:
        """Put `policy`'s caps on this cgroup (again, for a spare's cgroup that a note takes);
        False where one could not be written. A new v2 cgroup then goes without memory.max
        (`memory` False: the watchdog caps it); a v1 one, or one to adopt, is not used."""
        try:
            if self.version == 1 or "pids" in self.controllers:
                (self.path / "pids.max").write_text(str(policy.max_tasks or "max"))
        except OSError:
            self.memory = False
            return False
        try:
            if self.version == 2 and self.memory and policy.memory:
                (self.path / "memory.max").write_text(str(policy.memory))
                (self.path / "memory.swap.max").write_text("0") if (self.path / "memory.swap.max").exists() else None
                (self.path / "memory.oom.group").write_text("1")
        except OSError:
            self.memory = False
            return False
        return True

    def procs(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def kill_all(self) -> None:
        if self.version == 2 and (self.path / "cgroup.kill").exists():
            try:
                (self.path / "cgroup.kill").write_text("1")
            except OSError:
                pass
        # A fork bomb forks while we kill: go round until nothing is left (the pids cap bounds it).
        for _ in range(200):
            pids = self.procs()
            if not pids:
                return
            for pid in pids:
                kill_pid(pid)
            time.sleep(0.005)

    def _read_oom_kills(self) -> int:
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def oom_killed(self) -> bool:
        """Whether the kernel's memory cap killed something since the last call."""
        count = self._read_oom_kills()
        killed, self._oom_kills = count > self._oom_kills, count
        return killed

    def pids_peak(self) -> int | None:
        try:
            return int((self.path / "pids.peak").read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        self.kill_all()
        for _ in range(50):
            if _rmdir(self.path):
                return
            time.sleep(0.02)


_probe_lock = threading.Lock()


def _joinable(parent: Path) -> bool:
    """Whether a process can really join a new cgroup under `parent` (cgroup v2 refuses it in
    many set-ups, e.g. "no internal processes"): tried once per process with a child. One
    probe at a time: two at once (a spare's cgroup and a note's) would each remove the
    folder the other's child is joining, and a wrong False is cached for good."""
    with _probe_lock:
        return _probe(parent)


@functools.cache
def _probe(parent: Path) -> bool:
    path = parent / f"vault-runner.{os.getpid()}.probe{next(_cgroup_counter)}"
    try:
        path.mkdir()
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        return launcher_runs({"cgroup": str(path)})
    finally:
        for _ in range(50):
            if _rmdir(path):
                break
            time.sleep(0.02)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _remove_stale(parent: Path) -> None:
    """Cgroups left by a vault-runner process that died without cleaning up."""
    for child in parent.glob("vault-runner.*.*"):
        try:
            owner = int(child.name.split(".")[1])
        except (IndexError, ValueError):
            continue
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        stale = Cgroup(child, 1, False)
        stale.remove()


def cgroup_support() -> str:
    """What the cgroup layer can do for this process (doctor)."""
    v2 = _own_cgroup(None)
    if v2 is not None:
        for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
            parent = base / v2.lstrip("/")
            try:
                enabled = (parent / "cgroup.subtree_control").read_text().split()
            except OSError:
                continue
            if ("memory" in enabled or "pids" in enabled) and os.access(parent, os.W_OK):
                return f"cgroup v2 ({' '.join(c for c in enabled if c in {'memory', 'pids'})}) at {parent}"
    v1 = _own_cgroup("pids")
    if v1 is not None and os.access(CGROUP_ROOT / "pids" / v1.lstrip("/"), os.W_OK):
        return f"cgroup v1 pids at {CGROUP_ROOT / 'pids' / v1.lstrip('/')}"
    return "none writable"
