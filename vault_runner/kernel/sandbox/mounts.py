"""Private device folders for the Landlock tier, where this process may make a mount namespace.

Landlock grants by path and cannot hide what is already in a folder, so without a mount
namespace a Landlock kernel would share the host's ``/dev/shm`` (read and write other
programs' shared memory) and could only reach ``/dev/pts`` by opening every terminal of the
user. When this process can make a mount namespace (as root, or where unprivileged user
namespaces are allowed), `enter` gives the kernel, before Landlock is applied:

- a private, empty ``/dev/shm`` (tmpfs, as large as the kernel's memory cap or the budget
  of all kernels, and counted as the kernel's memory by its watchdog): multiprocessing
  locks, DataLoader workers and torch shared memory work, and nothing of the host's is there;
- a private ``/dev/pts`` instance (and ``/dev/ptmx`` into it): ``!cmd`` gets its pty, and no
  terminal of the user is reachable;
- an IPC namespace of its own: the host's SysV shared memory, semaphores and message queues
  are out of reach (they are not files: no Landlock rule covers them);
- read-only bind mounts over the vault's protected entries (``.obsidian``, ``.git``,
  ``vault-runner.toml``), so the vault root itself can be granted: a root-level note writes
  next to itself as under bubblewrap; and each folder holding one bound onto itself, so it
  cannot be renamed (protected.py, `pinned_folders`).

A kernel forked from a template (kernel/fork/child.py) makes its own the same way, right
after the fork (`enter_own_devices`): a /dev/shm, /dev/pts and IPC namespace of its own, so
that nothing a note leaves there reaches a sibling forked beside it or after it. In the
Landlock tier the template therefore runs outside Landlock (which refuses mounts), in a user
namespace of its own ("user"), and each fork applies the tier's ruleset after its mounts.

Standard library only: loaded by path by launch.py, before the kernel starts. Landlock then
forbids any further mount, and the capabilities of the new namespace are dropped.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ("enter", "enter_own_devices", "own_devices_work")

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    source_b = source.encode() if source is not None else None
    fstype_b = fstype.encode() if fstype is not None else None
    _check(libc.mount(source_b, target.encode(), fstype_b, flags, data.encode() or None), f"mount {target}")


def _unshare(libc: ctypes.CDLL, also: int = 0, user: bool = False) -> None:
    """A mount namespace of its own (and the namespaces in `also`): as root directly (unless
    `user`), else in a user namespace that maps only this process's own ids (files keep their
    owner, credentials passed on sockets stay valid)."""
    if os.geteuid() == 0 and not user and libc.unshare(_CLONE_NEWNS | also) == 0:
        return
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | also), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)
        except OSError as exc:
            # Linux 5.12+: only a creator that had CAP_SETFCAP may map uid 0 (it could write
            # file capabilities that count outside), and a sandboxed uid 0 has none.
            hint = " (uid 0 may be mapped only by a process with CAP_SETFCAP)" if uid == 0 else ""
            raise OSError(exc.errno, f"write /proc/self/{name}: {os.strerror(exc.errno or 0)}{hint}") from None


def _own_devices(libc: ctypes.CDLL, shm_size: int | None, ptmx: bool) -> None:
    """A fresh /dev/shm (tmpfs) and /dev/pts instance; with `ptmx`, /dev/ptmx bound into it
    (a host /dev, where it is a device node; bubblewrap's is a link into /dev/pts already)."""
    size = f",size={int(shm_size)}" if shm_size else ""
    if os.path.isdir("/dev/shm"):
        _mount(libc, "tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777{size}")
    if os.path.isdir("/dev/pts"):
        # Not nodev: its nodes are the ptys.
        _mount(libc, "devpts", "/dev/pts", "devpts", _MS_NOSUID | _MS_NOEXEC, "newinstance,ptmxmode=0666,mode=600")
        if ptmx:
            _mount(libc, "/dev/pts/ptmx", "/dev/ptmx", None, _MS_BIND)


def enter_own_devices(hide: dict | None = None) -> None:
    """This process (and what it starts) gets a /dev/shm, /dev/pts and IPC namespace of its
    own, the /dev/shm as large as the one it had (sized by the sandbox; the watchdog counts
    it). For a forked kernel, right after the fork: one thread, and no Landlock domain yet
    (Landlock refuses mounts). All of it goes with the process.

    hide: {"folder": F, "keep": [folders below F]}: F (the template's runtime folder, with
    every sibling kernel's ipc sockets) is covered by an empty read-only tmpfs, and only the
    `keep` folders are bound back. A unix socket is reached by its path, which no Landlock
    rule refuses and /proc/net/unix lists: a sibling's path must lead nowhere here."""
    libc = _libc()
    fs = os.statvfs("/dev/shm")
    _unshare(libc, _CLONE_NEWIPC)
    # Nothing propagates back: a mount namespace of a new user namespace holds the others'
    # shared mounts as slaves already; as root, made private here.
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _own_devices(libc, fs.f_blocks * fs.f_frsize, ptmx=not os.path.islink("/dev/ptmx"))
    if hide:
        _hide_except(libc, hide["folder"], hide.get("keep", []))


def _hide_except(libc: ctypes.CDLL, folder: str, keep: list[str]) -> None:
    held = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in keep]  # before it is covered
    try:
        _mount(libc, "tmpfs", folder, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=700")
        for path, fd in held:
            os.makedirs(path, mode=0o700, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
        _mount(libc, None, folder, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    finally:
        for _, fd in held:
            os.close(fd)


def own_devices_work() -> bool | str:
    """True when a fork of this process can make its own devices (`enter_own_devices`), else
    why not: tried for real, once, in a fork that then exits."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            enter_own_devices()
            os._exit(0)
        except BaseException as exc:
            os.write(write, str(exc).encode()[:1000])
            os._exit(1)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        why = pipe.read().decode(errors="replace")
    _, code = os.waitpid(pid, 0)
    if code == 0:
        return True
    return (
        f"a forked kernel cannot make its own /dev/shm here ({why or f'status {code}'}): kernels share the template's"
    )


def enter(spec: dict) -> None:
    """Make this process's mounts private and mount what the module docstring says.

    spec: {"shm_size": bytes, "readonly": [paths that exist, never symlinks],
           "pinned": [the folders holding them, shallowest first], "user": bool,
           "hide": {"folder": the shared temp folder, "keep": [the folders granted in it]}}

    With "user" (a fork template of the Landlock tier) the namespaces are those of a user
    namespace of its own, also as root: the capabilities the template keeps for its forks'
    own mounts (launch.py) are then over these namespaces only, none over the host's.
    """
    libc = _libc()
    _unshare(
        libc, _CLONE_NEWIPC, bool(spec.get("user"))
    )  # SysV shared memory, semaphores, queues: not the host's either
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing propagates back to the host
    _own_devices(libc, spec.get("shm_size"), ptmx=True)
    for path in spec.get("pinned", []):
        # Each its own mount point: the note cannot rename it (EBUSY) to carry the user's
        # .git away and make its own at the old path. Its contents stay writable.
        if os.path.realpath(path) != path or not os.path.isdir(path):
            continue  # swapped for (or now below) a symlink: a bind would mount its target
        _mount(libc, path, path, None, _MS_BIND | _MS_REC)
    for path in spec.get("readonly", []):
        if os.path.islink(path) or not os.path.exists(path):
            continue  # made after the launch was planned: nothing to cover (protected.py)
        _mount(libc, path, path, None, _MS_BIND | _MS_REC)
        _mount(libc, None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _kept_flags(path))
    if spec.get("hide"):
        # The shared temp folder but what the kernel is granted there: other kernels' ipc
        # sockets are in it, reachable by path whatever Landlock grants (/proc/net/unix
        # names them). After the binds above, which the folders kept carry along.
        _hide_except(libc, spec["hide"]["folder"], spec["hide"]["keep"])


def _kept_flags(path: str) -> int:
    """The flags of the mount a path is on: in a user namespace a read-only remount must
    keep them (nosuid, nodev ... are locked), or it is refused."""
    have = os.statvfs(path).f_flag
    pairs = ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV), (os.ST_NOEXEC, _MS_NOEXEC))
    pairs += ((os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21))
    return sum(ms for st, ms in pairs if have & st)
