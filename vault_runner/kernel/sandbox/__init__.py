"""How a kernel is launched: isolation tier, limits and GPU placement.

Tiers, chosen once per process by actually trying them (``VAULT_RUNNER_SANDBOX`` forces one):

- ``bubblewrap``: the kernel runs in ``bwrap`` with the whole filesystem read-only, a
  private ``/tmp``, ``/run`` and ``/var/tmp``, the home folders hidden behind an empty
  read-only tmpfs, its own pid and user namespace (as root, uid 1000 inside: `kernel_ids`),
  and ``--unshare-net`` when the note says ``network: false``. Writable: the whole vault (the kernel's cwd is the
  note's folder, and notes read and write data files anywhere in their vault), except the
  protected entries (protected.py: ``.obsidian`` and ``.git`` at any depth,
  ``vault-runner.toml``), read-only so a note cannot plant an Obsidian plugin or a git hook
  that would run outside the sandbox. A symlink in the vault that points outside it leads
  nowhere: the outside path does not exist in there.
- ``landlock``: the same policy enforced by the kernel's Landlock LSM, applied by the
  launcher before ipykernel starts: read everything but the home folders and the shared
  temp folders; write the vault, a private temp folder and the ipc folder. Where the
  launcher can make a mount namespace (mounts.py: as root, or with user namespaces) the
  kernel has its own /dev/shm and /dev/pts and the protected entries are read-only mounts,
  as under bubblewrap; elsewhere Landlock grants write only around the protected entries
  (so nothing new directly in the vault root: the note is told why), and /dev/shm and
  /dev/pts are refused. With ``network: false`` TCP connect/bind are refused (ABI 4+).
  A fork template with mounts is launched without the ruleset (`forks_apply_landlock`):
  Landlock refuses mounts, and each forked kernel makes its own devices, then applies it.
- ``plain``: an ordinary process, with a visible warning in the note and in ``doctor``; it
  gets only its own temp, cache and matplotlib folders.

In every tier the `ProtectedGuard` (protected.py) stops a kernel that makes a protected
name no mount or rule could refuse, and moves what it made out of the vault. What a kernel
writes to its caches (MPLCONFIGDIR, XDG_CACHE_HOME, IPYTHONDIR, TMPDIR) is its own.

With ``network: false`` every tier also gets the seccomp filter of seccomp.py (no
``connect`` at all, no datagram sockets), which closes unix sockets and UDP; network.py
says what that leaves open here (``doctor``, and a warning in the note when it is not all).

Limits, in every tier: a per-block timeout (kernel/session.py), no core dumps, a memory cap
(a memory cgroup, v2 or v1, when this process may create cgroups, else a watchdog thread
that kills the kernel when the resident memory of its processes passes the cap; never
RLIMIT_AS, which breaks CUDA), the memory budget of all kernels together (a parent memory
cgroup where there is one, and the watchdog's choice of the kernel to stop: cgroup.py,
processes.py), and a cap on processes+threads (a pids cgroup, v2 or v1, when writable;
else RLIMIT_NPROC, which only counts per sandbox for a non-root user in bubblewrap's user
namespace).

The package, one concern a module: probe.py (which tier works), policy.py (what a kernel
may do), filesystem.py (what it sees), gpu.py (device nodes, GPU placement), cgroup.py,
processes.py (process tree, memory, watchdog), launch.py (the launcher script, run by
path), seccomp.py and network.py (`network: false`), doctor.py (what `doctor` prints).
`Sandbox` here puts them together for one kernel.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vault_runner.errors import SandboxError
from vault_runner.kernel.sandbox import network, ptys
from vault_runner.kernel.sandbox.cgroup import Cgroup
from vault_runner.kernel.sandbox.doctor import Report, doctor_report
from vault_runner.kernel.sandbox.filesystem import (
    empty_home,
    hidden_roots,
    kernel_mpl_dir,
    python_paths,
    readable_outside,
)
from vault_runner.kernel.sandbox.gpu import claim_gpu, nvidia_device_nodes, release_gpu
from vault_runner.kernel.sandbox.policy import MEMORY_ENV, Policy, default_memory, format_size, policy_from_options
from vault_runner.kernel.sandbox.probe import PLAIN_WARNING, SANDBOX_ENV, Probe
from vault_runner.kernel.sandbox.probe import probe as probe_tier  # `probe` names the module
from vault_runner.kernel.sandbox.processes import (
    MemoryWatchdog,
    kill_pid,
    launcher_command,
    memory_budget,
    process_tree,
    signal_process,
    user_tasks,
    wrapped_process,
)
from vault_runner.kernel.sandbox.protected import (
    ProtectedGuard,
    existing_protected,
    names_spec,
    names_supervised,
    pinned_folders,
    quarantine_dir,
    write_grants,
    write_root_hint,
)

__all__ = ("Policy", "Probe", "Report", "Sandbox", "doctor_report", "policy_from_options")


# The kernel's ids inside bubblewrap's user namespace when vault-runner runs as root: they
# stand for root outside (files it makes are root's, as before). Not 0 inside: a forked kernel
# maps its own uid into a user namespace of its own (its /dev/shm, mounts.py), and Linux 5.12+
# lets only a process that had CAP_SETFCAP map uid 0; none in the sandbox has it.
ROOT_KERNEL_IDS = (1000, 1000)


def kernel_ids() -> tuple[int, int]:
    """The uid and gid a bubblewrap kernel has inside its user namespace."""
    return ROOT_KERNEL_IDS if os.getuid() == 0 else (os.getuid(), os.getgid())


class Sandbox:
    """The isolation and limits of one KernelSession; see the module docstring."""

    def __init__(self, policy: Policy, tier: str | None = None, *, watch_vault: bool = True) -> None:
        self.policy = policy
        # Watch the vault for protected names its kernel makes (protected.py); off for a fork
        # template's sandbox, which runs no note's code (each forked kernel's own watches).
        self.watch_vault = watch_vault
        self.protected: list[Path] = []  # the vault's protected entries at launch
        self.probe = probe_tier()
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
        self.mpl_dir: Path | None = None
        self.guard: ProtectedGuard | None = None
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
        gap = None if self.policy.network else network.not_covered(self.tier, self.probe)
        if gap is not None:
            out.append(f"[vault-runner: warning: network: false is not fully enforced here: {gap}]")
        return out

    def describe(self) -> dict[str, Any]:
        """Limits in force for this kernel (doctor, reports)."""
        memory = "none"
        cgroup = self.cgroup
        if self.policy.memory:
            how = f"cgroup v{cgroup.version} memory cap" if cgroup and cgroup.memory else "resident-memory watchdog"
            memory = f"{format_size(self.policy.memory)} ({how})"
        if self.policy.budget:
            how = "a cgroup over them all" if cgroup and cgroup.budget else "a resident-memory watchdog"
            memory += f"; {format_size(self.policy.budget)} for all running kernels together ({how})"
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
                self.nproc = user_tasks() + self.policy.max_tasks
        if self.tier != "bubblewrap":  # bubblewrap's /tmp is private already
            self.private_tmp = Path(tempfile.mkdtemp(prefix="vr-tmp-", dir=runtime_dir))
        if self.tier == "landlock" and self.private_tmp is not None:
            if not self.probe.landlock_mounts and self.policy.vault is not None:
                write_root_hint(self.private_tmp / ".ipython", self.policy.vault)
            if not self.probe.landlock_mounts:
                startup = self.private_tmp / ".ipython" / "profile_default" / "startup"
                startup.mkdir(parents=True, exist_ok=True)
                (startup / "00-vault-runner-ptys.py").write_text(ptys.STARTUP, encoding="utf-8")
        self.mpl_dir = kernel_mpl_dir(runtime_dir)
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
        if self.policy.vault is not None and self.watch_vault:
            self.guard = ProtectedGuard(self.policy.vault, self.kill_all, quarantine_dir())
            self.guard.start()
            self.protected = sorted(self.guard.allowed)
        elif self.policy.vault is not None:
            self.protected = existing_protected(self.policy.vault)
        own = self.policy.memory if not (self.cgroup and self.cgroup.memory) else None  # else memory.max
        if own or self.policy.budget:
            shared = self.cgroup.budget if self.cgroup is not None else None  # the cgroup over all its kernels
            budget = memory_budget(self.policy.budget, shared.at_limit if shared is not None else None)
            self.watchdog = MemoryWatchdog(own, self.pids, self.kill_all, self._tmpfs_used, budget)
            self.watchdog.start()

    def adopt_cgroup(self, cgroup: Cgroup) -> bool:
        """Make `cgroup`, which a spare kernel joined before its note was known (joining
        takes ~10 ms on cgroup v1), this kernel's in place of the one `setup` made: the
        note's caps go on it before the note's code runs. False where this kernel wants no
        cgroup or the caps cannot be set: then the caller moves the kernel into ours."""
        ours = self.cgroup
        if ours is None or not ours.same_place(cgroup):
            return False  # it must hold the kernel as the one `setup` made would
        if not cgroup.limit(self.policy):
            return False
        self.cgroup = cgroup
        ours.remove()
        return True

    def env(self) -> dict[str, str]:
        """Environment additions for the kernel (per tier: where temp and cache files go)."""
        env = {"JUPYTER_RUNTIME_DIR": str(self.runtime_dir or "")}
        if self.mpl_dir is not None:
            env["MPLCONFIGDIR"] = str(self.mpl_dir)  # the kernel's own: nothing in it reaches another
        if self.tier == "bubblewrap":
            env.update(TMPDIR="/tmp", IPYTHONDIR="/tmp/.ipython", XDG_CACHE_HOME="/tmp/.cache")
            if os.getuid() == 0:
                # uid 1000 inside (kernel_ids) may have no name there: getpass asks these first.
                env.update(USER="root", LOGNAME="root")
        elif self.private_tmp is not None:  # the kernel's own, also in the plain tier
            tmp = str(self.private_tmp)
            if self.tier == "landlock":
                env["HOME"] = str(empty_home())  # the real one is unreadable there
            env.update(TMPDIR=tmp, IPYTHONDIR=f"{tmp}/.ipython", XDG_CACHE_HOME=f"{tmp}/.cache")
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        return env

    @property
    def interrupt_mode(self) -> str:
        # Under bubblewrap the kernel sits in its own session inside a pid namespace: a SIGINT
        # to the bwrap process group does not reach it (and would end bwrap), so jupyter_client
        # is told to send a message; the session signals the kernel itself (interrupt_target).
        return "message" if self.tier == "bubblewrap" else "signal"

    def interrupt_target(self) -> tuple[int, int] | None:
        """(pid, start) of the kernel process inside bubblewrap, as the host sees it, for the
        session's SIGINT: a message is only read when the kernel lets go of the GIL, which a
        catastrophic regex never does. None in the other tiers: jupyter_client's SIGINT to the
        kernel's process group reaches it."""
        root = self._root_pid()
        if self.tier != "bubblewrap" or self.probe.bwrap is None or root is None:
            return None
        return wrapped_process(root, self.probe.bwrap)

    def interrupt(self, pid: int, start: int) -> bool:
        """SIGINT to the process `interrupt_target` found, if it is still that process."""
        return signal_process(pid, start, signal.SIGINT)

    def wrap(self, argv: list[str], *, fork_template: bool = False) -> list[str]:
        """The full launch command for a kernel command line. `fork_template`: a fork
        template's: no hardening filter (each fork applies it), and where
        `forks_apply_landlock`, its namespace but no Landlock ruleset."""
        outer: dict[str, Any] = {"core": 0}
        if self.cgroup is not None:
            outer["cgroup"] = [str(folder) for folder in self.cgroup.folders]
        if self.tier == "landlock":
            forks_apply = fork_template and self.forks_apply_landlock
            if forks_apply:
                # Each fork makes its mounts in this namespace, then applies the ruleset
                # (launch.py enter_kernel_domain): the template keeps the capabilities of a
                # user namespace of its own for that, none of the host's.
                outer.update(no_new_privs=True, keep_caps=True)
            ruleset = self.landlock_spec()
            if not forks_apply:
                outer["landlock"] = ruleset
                outer["drop_caps"] = os.geteuid() == 0
            if self.probe.landlock_mounts:
                readonly = [str(p) for p in self.protected]
                pinned = [str(p) for p in self._pinned()]
                outer["namespace"] = {
                    "shm_size": self._tmpfs_size(),
                    "readonly": readonly,
                    "pinned": pinned,
                    "hide": self._temp_hidden(ruleset),
                }
                if forks_apply:
                    outer["namespace"]["user"] = True
            else:
                outer["pty_broker"] = True  # `!cmd` without /dev/pts (ptys.py)
            if self.nproc:
                outer["nproc"] = self.nproc
        elif self.tier == "plain" and self.nproc:
            outer["nproc"] = self.nproc
        # The seccomp filter goes on last, right before the kernel: inside bubblewrap, so
        # bwrap itself runs unfiltered (it sets up the network namespace over netlink).
        no_network = not self.policy.network and network.seccomp_works()
        if no_network and self.tier != "bubblewrap":
            outer["no_network"] = True
        # A template's forks each apply it themselves, once their own user namespace is made.
        harden = self.tier != "plain" and not fork_template and network.hardening_works()
        # Then the supervisor that refuses protected names as they are made (protected.py).
        names = self.names_spec() if harden else None
        if harden and self.tier != "bubblewrap":
            outer.update(harden=True, **({"names": names} if names else {}))
        launcher = launcher_command()
        command = list(argv)
        if self.tier == "bubblewrap":
            inner = {**({"nproc": self.nproc} if self.nproc else {}), **({"no_network": True} if no_network else {})}
            inner.update({"harden": True} if harden else {})
            inner.update({"names": names} if names else {})
            if inner:
                command = [*launcher, json.dumps(inner), "--", *command]
            command = [*self.bwrap_args(), "--", *command]
        return [*launcher, json.dumps(outer), "--", *command]

    def names_spec(self) -> dict[str, object] | None:
        """The names spec of name_supervisor.py for this sandbox's kernels, where it works."""
        if self.tier == "plain" or self.policy.vault is None or not names_supervised():
            return None
        return names_spec(self.policy.vault)

    @property
    def forks_apply_landlock(self) -> bool:
        """Whether kernels forked from a template of this sandbox each apply the Landlock
        tier's ruleset themselves: with its own mounts, so that each can make its own
        /dev/shm, ptys and IPC namespace first (Landlock refuses mounts to a process in a
        domain, which the template then is not)."""
        return self.tier == "landlock" and self.probe.landlock_mounts

    def bwrap_args(self) -> list[str]:
        assert self.probe.bwrap is not None and self.runtime_dir is not None
        # tmpfs files live in memory: bound them by the memory cap (the watchdog counts them too).
        size = ["--size", str(self._tmpfs_size())] if self._tmpfs_size() else []
        args = [self.probe.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", *size, "--tmpfs", "/dev/shm"]
        args += ["--proc", "/proc"]
        args += ["--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session"]
        # ipykernel takes a parent pid of 1 (its parent in the pid namespace) for "orphaned";
        # a parent pid of 1 turns that watch off; --die-with-parent ends the kernel instead.
        args += ["--setenv", "JPY_PARENT_PID", "1"]
        if self.probe.bwrap_userns:
            uid, gid = kernel_ids()
            args += ["--unshare-user", "--uid", str(uid), "--gid", str(gid)]
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
        for path in python_paths():
            if any(h == path or h in path.parents for h in hidden):
                args += ["--ro-bind", str(path), str(path)]
        args += ["--bind", str(self.runtime_dir), str(self.runtime_dir)]
        writable = self.policy.vault or self.policy.cwd
        args += ["--bind", str(writable), str(writable)]
        # The folders holding them, each its own mount: a note cannot rename one (EBUSY) to
        # move the user's .git aside and make its own at the old path (protected.py).
        for folder in self._pinned():
            args += ["--bind", str(folder), str(folder)]
        # Protected entries (protected.py) that exist, at any depth: read-only. Those made
        # later are the name supervisor's (and the guard's): no mount can refuse a name.
        for protected in self.protected:
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
        read = [str(p) for p in readable_outside(hidden)]
        read += [str(p) for p in python_paths()]
        if self.policy.network and Path("/run/systemd/resolve").is_dir():
            read.append("/run/systemd/resolve")  # /etc/resolv.conf often points in there
        # /dev/shm and /dev/pts only when they are the kernel's own (mounts.py): the host's
        # hold other programs' shared memory and the user's terminals.
        mounts = self.probe.landlock_mounts
        write = [str(self.runtime_dir), *(["/dev/shm"] if mounts else [])]
        read.append(str(empty_home()))
        if self.private_tmp is not None:
            write.append(str(self.private_tmp))
        vault = self.policy.vault
        if vault is not None:
            read.append(str(vault))
            if mounts:
                write.append(str(vault))  # its protected entries are read-only mounts
            else:
                # Around the protected entries: a folder holding one (the root) is not granted.
                write += [str(p) for p in write_grants(vault, self.protected)]
            if vault != self.policy.cwd and not self.policy.cwd.is_relative_to(vault):
                write.append(str(self.policy.cwd))
        else:
            write.append(str(self.policy.cwd))
        files = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx"]
        if mounts:
            files.append("/dev/pts")  # its own instance: `!cmd` needs a pty
            read.append("/dev/pts")  # listed too: nothing in it is another's
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

    def _tmpfs_size(self) -> int | None:
        """The size of the kernel's private tmpfs (/dev/shm, bubblewrap's /tmp): its files are
        memory, so never more than the note's cap or the budget of all kernels (a fork
        template's own policy has neither: the default budget)."""
        return self.policy.memory or self.policy.budget or default_memory()[0]

    def _temp_hidden(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The shared temp folder, to be covered in the kernel's mount namespace but for the
        folders it is granted there (its runtime folder; the vault, where it lies there):
        what other kernels bind in it is then out of reach by path (mounts.py)."""
        temp = Path(tempfile.gettempdir()).resolve()
        granted = {
            Path(p).resolve()
            for p in [*spec["read"], *spec["write"], self.policy.cwd, self.policy.vault or self.policy.cwd]
            if Path(p).is_dir() and Path(p).resolve().is_relative_to(temp) and Path(p).resolve() != temp
        }
        outermost = sorted(p for p in granted if not any(q in p.parents for q in granted))
        return {"folder": str(temp), "keep": [str(p) for p in outermost]}

    def _pinned(self) -> list[Path]:
        """Folders holding protected entries, bound onto themselves (protected.py); never one
        that is, or lies below, a symlink now: a bind through it would mount what it points at."""
        vault = self.policy.vault
        if vault is None:
            return []
        return [p for p in pinned_folders(vault, self.protected) if os.path.realpath(p) == str(p)]

    def _tmpfs_used(self, pids: list[int]) -> int:
        """Bytes in the kernel's private /tmp and /dev/shm, in any tier: tmpfs files are memory
        too. Private: another filesystem than the host's folder of that name."""
        folders = ("tmp", "dev/shm")
        host = {}
        for folder in folders:
            try:
                host[folder] = os.stat(f"/{folder}").st_dev
            except OSError:
                host[folder] = None
        for pid in reversed(pids):
            total, private = 0, False
            try:
                for folder in folders:
                    path = f"/proc/{pid}/root/{folder}"
                    if os.stat(path).st_dev == host[folder]:
                        continue  # the host's (or the launcher's, outside the kernel's mounts)
                    fs = os.statvfs(path)
                    total += (fs.f_blocks - fs.f_bfree) * fs.f_frsize
                    private = True
            except OSError:
                continue
            if private:
                return total
        return 0

    def kill_all(self) -> None:
        """Kill every process of the kernel (a timeout ignored, memory over the cap, shutdown)."""
        pids = self.pids()
        for pid in pids:
            kill_pid(pid)
        if self.cgroup is not None:
            self.cgroup.kill_all()

    def death_reason(self) -> str | None:
        """Why the kernel died, when a limit killed it; cleared once read."""
        if self.guard is not None and self.guard.tripped is not None:
            reason, self.guard.tripped = self.guard.tripped, None
            return reason
        watchdog = self.watchdog
        own_cap = self.policy.memory
        if watchdog is not None and watchdog.tripped is not None and watchdog.shared:
            # A kernel that alone holds nearly its own cap's worth, a cap no larger than the
            # budget (by default its size), is told of its cap: the kernels it was measured
            # with hold next to nothing.
            budget = self.policy.budget or 0
            if own_cap is None or own_cap > budget or watchdog.tripped < 0.9 * own_cap:
                used, watchdog.tripped = watchdog.tripped, None
                return self._budget_message(used)
        if watchdog is not None and watchdog.tripped is not None:
            used, watchdog.tripped = watchdog.tripped, None
            return (
                f"[vault-runner: the kernel used {format_size(used)} of memory, more than its limit of "
                f"{format_size(self.policy.memory or 0)}, and was stopped; use less memory or raise the "
                "note's `memory:` option]"
            )
        if self.cgroup is not None and self.cgroup.memory and self.cgroup.oom_killed():
            budget_kill = self.cgroup.budget is not None and self.cgroup.budget.killed_at_limit()
            if budget_kill and not self.cgroup.reached_own_limit():
                return self._budget_message(self.cgroup.budget.total)  # type: ignore[union-attr]
            return (
                f"[vault-runner: the kernel went over its memory limit of {format_size(self.policy.memory or 0)} "
                "and was stopped; use less memory or raise the note's `memory:` option]"
            )
        return None

    def _budget_message(self, used: int) -> str:
        return (
            f"[vault-runner: the kernel was stopped at {format_size(used)} of memory: with the other "
            f"running kernels it went over the memory budget of {format_size(self.policy.budget or 0)} that "
            f"all kernels share ({MEMORY_ENV}, default 80% of RAM); use less memory, run fewer notes at "
            "a time (-j), or raise the budget]"
        )

    def reset(self) -> None:
        """Undo what `setup` made to hold a kernel (memory watchdog, cgroup, process cap),
        so that `setup` can run again: a forked try that falls back to a normal start."""
        self._release_limits()
        self.nproc = None

    def close(self) -> None:
        if self.guard is not None:
            self.guard.stop()  # a last look, once nothing of the kernel is left
            self.guard = None
        self._release_limits()
        release_gpu(self.gpu)
        self.gpu = None

    def _release_limits(self) -> None:
        watchdog, self.watchdog = self.watchdog, None
        if watchdog is not None:
            watchdog.stop()
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is not None:
            cgroup.remove()
