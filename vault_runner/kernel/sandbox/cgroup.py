"""The cgroup of one kernel, joined by the launcher: v2 with memory+pids limits, or v1 with a
pids folder and a memory folder (two hierarchies).

Every kernel of one memory budget (all the kernels of this process: `render -j 2`) sits
in one parent memory cgroup, `BudgetCgroup`: the memory watchdog stops the kernel that
asks for more at the budget (processes.MemoryBudget), so that a note holding memory
steadily keeps it, and the cgroup is the machine's own backstop a margin above it, however
fast a note fills memory (v2: memory.high at the budget slows it down to the watchdog's
pace first).

A cgroup is only used where this process may create one that a child can really join
(tried once per parent folder); otherwise the sandbox falls back to a memory watchdog
and RLIMIT_NPROC.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import threading
import time
from pathlib import Path

from vault_runner.kernel.sandbox.policy import Policy
from vault_runner.kernel.sandbox.processes import kill_pid, launcher_runs

__all__ = ("CGROUP_ROOT", "BudgetCgroup", "Cgroup", "cgroup_support")

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


def _v2_parent(path: str) -> Path:
    parent = CGROUP_ROOT / path.lstrip("/")
    return parent if (parent / "cgroup.controllers").exists() else CGROUP_ROOT / "unified" / path.lstrip("/")


def _write(path: Path, value: object) -> None:
    path.write_text(str(value))


class BudgetCgroup:
    """The parent memory cgroup of every kernel of one budget (see the module docstring).

    The watchdog stops a kernel at the budget itself; this cgroup holds them all at `limit`,
    a margin above (max(256 MiB, 1/8)), should a note fill memory faster than the watchdog
    looks: the machine's OOM killer then stops the biggest. Not at the budget itself: a
    note's own cap is the budget's size when it sets none (a lone note over it is told of
    its own cap), and a v1 cgroup whose OOM killer is off fails the innocent kernels'
    allocations (a process started there died of SIGSEGV). On v2, memory.high at the budget
    slows a fast note down to the watchdog's pace first (`at_limit`)."""

    def __init__(self, path: Path, version: int, total: int, controllers: tuple[str, ...] = ()) -> None:
        self.path = path
        self.version = version
        self.total = total
        self.limit = total + max(256 * 2**20, total // 8)
        self.controllers = controllers  # v2: what its kernels' cgroups may use
        self._hits = self._read_hits()

    @classmethod
    def make(cls, parent: Path, version: int, total: int, controllers: tuple[str, ...] = ()) -> BudgetCgroup | None:
        made = cls(parent / f"vault-runner.{os.getpid()}.budget{next(_cgroup_counter)}", version, total, controllers)
        path = made.path
        try:
            path.mkdir()
        except OSError:
            return None
        try:
            if version == 1:
                hierarchy = path / "memory.use_hierarchy"
                if hierarchy.exists() and hierarchy.read_text().strip() != "1":
                    _write(hierarchy, 1)  # else its kernels' memory is not counted in it (old kernels)
                _write(path / "memory.limit_in_bytes", made.limit)
                if (path / "memory.memsw.limit_in_bytes").exists():
                    _write(path / "memory.memsw.limit_in_bytes", made.limit)  # none of it in swap
            else:
                made.controllers = tuple(c for c in ("memory", "pids") if c in controllers)
                _write(path / "cgroup.subtree_control", " ".join(f"+{c}" for c in made.controllers))
                _write(path / "memory.high", total + max(64 * 2**20, total // 64))
                _write(path / "memory.max", made.limit)
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", 0)
        except OSError:
            _rmdir(path)
            return None
        return made

    def at_limit(self) -> bool:
        """Whether its kernels are throttled at the budget now (v2's memory.high; v1 has no
        such limit). By the memory no reclaim can give back (anonymous and shared): reading
        a big file fills the page cache up to memory.high, no reason to stop a note. Read
        once a look by the budget's watchdog (processes.MemoryBudget), for all its kernels."""
        if self.version == 1:
            return False
        try:
            stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
            return int(stat.get("anon", 0)) + int(stat.get("shmem", 0)) >= self.total
        except (OSError, ValueError):
            return False

    def _read_hits(self) -> int:
        """v2: OOMs at this cgroup's own memory.max (memory.events.local). v1: 1 when its
        usage reached its limit since the high-water mark was last reset (its failcnt
        stayed 0 through an OOM kill here), else 0."""
        try:
            if self.version == 2:
                for line in (self.path / "memory.events.local").read_text().splitlines():
                    if line.startswith("oom "):
                        return int(line.split()[1])
                return 0
            peak = int((self.path / "memory.max_usage_in_bytes").read_text())
            return int(peak >= self.limit - 2 * 2**20)
        except (OSError, ValueError):
            return 0

    def killed_at_limit(self) -> bool:
        """Whether its own limit was reached since the last call (where a kernel was then
        killed by the machine, it was the budget's doing, not the kernel's own cap)."""
        count = self._read_hits()
        if self.version == 1:
            try:
                _write(self.path / "memory.max_usage_in_bytes", 0)  # the next call sees what comes after
            except OSError:
                pass
            return count > 0
        hit, self._hits = count > self._hits, count
        return hit

    def remove(self) -> None:
        _remove_tree(self.path)


_budgets: dict[tuple[Path, int], BudgetCgroup | None] = {}
_budgets_lock = threading.Lock()


def _budget(parent: Path, version: int, total: int, controllers: tuple[str, ...] = ()) -> BudgetCgroup | None:
    """This process's budget cgroup of `total` bytes under `parent`: made once, removed at exit."""
    with _budgets_lock:
        key = (parent, total)
        if key not in _budgets:
            _remove_stale(parent)
            made = BudgetCgroup.make(parent, version, total, controllers)
            if made is not None and not _joinable(made.path):
                made.remove()
                made = None
            if made is not None and not _budgets:
                atexit.register(_remove_budgets)
            _budgets[key] = made
        return _budgets[key]


def _remove_budgets() -> None:
    with _budgets_lock:
        for budget in _budgets.values():
            if budget is not None:
                budget.remove()
        _budgets.clear()


class Cgroup:
    """A cgroup of one kernel: v2 with memory+pids in one folder, or v1 with a pids folder
    and a memory folder (`memory_path`). Created here, joined by the launcher (`folders`)."""

    def __init__(
        self,
        path: Path,
        version: int,
        memory: bool,
        controllers: tuple[str, ...] = (),
        *,
        memory_path: Path | None = None,
        budget: BudgetCgroup | None = None,
    ) -> None:
        self.path = path
        self.version = version
        self.memory = memory  # its memory cap is enforced by the kernel (v2 memory.max, v1 limit)
        self.controllers = controllers  # v2: what the parent enables for its children
        self.memory_path = memory_path  # v1: its folder in the memory hierarchy
        self.budget = budget  # the parent memory cgroup of every kernel of its budget
        self._oom_kills = self._read_oom_kills()

    @property
    def folders(self) -> list[Path]:
        """Each folder a process joins (one per hierarchy)."""
        return [self.path] if self.memory_path is None else [self.path, self.memory_path]

    @classmethod
    def create(cls, policy: Policy) -> Cgroup | None:
        name = f"vault-runner.{os.getpid()}.{next(_cgroup_counter)}"
        v2 = _own_cgroup(None)
        if v2 is not None:
            parent = _v2_parent(v2)
            try:
                enabled = tuple((parent / "cgroup.subtree_control").read_text().split())
            except OSError:
                enabled = ()
            budget = None
            if "memory" in enabled and policy.budget:
                budget = _budget(parent, 2, policy.budget, enabled)
                if budget is not None:
                    parent, enabled = budget.path, budget.controllers
            if "pids" in enabled or "memory" in enabled:
                made = cls._make(parent / name, 2, "memory" in enabled, enabled, budget=budget)
                if made is not None:
                    made.limit(policy)  # without memory.max (`memory` False), the watchdog caps it
                    return made
        pids = cls._v1_folder("pids", name, None)
        budget = None
        memory = None
        if policy.memory or policy.budget:
            memory_parent = _v1_parent("memory")
            if memory_parent is not None and policy.budget:
                budget = _budget(memory_parent, 1, policy.budget)
            memory = cls._v1_folder("memory", name, budget)
        if pids is None and memory is None:
            return None
        made = cls(
            (pids or memory).path,  # type: ignore[union-attr]
            1,
            memory is not None,
            memory_path=memory.path if pids is not None and memory is not None else None,
            budget=budget if memory is not None else None,
        )
        if not made.limit(policy):
            made.remove()
            return None
        return made

    @classmethod
    def _v1_folder(cls, controller: str, name: str, budget: BudgetCgroup | None) -> Cgroup | None:
        parent = budget.path if budget is not None else _v1_parent(controller)
        if parent is None:
            return None
        if budget is None:
            _remove_stale(parent)
        return cls._make(parent / name, 1, controller == "memory")

    @classmethod
    def _make(
        cls,
        path: Path,
        version: int,
        memory: bool,
        controllers: tuple[str, ...] = (),
        budget: BudgetCgroup | None = None,
    ) -> Cgroup | None:
        if not _joinable(path.parent):
            return None
        try:
            path.mkdir()
        except OSError:
            return None
        if not os.access(path / "cgroup.procs", os.W_OK):
            _rmdir(path)
            return None
        return cls(path, version, memory, controllers, budget=budget)

    def same_place(self, other: Cgroup) -> bool:
        """Whether `other` holds a kernel as this one would: same version, the same memory
        cap kind and the same budget."""
        return (
            other.version == self.version
            and other.memory == self.memory
            and (other.memory_path is None) == (self.memory_path is None)
            and other.budget is self.budget
        )

    def join(self, pid: int) -> None:
        """Move a process (and what it starts later) into every folder of this cgroup."""
        for folder in self.folders:
            _write(folder / "cgroup.procs", pid)

    def limit(self, policy: Policy) -> bool:
        """Put `policy`'s caps on this cgroup (again, for a spare's cgroup that a note takes);
        False where one could not be written. A new v2 cgroup then goes without memory.max
        (`memory` False: the watchdog caps it); a v1 one, or one to adopt, is not used."""
        memory_folder = self.memory_path or self.path
        try:
            if (self.path / "pids.max").exists():
                _write(self.path / "pids.max", policy.max_tasks or "max")
            if self.version == 1 and self.memory:
                swap = memory_folder / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    _write(swap, -1)  # never below memory.limit_in_bytes while that changes
                _write(memory_folder / "memory.limit_in_bytes", policy.memory or -1)
                if swap.exists():
                    _write(swap, policy.memory or -1)
        except OSError:
            self.memory = False
            return False
        try:
            if self.version == 2 and self.memory and policy.memory:
                _write(self.path / "memory.max", policy.memory)
                _write(self.path / "memory.swap.max", 0) if (self.path / "memory.swap.max").exists() else None
                _write(self.path / "memory.oom.group", 1)
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
                _write(self.path / "cgroup.kill", 1)
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
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in ((self.memory_path or self.path) / name).read_text().splitlines():
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

    def reached_own_limit(self) -> bool:
        """Whether the kernel's memory ever reached its own cap (v1 max_usage_in_bytes, v2
        memory.peak, against the cap): an OOM kill then was its own cap's, whatever the
        budget's cgroup above saw meanwhile."""
        folder = self.memory_path or self.path
        names = (
            ("memory.max_usage_in_bytes", "memory.limit_in_bytes")
            if self.version == 1
            else ("memory.peak", "memory.max")
        )
        try:
            peak, limit = (int((folder / name).read_text()) for name in names)
        except (OSError, ValueError):
            return False
        return peak >= limit - 2 * 2**20

    def pids_peak(self) -> int | None:
        try:
            return int((self.path / "pids.peak").read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        self.kill_all()
        for folder in self.folders:
            for _ in range(50):
                if _rmdir(folder):
                    break
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


def _v1_parent(controller: str) -> Path | None:
    own = _own_cgroup(controller)
    if own is None or not (CGROUP_ROOT / controller).is_dir():
        return None
    return CGROUP_ROOT / controller / own.lstrip("/")


def _remove_tree(folder: Path) -> None:
    """Kill what is in a cgroup and its children, then remove them, deepest first (another
    process may be removing the same stale tree)."""
    try:
        children = [p for p in folder.iterdir() if p.is_dir()]
    except OSError:
        children = []
    for child in children:
        _remove_tree(child)
    Cgroup(folder, 1, False).remove()


def _remove_stale(parent: Path) -> None:
    """Cgroups left by a vault-runner process that died without cleaning up."""
    for child in parent.glob("vault-runner.*.*"):
        try:
            owner = int(child.name.split(".")[1])
        except (IndexError, ValueError):
            continue
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        _remove_tree(child)


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
    found = [
        f"{controller} at {parent}"
        for controller in ("pids", "memory")
        if (parent := _v1_parent(controller)) is not None and os.access(parent, os.W_OK)
    ]
    return f"cgroup v1 {', '.join(found)}" if found else "none writable"
