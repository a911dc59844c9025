"""How a kernel is launched: isolation tier, limits and GPU placement.

Tiers, chosen once per process by actually trying them (``VAULT_RUNNER_SANDBOX`` forces one):

- ``bubblewrap``: the kernel runs in ``bwrap`` with the whole filesystem read-only, a
  private ``/tmp``, ``/run`` and ``/var/tmp``, the home folders hidden behind an empty
  read-only tmpfs, its own pid (and, as a normal user, user) namespace, and ``--unshare-net``
  when the note says ``network: false``. Writable: the whole vault (the kernel's cwd is the
  note's folder, and notes read and write data files anywhere in their vault), except
  ``.obsidian``, ``.git`` and ``vault-runner.toml``, which stay read-only so a note cannot
  plant an Obsidian plugin or a git hook that would run outside the sandbox. A symlink in the
  vault that points outside it leads nowhere: the outside path does not exist in there.
- ``landlock``: the same policy enforced by the kernel's Landlock LSM, applied by the
  launcher before ipykernel starts: read everything but the home folders and the shared
  temp folders; write the vault's sub-folders (again not ``.obsidian``/``.git``; new files
  directly in the vault root are refused), a private temp folder and the ipc folder. With
  ``network: false`` TCP connect/bind are refused (Landlock ABI 4+); UDP is not covered.
- ``plain``: an ordinary process, with a visible warning in the note and in ``doctor``.

Limits, in every tier: a per-block timeout (kernel.py), no core dumps, a memory cap
(cgroup v2 ``memory.max`` when this process may create cgroups, else a watchdog thread
that kills the kernel when the resident memory of its processes passes the cap; never
RLIMIT_AS, which breaks CUDA), and a cap on processes+threads (a pids cgroup, v2 or v1,
when writable; else RLIMIT_NPROC, which only counts per sandbox for a non-root user in
bubblewrap's user namespace).
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import sandbox_launch
from .errors import SandboxError

TIERS = ("bubblewrap", "landlock", "plain")
SANDBOX_ENV = "VAULT_RUNNER_SANDBOX"  # force a tier: bubblewrap | landlock | plain
MAX_TASKS_ENV = "VAULT_RUNNER_MAX_TASKS"  # processes + threads per kernel
MEMORY_ENV = "VAULT_RUNNER_MEMORY"  # default memory cap when a note sets none, e.g. 8G
NO_NETWORK_ENV = "VAULT_RUNNER_NO_NETWORK"  # 1: network off for every kernel (--no-network)
DEFAULT_MAX_TASKS = 4096  # threads count too: torch starts one per core, DataLoader workers more
DEFAULT_MEMORY_SHARE = 0.8  # of physical memory, when neither the note nor the env sets a cap
WATCH_INTERVAL = 0.1  # seconds between two looks at the kernel's memory
PROTECTED_IN_VAULT = (".obsidian", ".git", "vault-runner.toml")
PLAIN_WARNING = (
    "[vault-runner: warning: no sandbox: neither bubblewrap nor Landlock works here, so this "
    "note's code runs with your full permissions; install bubblewrap (e.g. `apt install bubblewrap`)]"
)
_BWRAP_BASE = [
    "--ro-bind", "/", "/",
    "--dev", "/dev",
    "--proc", "/proc",
    "--tmpfs", "/tmp",
    "--unshare-pid",
    "--die-with-parent",
    "--new-session",
]  # fmt: skip


# -- probing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    tier: str
    reason: str
    forced: bool = False
    bwrap: str | None = None  # path to bwrap, when it works
    bwrap_version: str | None = None
    bwrap_userns: bool = False
    bwrap_netns: bool = False
    landlock_abi: int = 0


def _run_quiet(argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None


def _probe_bwrap() -> tuple[str | None, str | None, bool, bool, str]:
    """(path, version, user namespaces work, network namespaces work, why not)."""
    path = shutil.which("bwrap")
    if path is None:
        return None, None, False, False, "bubblewrap is not installed"
    done = _run_quiet([path, "--version"])
    version = done.stdout.strip().split()[-1] if done and done.returncode == 0 and done.stdout.strip() else None
    base = _run_quiet([path, *_BWRAP_BASE, "true"])
    if base is None or base.returncode != 0:
        why = (base.stderr.strip().splitlines() or ["no output"])[-1] if base else "it did not run"
        return None, version, False, False, f"bubblewrap is installed but cannot create a sandbox here ({why})"
    userns = _ok(_run_quiet([path, *_BWRAP_BASE, "--unshare-user", "--cap-drop", "ALL", "true"]))
    netns = _ok(_run_quiet([path, *_BWRAP_BASE, "--unshare-net", "true"]))
    return path, version, userns, netns, ""


def _ok(done: subprocess.CompletedProcess[str] | None) -> bool:
    return done is not None and done.returncode == 0


def _probe_landlock() -> int:
    """Landlock's ABI, checked by restricting a child process for real."""
    abi = sandbox_launch.landlock_abi()
    if abi < 1:
        return 0
    spec = json.dumps({"landlock": {"read": ["/"], "write": [], "network": True}})
    done = _run_quiet(
        [sys.executable, "-I", "-S", sandbox_launch.__file__, spec, "--", sys.executable, "-I", "-S", "-c", ""]
    )
    return abi if _ok(done) else 0


