"""Kernel launcher: apply the sandbox's limits to this process, then exec the real command.

Run as a script (``python -I -S launch.py SPEC -- argv...``) before ipykernel
starts, so that everything the kernel later forks inherits the limits. Standard library
only: it runs with ``-S`` to start fast, and also inside bubblewrap.

SPEC is a JSON object:
  cgroup     a cgroup folder, or a list of them (one per v1 hierarchy), to join (each
             ``cgroup.procs`` file), so a pids/memory limit covers every process the kernel forks
  core       RLIMIT_CORE (0: no core dumps in the note's folder)
  nproc      RLIMIT_NPROC, only set where it counts per sandbox (not as root)
  landlock   {"read": [...], "write": [...], "files": [...], "network": bool}
  drop_caps  drop every capability (root in the Landlock tier)
  no_new_privs  set PR_SET_NO_NEW_PRIVS (always with landlock)
  namespace  {"shm_size": ..., "readonly": [...], "pinned": [...]}: a mount namespace first (mounts.py)
  keep_caps  a fork template's (no landlock): keep CAP_SYS_ADMIN of its namespace's own
             user namespace ("user" in namespace), for its forks' mounts (enter_kernel_domain)
  pty_broker  fork the pty helper of ptys.py before Landlock (Landlock without mounts)
  no_network    the seccomp filter of `network: false` (seccomp.py, loaded by path), last
  harden     seccomp.py's hardening filter (no setuid files, no user namespaces), last
  names      {"vault": ..., "anywhere": [...], "at_root": [...]}: after `harden`, the
             supervisor that refuses protected names as they are made (name_supervisor.py)
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import stat
import sys
from types import ModuleType

__all__ = (
    "apply",
    "apply_landlock",
    "drop_capabilities",
    "enter_kernel_domain",
    "enter_nested_domain",
    "enter_own_devices",
    "apply_hardening",
    "landlock_abi",
    "main",
    "own_devices_work",
    "set_non_dumpable",
    "supervise_names",
)

# Landlock (linux/landlock.h). Syscall numbers are the same on every architecture.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_DUMPABLE = 4
_PR_SET_PDEATHSIG = 1
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_RULE_NET_PORT = 2

# The access rights of linux/landlock.h, each the next bit, in the header's order.
(
    FS_EXECUTE,
    FS_WRITE_FILE,
    FS_READ_FILE,
    FS_READ_DIR,
    FS_REMOVE_DIR,
    FS_REMOVE_FILE,
    FS_MAKE_CHAR,
    FS_MAKE_DIR,
    FS_MAKE_REG,
    FS_MAKE_SOCK,
    FS_MAKE_FIFO,
    FS_MAKE_BLOCK,
    FS_MAKE_SYM,
    FS_REFER,  # ABI 2
    FS_TRUNCATE,  # ABI 3
) = (1 << bit for bit in range(15))
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# Everything that changes a tree; the whole set is "handled", so it is denied unless granted.
WRITE = (
    FS_WRITE_FILE
    | FS_REMOVE_DIR
    | FS_REMOVE_FILE
    | FS_MAKE_CHAR
    | FS_MAKE_DIR
    | FS_MAKE_REG
    | FS_MAKE_SOCK
    | FS_MAKE_FIFO
    | FS_MAKE_BLOCK
    | FS_MAKE_SYM
)
# What the kernel may do in the folders it can write (never make device nodes).
WRITE_GRANT = WRITE & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK)
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def landlock_abi() -> int:
    """The Landlock ABI version of the running kernel, 0 when there is none."""
    try:
        libc = _libc()
        libc.syscall.restype = ctypes.c_long
        version = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return max(int(version), 0)


def apply_landlock(spec: dict) -> int:
    """Restrict this process (and what it execs) to the spec; return the ABI used."""
    abi = landlock_abi()
    if abi < 1:
        raise OSError("Landlock is not available in this kernel")
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    handled_fs = READ | WRITE
    if abi >= 2:
        handled_fs |= FS_REFER
    if abi >= 3:
        handled_fs |= FS_TRUNCATE
    handled_net = 0 if spec.get("network", True) or abi < 4 else NET_BIND_TCP | NET_CONNECT_TCP
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = _RulesetAttr(handled_fs, handled_net, scoped)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    fd = _create_ruleset(libc, attr, size)
    write = WRITE_GRANT | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    try:
        for path in spec.get("read", []):
            _add_rule(libc, fd, path, READ)
        for path in spec.get("write", []):
            _add_rule(libc, fd, path, READ | write)
        for path in spec.get("files", []):  # single files written in place (/dev/null ...)
            _add_rule(libc, fd, path, FILE_RIGHTS & handled_fs)
        if handled_net:
            # Port 0 is "any free port": ipykernel binds one on 127.0.0.1 for the output of
            # forked children. Connecting anywhere stays refused.
            rule = _NetPort(NET_BIND_TCP, 0)
            libc.syscall(_SYS_ADD_RULE, fd, _RULE_NET_PORT, ctypes.byref(rule), ctypes.c_uint32(0))
        _restrict_self(libc, fd)
    finally:
        os.close(fd)
    return abi


def enter_nested_domain(write: list[str] | None = None, files: list[str] | None = None) -> str:
    """Put this process in a Landlock domain of its own, nested in the one it is in.

    Landlock keeps a process from ptracing, or opening /proc/PID/mem of, any process
    outside its own domain or those nested in it (ABI 1), and from signalling them or
    reaching their abstract unix sockets (ABI 6 scopes). A kernel forked from a template
    calls it first: it can then touch neither the template nor its siblings. With `write`
    the new domain also lets it change only those folders (and write only `files`, device
    nodes), whatever the outer domain allows; without, it takes no file right away (FS_REFER
    is handled and granted on /: a ruleset that does not handle it refuses every rename
    across folders). Landlock restricts the calling thread only: call it while
    single-threaded (right after fork). Where there is no Landlock, the process is made
    non-dumpable instead (ptrace and /proc/PID/mem then need CAP_SYS_PTRACE, which no
    sandboxed kernel has; signals and writes are not covered). Returns what was done:
    "landlock ABI N" or "non-dumpable"."""
    abi = landlock_abi()
    libc = _libc()
    if abi < 1:
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
        return "non-dumpable"
    libc.syscall.restype = ctypes.c_long
    refer = FS_REFER if abi >= 2 else 0
    truncate = FS_TRUNCATE if abi >= 3 else 0
    handled = (FS_MAKE_BLOCK if write is None else WRITE | truncate) | refer
    attr = _RulesetAttr(handled, 0, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    fd = _create_ruleset(libc, attr, 24 if abi >= 6 else 8)
    try:
        if refer:
            _add_rule(libc, fd, "/", refer)  # renames across folders: as the outer domain allows
        for path in write or []:
            _add_rule(libc, fd, path, handled & WRITE_GRANT | truncate | refer)
        for path in files or []:
            _add_rule(libc, fd, path, FS_WRITE_FILE | truncate)
        _restrict_self(libc, fd)
    finally:
        os.close(fd)
    return f"landlock ABI {abi}"


def _create_ruleset(libc: ctypes.CDLL, attr: _RulesetAttr, size: int) -> int:
    """A new ruleset's descriptor; `size` is how much of `attr` the running ABI reads."""
    fd = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    return int(fd)