@functools.cache
def _probe(forced: str) -> Probe:
    bwrap, version, userns, netns, why_not = _probe_bwrap() if sys.platform.startswith("linux") else (
        None, None, False, False, "bubblewrap needs Linux")  # fmt: skip
    abi = _probe_landlock() if sys.platform.startswith("linux") else 0
    info: dict[str, Any] = {
        "bwrap": bwrap,
        "bwrap_version": version,
        "bwrap_userns": userns,
        "bwrap_netns": netns,
        "landlock_abi": abi,
    }
    if forced:
        if forced not in TIERS:
            raise SandboxError(f"{SANDBOX_ENV}={forced} is not a sandbox tier; use one of {', '.join(TIERS)}")
        if forced == "bubblewrap" and bwrap is None:
            raise SandboxError(f"{SANDBOX_ENV}=bubblewrap, but {why_not}; install bubblewrap or unset {SANDBOX_ENV}")
        if forced == "landlock" and abi == 0:
            raise SandboxError(f"{SANDBOX_ENV}=landlock, but this Linux kernel has no usable Landlock; unset it")
        return Probe(forced, f"forced by {SANDBOX_ENV}", forced=True, **info)
    if bwrap is not None:
        return Probe("bubblewrap", f"bubblewrap {version or '?'} works", **info)
    if abi:
        return Probe("landlock", f"{why_not}; Landlock ABI {abi} works", **info)
    return Probe("plain", f"{why_not}; Landlock is not available", **info)


def probe() -> Probe:
    """The tier this process uses (probed once per process and forced value)."""
    return _probe(os.environ.get(SANDBOX_ENV, "").strip().lower())