def _restrict_self(libc: ctypes.CDLL, ruleset: int) -> None:
    """Enforce the ruleset on this thread and what it execs (no new privileges first, as Landlock requires)."""
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")


def _add_rule(libc: ctypes.CDLL, ruleset: int, path: str, access: int) -> None:
    try:
        target = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path that does not exist grants nothing
    try:
        mode = os.fstat(target).st_mode
        if stat.S_ISDIR(mode):
            pass
        elif stat.S_ISREG(mode) or stat.S_ISCHR(mode):
            access &= FILE_RIGHTS
        else:
            return  # a pipe or socket (/dev/stderr ...): Landlock takes no rule for it
        rule = _PathBeneath(access, target)
        if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
    finally:
        os.close(target)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


CAP_SYS_ADMIN = 21


def drop_capabilities(keep: int | None = None) -> None:
    """Leave root's capabilities behind (raw I/O, ptrace, mounts ...), also across exec; all
    but `keep` (a capability's number), where given."""
    libc = _libc()
    for cap in range(64):
        if cap != keep:
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last capability
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if keep is not None:
        data[keep // 32].effective = data[keep // 32].permitted = 1 << (keep % 32)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def apply(spec: dict) -> None:
    cgroup = spec.get("cgroup")
    for folder in [cgroup] if isinstance(cgroup, str) else cgroup or []:
        # Join before exec: every later fork is born inside the cgroup and counted.
        with open(os.path.join(folder, "cgroup.procs"), "w") as handle:
            handle.write(str(os.getpid()))
    if "core" in spec:
        resource.setrlimit(resource.RLIMIT_CORE, (int(spec["core"]), int(spec["core"])))
    if spec.get("nproc"):
        resource.setrlimit(resource.RLIMIT_NPROC, (int(spec["nproc"]), int(spec["nproc"])))
    namespace = spec.get("namespace")
    if namespace is not None:
        # Private /dev/shm and /dev/pts, protected vault entries read-only (mounts.py).
        _sibling("mounts").enter(namespace)
    # Only a user namespace's own capabilities are kept (they reach its mount and IPC
    # namespaces, nothing of the host's): a fork template's, whose forks mount and drop them.
    keep = namespace is not None and namespace.get("user") and spec.get("keep_caps")
    if (spec.get("drop_caps") or namespace is not None) and not keep:
        drop_capabilities()  # also the new namespace's: no mount can be undone
    elif keep:
        drop_capabilities(keep=CAP_SYS_ADMIN)  # all its forks' mounts need, nothing more
    if spec.get("pty_broker"):
        _sibling("ptys").start_broker()  # no /dev/pts of its own: ptys come from a helper (ptys.py)
    if spec.get("landlock") is not None:
        apply_landlock(spec["landlock"])
    elif spec.get("no_new_privs"):
        _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if spec.get("no_network"):
        _sibling("seccomp").apply_no_network()
    if spec.get("harden"):
        apply_hardening(spec.get("names"))


def apply_hardening(names: dict | None = None) -> None:
    """seccomp.py's hardening filter: no setuid/setgid file, no user namespace of the
    kernel's own; then, with `names`, the supervisor of the names it makes
    (`supervise_names`). Last, right before the kernel (a forked one: once its domain is set)."""
    _sibling("seccomp").apply_hardening()
    if names is not None:
        supervise_names(names)  # only the kernel returns


def supervise_names(names: dict) -> None:
    """Fork: the child returns, filtered by seccomp.py's `install_names_filter`, to go on as
    the kernel; every name it, or anything it forks or execs, makes is then this process's
    to make or refuse (name_supervisor.py), and this process never returns: it serves,
    passes the signals it gets on to the kernel's process group, and exits as the kernel
    does. `names`: {"vault": path, "anywhere": [...], "at_root": [...]}. Call it
    single-threaded, after every other limit (mounts, capabilities, Landlock, hardening):
    the supervisor has them all.

    The supervisor is the kernel's parent, so an ancestor of every process the note starts:
    Yama (ptrace_scope 1) lets only ancestors read /proc/PID/mem. It keeps the pid whoever
    started the kernel knows (jupyter_client, the fork template), and its process group;
    the kernel leads a group of its own (signals come to it once, passed on). A kernel that
    cannot be filtered exits 126 and so does this process: no kernel runs without it."""
    # Imported here: the launcher of a kernel without a supervisor starts without them.
    import gc
    import signal
    import socket

    seccomp, served = _sibling("seccomp"), _sibling("name_supervisor")
    libc = _libc()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    kernel = os.fork()
    if kernel == 0:
        try:
            ours.close()
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the supervisor died before prctl
                os._exit(126)
            os.setpgid(0, 0)
            if landlock_abi() >= 6:  # signals scoped (ABI 6): the note cannot stop its supervisor
                enter_nested_domain()
            listener = seccomp.install_names_filter()
            try:
                socket.send_fds(theirs, [b"L"], [listener])
            finally:
                os.close(listener)  # only the supervisor may hold it: whoever has it answers
            if theirs.recv(1) != b"K":  # non-dumpable, serving: the note may run
                os._exit(126)
            theirs.close()
            return
        except BaseException as exc:
            os.write(2, f"vault-runner: the kernel's name supervisor could not be set up: {exc}\n".encode())
            os._exit(126)
    theirs.close()
    status = 126 << 8
    try:
        # A fork template's handlers, or KeyboardInterrupt: none here; no stop from a terminal.
        for number in (*served.FORWARDED, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(number, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        # A fork of the kernel (of a template with torch loaded): a collection would touch
        # every object, copying the pages it shares with the kernel. It makes no cycles.
        gc.disable()
        gc.freeze()
        os.chdir("/")
        supervisor = served.Supervisor(names, seccomp.name_calls())
        _, fds, _, _ = socket.recv_fds(ours, 4, 1)
        if fds:
            supervisor.listener = seccomp.Listener(fds[0])
            ours.send(b"K")
            ours.close()
            _close_all_but(fds[0], 0, 1, 2)  # the template's or launcher's: the kernel's now
            status = supervisor.run(kernel)
        else:
            status = os.waitpid(kernel, 0)[1]
    except BaseException as exc:
        os.write(2, f"vault-runner: the kernel's name supervisor failed: {exc!r}\n".encode())
        try:
            os.killpg(kernel, signal.SIGKILL)
        except OSError:
            pass
    finally:
        _exit_as(status)


def _close_all_but(*keep: int) -> None:
    """Close every descriptor of this process but `keep`."""
    for fd in sorted(int(fd) for fd in os.listdir("/proc/self/fd")):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _exit_as(status: int) -> None:
    """Exit as a child that ended with wait status `status` did."""
    import signal

    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def enter_own_devices(hide: dict | None = None) -> None:
    """A /dev/shm, /dev/pts and IPC namespace of this process's own, its siblings' runtime
    folders out of sight (`hide`, mounts.py): a forked kernel's first step, before
    enter_nested_domain; then drop_capabilities."""
    _sibling("mounts").enter_own_devices(hide)


def enter_kernel_domain(ruleset: dict, own_devices: bool, hide: dict | None = None) -> str:
    """A forked kernel of a template that runs outside Landlock (the Landlock tier with its
    own mounts: Landlock refuses mount(2) to a process in a domain): with `own_devices` its
    own /dev/shm, /dev/pts and IPC namespace first, then no capabilities, then the tier's
    whole `ruleset` (apply_landlock, with no_new_privs), as the launcher gives a started
    kernel. Its domain is its own: the template and its siblings are outside it (no ptrace,
    no /proc/PID/mem; no signal from ABI 6). Call it while single-threaded, right after fork."""
    libc = _libc()
    # The template is non-dumpable; a kernel is as a started one (and, as a user, must be
    # dumpable to write its own /proc/self/uid_map).
    if libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    if own_devices:
        enter_own_devices(hide)
    drop_capabilities()
    return f"landlock ABI {apply_landlock(ruleset)}"


def set_non_dumpable() -> None:
    """ptrace and /proc/PID/mem of this process then need CAP_SYS_PTRACE (a template outside Landlock)."""
    if _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def own_devices_work() -> bool | str:
    """Whether a fork of this process can `enter_own_devices` (True), else why not."""
    return _sibling("mounts").own_devices_work()


def _sibling(name: str) -> ModuleType:
    """A module next to this file, loaded by path: run as a script (-I -S), this launcher
    cannot import the package, and it must not import anything from the note's folder.
    Loaded once (a fork template's kernels each use mounts.py, and forks share it)."""
    import importlib.util

    if name in _siblings:
        return _siblings[name]

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_vault_runner_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _siblings[name] = module
    return module


_siblings: dict[str, ModuleType] = {}


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: launch.py SPEC -- COMMAND...", file=sys.stderr)
        return 2
    try:
        apply(json.loads(argv[0]))
    except OSError as exc:
        print(f"vault-runner: the kernel sandbox could not be set up: {exc}", file=sys.stderr)
        return 126
    os.execvp(argv[2], argv[2:])
    return 127  # pragma: no cover - execvp does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