# -- policy --------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GiB', '100KB' or '1000' -> bytes (binary units: G = 2**30)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size such as 4G or 512M")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def physical_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_memory() -> tuple[int | None, str]:
    """The cap when a note sets none, and where it comes from."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        return parse_size(override), MEMORY_ENV
    total = physical_memory()
    if total is None:
        return None, "unknown physical memory"
    return int(total * DEFAULT_MEMORY_SHARE), f"{int(DEFAULT_MEMORY_SHARE * 100)}% of physical memory"


def default_max_tasks() -> int | None:
    value = os.environ.get(MAX_TASKS_ENV)
    if value is None:
        return DEFAULT_MAX_TASKS
    return int(value) if int(value) > 0 else None


@dataclass(frozen=True)
class Policy:
    """What a kernel may do. Hashable, so a warm pool can key kernels by it."""

    vault: Path | None
    cwd: Path
    network: bool = True
    memory: int | None = None  # bytes of resident memory for all the kernel's processes
    max_tasks: int | None = DEFAULT_MAX_TASKS  # processes + threads
    device: str = "auto"


def policy_from_options(cwd: Path, env: Mapping[str, str], note_options: Mapping[str, Any]) -> Policy:
    """The policy for a note's kernel, from its options (options.py) and the environment."""
    vault = env.get("VAULT_RUNNER_VAULT")
    memory_option = note_options.get("memory")
    memory = parse_size(memory_option) if memory_option else default_memory()[0]
    network = bool(note_options.get("network", True)) and os.environ.get(NO_NETWORK_ENV, "") not in {"1", "true"}
    return Policy(
        vault=Path(vault).resolve() if vault else None,
        cwd=Path(cwd).resolve(),
        network=network,
        memory=memory,
        max_tasks=default_max_tasks(),
        device=str(note_options.get("device", "auto")),
    )


# -- GPUs ----------------------------------------------------------------------------------
def nvidia_device_nodes() -> list[str]:
    return sorted(p for p in glob.glob("/dev/nvidia*") if not os.path.isdir(p)) + sorted(
        p for p in glob.glob("/dev/nvidia-caps") if os.path.isdir(p)
    )


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out, honouring an existing CUDA_VISIBLE_DEVICES."""
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current is not None:
        return [g.strip() for g in current.split(",") if g.strip() and g.strip() != "-1"]
    return sorted((p[len("/dev/nvidia") :] for p in glob.glob("/dev/nvidia[0-9]*")), key=int)


_gpu_lock = threading.Lock()
_gpu_users: dict[str, int] = {}


def claim_gpu(device: str) -> str | None:
    """With several GPUs, give a kernel the least used one (CUDA_VISIBLE_DEVICES)."""
    if device not in {"auto", "cuda"}:
        return None  # cpu, mps, or a note that named cuda:N itself
    gpus = visible_gpus()
    if len(gpus) < 2:
        return None
    with _gpu_lock:
        chosen = min(gpus, key=lambda g: (_gpu_users.get(g, 0), gpus.index(g)))
        _gpu_users[chosen] = _gpu_users.get(chosen, 0) + 1
    return chosen


def release_gpu(gpu: str | None) -> None:
    if gpu is None:
        return
    with _gpu_lock:
        _gpu_users[gpu] = max(0, _gpu_users.get(gpu, 0) - 1)


# -- cgroups -------------------------------------------------------------------------------
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

    def __init__(self, path: Path, version: int, memory: bool) -> None:
        self.path = path
        self.version = version
        self.memory = memory  # memory.max is enforced by the kernel (v2)
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
                made = cls._make(parent / name, 2, "memory" in enabled)
                if made is not None:
                    made._limit_v2(policy, enabled)
                    return made
        v1 = _own_cgroup("pids")
        if v1 is not None and (CGROUP_ROOT / "pids").is_dir():
            parent = CGROUP_ROOT / "pids" / v1.lstrip("/")
            _remove_stale(parent)
            made = cls._make(parent / name, 1, False)
            if made is not None:
                try:
                    (made.path / "pids.max").write_text(str(policy.max_tasks or "max"))
                except OSError:
                    made.remove()
                    return None
                return made
        return None

    @classmethod
    def _make(cls, path: Path, version: int, memory: bool) -> Cgroup | None:
        if not _joinable(path.parent):
            return None
        try:
            path.mkdir()
        except OSError:
            return None
        if not os.access(path / "cgroup.procs", os.W_OK):
            _rmdir(path)
            return None
        return cls(path, version, memory)

    def _limit_v2(self, policy: Policy, enabled: list[str]) -> None:
        try:
            if "pids" in enabled:
                (self.path / "pids.max").write_text(str(policy.max_tasks or "max"))
            if self.memory and policy.memory:
                (self.path / "memory.max").write_text(str(policy.memory))
                (self.path / "memory.swap.max").write_text("0") if (self.path / "memory.swap.max").exists() else None
                (self.path / "memory.oom.group").write_text("1")
        except OSError:
            self.memory = False

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
                _kill(pid)
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


@functools.cache
def _joinable(parent: Path) -> bool:
    """Whether a process can really join a new cgroup under `parent` (cgroup v2 refuses it in
    many set-ups, e.g. "no internal processes"): tried once per process with a child."""
    path = parent / f"vault-runner.{os.getpid()}.probe"
    try:
        path.mkdir()
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        spec = json.dumps({"cgroup": str(path)})
        return _ok(
            _run_quiet(
                [sys.executable, "-I", "-S", sandbox_launch.__file__, spec, "--", sys.executable, "-I", "-S", "-c", ""]
            )
        )
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


# -- processes -----------------------------------------------------------------------------
def _kill(pid: int) -> None:
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


# -- the sandbox of one kernel -------------------------------------------------------------
def _python_paths() -> list[Path]:
    """What the kernel's Python needs to read, wherever it lives (a pyenv under $HOME ...).

    Not every sys.path entry: the first one is the folder of whatever script started this
    process, which may be anywhere (a temp folder, a home folder) and must stay hidden.
    """
    import vault_runner

    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), Path(sys.executable).resolve().parent}
    paths |= {Path(p) for p in site.getsitepackages()} if hasattr(site, "getsitepackages") else set()
    paths |= {Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    paths.add(Path(vault_runner.__file__).resolve().parent.parent)
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user_site:
        paths.add(Path(user_site))
    existing = sorted({p.resolve() for p in paths if p.exists()}, key=lambda p: len(p.parts))
    return _outermost(existing)


def _outermost(paths: Iterable[Path]) -> list[Path]:
    kept: list[Path] = []
    for path in sorted(set(paths), key=lambda p: (len(p.parts), str(p))):
        if not any(path == k or k in path.parents for k in kept):
            kept.append(path)
    return kept


def hidden_roots() -> list[Path]:
    """Folders the kernel must not see: home folders and shared temp/runtime folders."""
    candidates = [Path("/tmp"), Path("/var/tmp"), Path("/run"), Path("/home"), Path("/root"), Path.home()]
    for name in ("HOME",):
        if os.environ.get(name):
            candidates.append(Path(os.environ[name]))
    real = [Path(os.path.realpath(c)) for c in candidates]
    return _outermost(p for p in real if p.is_dir() and p != Path("/"))


def mpl_cache_dir() -> Path:
    """A matplotlib config/cache folder shared by sandboxed kernels (its font list is slow to build)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("vault-runner")) / "matplotlib"


class Sandbox:
    """The isolation and limits of one KernelSession; see the module docstring."""

    def __init__(self, policy: Policy, tier: str | None = None) -> None:
        self.policy = policy
        self.probe = probe()
        self.tier = tier or self.probe.tier
        if self.tier == "bubblewrap" and self.probe.bwrap is None:
            raise SandboxError("the bubblewrap tier was asked for, but bubblewrap does not work here")
        if self.tier == "bubblewrap" and not policy.network and not self.probe.bwrap_netns:
            raise SandboxError(
                "network: false needs a network namespace, which bubblewrap cannot create here; "
                "remove the option or run where user namespaces are allowed"
            )
        self.cgroup: Cgroup | None = None
        self.watchdog: MemoryWatchdog | None = None
        self.private_tmp: Path | None = None
        self.runtime_dir: Path | None = None
        self.gpu = claim_gpu(policy.device)
        self._root_pid: Callable[[], int | None] = lambda: None
        self.nproc: int | None = None
        self.warnings = self._warnings()

    # -- what the user is told --------------------------------------------------------------
    def _warnings(self) -> list[str]:
        out = []
        if self.tier == "plain" and self.probe.forced:
            out.append(
                f"[vault-runner: warning: no sandbox ({SANDBOX_ENV}=plain): this note's code runs with your full "
                "permissions]"
            )
        elif self.tier == "plain":
            out.append(PLAIN_WARNING)
        if not self.policy.network and (
            self.tier == "plain" or (self.tier == "landlock" and self.probe.landlock_abi < 4)
        ):
            out.append(f"[vault-runner: warning: network: false is not enforced in the {self.tier} sandbox tier]")
        return out

    def describe(self) -> dict[str, Any]:
        """Limits in force for this kernel (doctor, reports)."""
        memory = "none"
        if self.policy.memory:
            how = "cgroup memory.max" if self.cgroup and self.cgroup.memory else "resident-memory watchdog"
            memory = f"{format_size(self.policy.memory)} ({how})"
        if self.cgroup is not None and self.policy.max_tasks:
            tasks = f"{self.policy.max_tasks} (cgroup v{self.cgroup.version} pids.max)"
        elif self.nproc:
            tasks = f"{self.nproc} (RLIMIT_NPROC)"
        else:
            tasks = "none (no writable pids cgroup, and RLIMIT_NPROC does not apply to root)"
        return {
            "tier": self.tier,
            "network": "on" if self.policy.network else "off",
            "memory": memory,
            "processes+threads": tasks,
            "core dumps": "off",
            "gpu": self.gpu or "all visible",
        }

    # -- launch -----------------------------------------------------------------------------
    def setup(self, runtime_dir: Path, root_pid: Callable[[], int | None]) -> None:
        """Before the first start: make the cgroup, the private temp folder; start watching."""
        self.runtime_dir = runtime_dir
        self._root_pid = root_pid
        self.cgroup = Cgroup.create(self.policy) if (self.policy.max_tasks or self.policy.memory) else None
        if self.cgroup is None and self.policy.max_tasks and os.geteuid() != 0:
            if self.tier == "bubblewrap" and self.probe.bwrap_userns:
                self.nproc = self.policy.max_tasks  # counted per user namespace (Linux 5.14+)
            else:
                self.nproc = _user_tasks() + self.policy.max_tasks
        if self.tier == "landlock":
            self.private_tmp = Path(tempfile.mkdtemp(prefix="vr-tmp-", dir=runtime_dir))
        mpl_cache_dir().mkdir(parents=True, exist_ok=True)
        if self.policy.memory and not (self.cgroup and self.cgroup.memory):
            self.watchdog = MemoryWatchdog(self.policy.memory, self.pids, self.kill_all, self._tmpfs_used)
            self.watchdog.start()

    def env(self) -> dict[str, str]:
        """Environment additions for the kernel (per tier: where temp and cache files go)."""
        env = {"MPLCONFIGDIR": str(mpl_cache_dir()), "JUPYTER_RUNTIME_DIR": str(self.runtime_dir or "")}
        if self.tier == "bubblewrap":
            env.update(TMPDIR="/tmp", IPYTHONDIR="/tmp/.ipython", XDG_CACHE_HOME="/tmp/.cache")
        elif self.tier == "landlock" and self.private_tmp is not None:
            tmp = str(self.private_tmp)
            env.update(TMPDIR=tmp, IPYTHONDIR=f"{tmp}/.ipython", XDG_CACHE_HOME=f"{tmp}/.cache")
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env

    @property
    def interrupt_mode(self) -> str:
        # Under bubblewrap the kernel sits in its own session inside a pid namespace: a SIGINT
        # to the bwrap process group does not reach it, a message on the control channel does.
        return "message" if self.tier == "bubblewrap" else "signal"

    def wrap(self, argv: list[str]) -> list[str]:
        """The full launch command for a kernel command line."""
        outer: dict[str, Any] = {"core": 0}
        if self.cgroup is not None:
            outer["cgroup"] = str(self.cgroup.path)
        if self.tier == "landlock":
            outer["landlock"] = self.landlock_spec()
            outer["drop_caps"] = os.geteuid() == 0
            if self.nproc:
                outer["nproc"] = self.nproc
        elif self.tier == "plain" and self.nproc:
            outer["nproc"] = self.nproc
        launcher = [sys.executable, "-I", "-S", sandbox_launch.__file__]
        command = list(argv)
        if self.tier == "bubblewrap":
            if self.nproc:
                command = [*launcher, json.dumps({"nproc": self.nproc}), "--", *command]
            command = [*self.bwrap_args(), "--", *command]
        return [*launcher, json.dumps(outer), "--", *command]

    def bwrap_args(self) -> list[str]:
        assert self.probe.bwrap is not None and self.runtime_dir is not None
        # tmpfs files live in memory: bound them by the memory cap (the watchdog counts them too).
        size = ["--size", str(self.policy.memory)] if self.policy.memory else []
        args = [self.probe.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", *size, "--tmpfs", "/dev/shm"]
        args += ["--proc", "/proc"]
        args += ["--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session"]
        # ipykernel takes a parent pid of 1 (its parent in the pid namespace) for "orphaned";
        # a parent pid of 1 turns that watch off; --die-with-parent ends the kernel instead.
        args += ["--setenv", "JPY_PARENT_PID", "1"]
        if self.probe.bwrap_userns:
            args += ["--unshare-user", "--uid", str(os.getuid()), "--gid", str(os.getgid())]
        args += ["--cap-drop", "ALL"]
        if not self.policy.network:
            args.append("--unshare-net")
        if self.policy.device != "cpu":
            for node in nvidia_device_nodes():
                args += ["--dev-bind", node, node]
        hidden = hidden_roots()
        for path in hidden:
            args += [*(size if path == Path("/tmp") else []), "--tmpfs", str(path)]
        if self.policy.network and Path("/run/systemd/resolve").is_dir():
            # /etc/resolv.conf often points in there; DNS must keep working with network on.
            args += ["--ro-bind", "/run/systemd/resolve", "/run/systemd/resolve"]
        for path in _python_paths():
            if any(h == path or h in path.parents for h in hidden):
                args += ["--ro-bind", str(path), str(path)]
        args += ["--bind", str(mpl_cache_dir()), str(mpl_cache_dir())]
        args += ["--bind", str(self.runtime_dir), str(self.runtime_dir)]
        writable = self.policy.vault or self.policy.cwd
        args += ["--bind", str(writable), str(writable)]
        if self.policy.vault is not None:
            for name in PROTECTED_IN_VAULT:
                protected = self.policy.vault / name
                if protected.exists() and not protected.is_symlink():
                    args += ["--ro-bind", str(protected), str(protected)]
        if (
            self.policy.vault is not None
            and self.policy.cwd != self.policy.vault
            and not self.policy.cwd.is_relative_to(self.policy.vault)
        ):
            args += ["--bind", str(self.policy.cwd), str(self.policy.cwd)]
        for path in hidden:
            if path != Path("/tmp"):
                args += ["--remount-ro", str(path)]  # writing ~/.bashrc fails, and loudly
        args += ["--chdir", str(self.policy.cwd)]
        return args

    def landlock_spec(self) -> dict[str, Any]:
        assert self.runtime_dir is not None
        hidden = hidden_roots()
        read = [str(p) for p in _readable_outside(hidden)]
        read += [str(p) for p in _python_paths()]
        if self.policy.network and Path("/run/systemd/resolve").is_dir():
            read.append("/run/systemd/resolve")  # /etc/resolv.conf often points in there
        write = [str(self.runtime_dir), str(mpl_cache_dir()), "/dev/shm"]
        if self.private_tmp is not None:
            write.append(str(self.private_tmp))
        vault = self.policy.vault
        if vault is not None:
            read.append(str(vault))
            for entry in sorted(vault.iterdir()):
                # A symlink would grant its target (outside the vault, maybe): never follow one.
                if entry.name not in PROTECTED_IN_VAULT and not entry.is_symlink():
                    write.append(str(entry))  # files and folders; new files in the root are refused
            if vault != self.policy.cwd and not self.policy.cwd.is_relative_to(vault):
                write.append(str(self.policy.cwd))
        else:
            write.append(str(self.policy.cwd))
        files = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx"]
        if self.policy.device != "cpu":
            files += [n for n in nvidia_device_nodes() if not os.path.isdir(n)]
            # cuInit writes into the process's own /proc entry (error 304 without it, seen on an
            # H100). The launcher resolves /proc/self to its own pid, which the kernel inherits.
            write.append("/proc/self")
        return {"read": read, "write": write, "files": files, "network": self.policy.network}

    # -- watching and stopping ----------------------------------------------------------------
    def pids(self) -> list[int]:
        if self.cgroup is not None:
            return self.cgroup.procs()
        root = self._root_pid()
        return process_tree(root) if root else []

    def _tmpfs_used(self, pids: list[int]) -> int:
        """Bytes in the sandbox's private /tmp and /dev/shm: tmpfs files are memory too."""
        if self.tier != "bubblewrap":
            return 0
        try:
            host = os.stat("/tmp").st_dev
        except OSError:
            return 0
        for pid in reversed(pids):
            try:
                if os.stat(f"/proc/{pid}/root/tmp").st_dev == host:
                    continue  # the launcher or bwrap itself, outside the sandbox's mounts
                total = 0
                for folder in ("tmp", "dev/shm"):
                    fs = os.statvfs(f"/proc/{pid}/root/{folder}")
                    total += (fs.f_blocks - fs.f_bfree) * fs.f_frsize
                return total
            except OSError:
                continue
        return 0

    def kill_all(self) -> None:
        """Kill every process of the kernel (a timeout ignored, memory over the cap, shutdown)."""
        pids = self.pids()
        for pid in pids:
            _kill(pid)
        if self.cgroup is not None:
            self.cgroup.kill_all()

    def death_reason(self) -> str | None:
        """Why the kernel died, when a limit killed it; cleared once read."""
        if self.watchdog is not None and self.watchdog.tripped is not None:
            used, self.watchdog.tripped = self.watchdog.tripped, None
            return (
                f"[vault-runner: the kernel used {format_size(used)} of memory, more than its limit of "
                f"{format_size(self.policy.memory or 0)}, and was stopped; use less memory or raise the "
                "note's `memory:` option]"
            )
        if self.cgroup is not None and self.cgroup.memory and self.cgroup.oom_killed():
            return (
                f"[vault-runner: the kernel went over its memory limit of {format_size(self.policy.memory or 0)} "
                "and was stopped; use less memory or raise the note's `memory:` option]"
            )
        return None

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        release_gpu(self.gpu)
        self.gpu = None


def _readable_outside(hidden: list[Path]) -> list[Path]:
    """Landlock read grants: the whole tree but the hidden folders and block devices."""
    grants: list[Path] = []

    def walk(folder: Path) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for entry in entries:
            real = Path(os.path.realpath(entry))
            if real in hidden or entry in hidden:
                continue
            if any(real in h.parents or entry in h.parents for h in hidden):
                walk(entry)  # an ancestor of a hidden folder: grant its other entries
            elif entry == Path("/dev"):
                grants.extend(_readable_devices())
            else:
                grants.append(entry)

    walk(Path("/"))
    return grants


def _readable_devices() -> list[Path]:
    import stat

    out = []
    for entry in sorted(Path("/dev").iterdir()):
        if entry.is_symlink():
            continue  # /dev/stdout, /dev/fd ...: they point into /proc, which is readable
        try:
            mode = entry.stat().st_mode
        except OSError:
            continue
        if stat.S_ISBLK(mode):
            continue  # raw disks would bypass every file permission for root
        if stat.S_ISDIR(mode) and entry.name not in {"pts", "shm", "nvidia-caps", "dri", "hugepages", "mqueue"}:
            continue
        out.append(entry)
    return out


def _user_tasks() -> int:
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


# -- doctor --------------------------------------------------------------------------------
@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        self.lines.append((key, value))


_FILESYSTEM = {
    "bubblewrap": "root read-only; vault writable (not .obsidian, .git, vault-runner.toml); homes hidden "
    "(read-only, empty); private /tmp, /run, /var/tmp",
    "landlock": "read all but homes and /tmp; write the vault's sub-folders (not .obsidian, .git), "
    "a private temp folder",
    "plain": "no isolation: kernels can read and write everything you can",
}


def doctor_report() -> Report:
    """What `vault-runner doctor` prints about the sandbox (admin_cli adds Python/torch)."""
    report = Report()
    try:
        found = probe()
    except SandboxError as exc:
        report.add("sandbox tier", f"error: {exc}")
        return report
    report.add("sandbox tier", f"{found.tier} ({found.reason})")
    if found.tier == "plain":
        report.add("warning", PLAIN_WARNING.strip("[]"))
    elif found.tier == "landlock":
        report.add(
            "warning",
            "bubblewrap is not in use: the Landlock tier has no private /tmp or pid namespace, "
            "and `network: false` only refuses TCP; install bubblewrap for the full sandbox",
        )
    version = found.bwrap_version or "not installed"
    if found.bwrap:
        version += f" at {found.bwrap}; user namespaces: {'yes' if found.bwrap_userns else 'no'}"
        version += f"; network namespaces: {'yes' if found.bwrap_netns else 'no'}"
    report.add("bubblewrap", version)
    report.add("filesystem", _FILESYSTEM[found.tier])
    report.add("interrupts", "message on the control channel" if found.tier == "bubblewrap" else "SIGINT")
    report.add("landlock", f"ABI {found.landlock_abi}" if found.landlock_abi else "not available")
    report.add("cgroups", cgroup_support())
    memory, origin = default_memory()
    report.add("memory cap", f"{format_size(memory)} per kernel ({origin}; a note's `memory:` option overrides it)"
               if memory else "none")  # fmt: skip
    how_memory = (
        "cgroup v2 memory.max" if cgroup_support().startswith("cgroup v2 (memory") else "watchdog on resident memory"
    )
    report.add("memory enforcement", how_memory)
    tasks = default_max_tasks()
    support = cgroup_support()
    if tasks and "pids" in support:
        report.add("process+thread cap", f"{tasks} per kernel (pids cgroup; {MAX_TASKS_ENV} overrides)")
    elif tasks and os.geteuid() != 0:
        report.add("process+thread cap", f"{tasks} per kernel (RLIMIT_NPROC)")
    else:
        report.add("process+thread cap", "none: no writable pids cgroup, and RLIMIT_NPROC does not apply to root")
    report.add("core dumps", "off (RLIMIT_CORE 0)")
    network = (
        "off for every kernel"
        if os.environ.get(NO_NETWORK_ENV, "") in {"1", "true"}
        else "on (a note's `network: false` turns it off)"
    )
    report.add("network", network)
    from .kernel import INTERRUPT_GRACE, MAX_IMAGE_BYTES, MAX_IMAGES, MAX_OUTPUT_BYTES

    report.add("output cap", f"{format_size(MAX_OUTPUT_BYTES)} per block; {MAX_IMAGES} images of at most "
               f"{format_size(MAX_IMAGE_BYTES)} each")  # fmt: skip
    report.add("timeout", f"per block (option `timeout`); interrupt, then restart after {INTERRUPT_GRACE:g} s")
    nodes = nvidia_device_nodes()
    report.add("nvidia device nodes", ", ".join(nodes) if nodes else "none")
    return report
