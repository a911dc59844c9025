"""Protected vault names refused as they are made: a seccomp user-notification supervisor.

No mount or Landlock rule can refuse a *name* in a folder the kernel may write, so every
call of the kernel's that makes a name (open/openat/creat with O_CREAT, mkdir, mknod,
symlink, link, rename, bind) goes to this supervisor (seccomp.py `install_names_filter`),
which refuses protected.py's names with EPERM: ``.git`` and ``.obsidian`` anywhere in the
vault, ``vault-runner.toml`` at its root. Case and trailing dots or spaces do not count (on
a case-insensitive filesystem ``.GIT`` *is* ``.git``).

It *emulates* every call it allows and never lets the kernel go on with one
(SECCOMP_USER_NOTIF_FLAG_CONTINUE): the kernel would read the path again after the
decision, and another thread of the note can change it in between. The path is read once
(/proc/TID/mem); the supervisor opens the parent folder itself (O_PATH, from /proc/TID/cwd,
/proc/TID/fd/N or /proc/TID/root), decides on that folder and its own copy of the name, and
makes the call with ``*at()`` on that folder; a new descriptor goes into the kernel with
NOTIF_ADDFD + ADDFD_FLAG_SEND (installed and returned in one step). "In the vault" is the
folder's inode, walked up by ``..`` to the vault root's, never a path. A rename of a folder
across the vault's edge gets EXDEV (as under bubblewrap, where the vault is a mount of its
own): no folder made outside carries a ``.git`` in, and ``mv`` and ``shutil.move`` copy
instead. It serves one call at a time, so no rename can move a folder across the edge while
a decision about it is made.

The supervisor is the process that started the kernel (the launcher, or a fork template's
child): launch.py `apply_hardening` forks, the child goes on as the kernel, filtered, and
the parent serves.
So it has the kernel's mounts, Landlock domain, credentials, capabilities and hardening
filter: emulating a call can do nothing the kernel could not. Only the name filter is not
its. It is every note process's ancestor, as Yama (ptrace_scope 1) wants of whoever reads
/proc/PID/mem; it is non-dumpable (the kernel can neither trace it nor open its /proc
files) and holds nothing of the kernel's but the listener. It keeps the pid whoever
started the kernel knows, passes the signals it gets on to the kernel's process group and
exits as the kernel does; if it dies, the kernel is killed (PR_SET_PDEATHSIG) and every call
it would have served fails with ENOSYS: the kernel can stop it, never get past it.

Standard library only: the launcher loads it by path (launch.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import select
import signal
import socket
import stat
import struct
import threading
from collections.abc import Mapping
from typing import Any

__all__ = ("FORWARDED", "Supervisor", "refused")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# What whoever started the kernel may send it, through this process: passed on.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
AT_FDCWD, AT_EMPTY_PATH, AT_SYMLINK_FOLLOW, RENAME_EXCHANGE = -100, 0x1000, 0x400, 2
_PATH = os.O_PATH | os.O_CLOEXEC
_PIDFD_OPEN, _PIDFD_GETFD = 434, 438  # the same on every architecture

_CONSTANTS = {"F": AT_FDCWD, "Z": 0, "C": os.O_CREAT | os.O_WRONLY | os.O_TRUNC}  # in seccomp.py's table


def _bare(name: bytes) -> bytes:
    return name.decode(errors="surrogateescape").rstrip(". ").casefold().encode(errors="surrogateescape")


def refused(name: bytes, where: int, names: Mapping[str, list[str]]) -> bool:
    """Whether `name` may not be made in a folder `where` (2 the vault root, 1 in the vault,
    0 outside). `names`: protected.py's, {"anywhere": [...], "at_root": [...]}."""
    bare = _bare(name)
    return (where > 0 and bare in _bare_all(tuple(names["anywhere"]))) or (
        where == 2 and bare in _bare_all(tuple(names["at_root"]))
    )


@functools.lru_cache(maxsize=8)
def _bare_all(names: tuple[str, ...]) -> frozenset[bytes]:
    """The protected names as compared, folded once (refused() runs on every name made)."""
    return frozenset(_bare(n.encode()) for n in names)


def _signal_group(kernel: int, number: int) -> None:
    try:
        os.killpg(kernel, number)
    except (ProcessLookupError, PermissionError):
        pass


class _Call:
    """One notification: the target thread, and the fds opened for it (closed after)."""

    def __init__(self, nid: int, tid: int) -> None:
        self.nid, self.tid, self.fds, self.status = nid, tid, list[int](), b""

    def keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def field(self, name: bytes) -> int:
        """Tgid or Umask from /proc/TID/status: read once, only when needed (~12 us)."""
        self.status = self.status or _status(self.tid)
        return int(_field(self.status, name), 8 if name == b"Umask" else 10)


_Parent = tuple[int, bytes, bool, os.stat_result]  # folder (O_PATH), name, ended in "/", its stat


class Supervisor:
    """Answers the notifications of a listener for a vault; see the module docstring."""

    def __init__(self, spec: Mapping[str, object], calls: Mapping[int, tuple[str, str, str]]) -> None:
        info = os.stat(str(spec["vault"]))
        self.vault = (info.st_dev, info.st_ino)
        # The vault's folder and those above it, each by its name in the folder above (by
        # inode): none is moved, and nothing takes its place (a tree of the note's at the path).
        self.path_names = set()
        path = os.path.realpath(str(spec["vault"]))
        while path != "/":
            up = os.stat(os.path.dirname(path))
            self.path_names.add((up.st_dev, up.st_ino, os.path.basename(path).encode()))
            path = os.path.dirname(path)
        self.names = {"anywhere": list(spec["anywhere"]), "at_root": list(spec["at_root"])}  # type: ignore[call-overload]
        self.proc_dev = os.stat("/proc").st_dev
        self.syscalls = calls  # number -> (name, operation, arguments): seccomp.py `name_calls`
        self.listener: Any = None  # seccomp.py's Listener

    def run(self, kernel: int) -> int:
        """Serve until `kernel` exits; its wait status. Signals for this process go to the
        kernel's process group (an interrupt, a termination)."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for number in FORWARDED:
            signal.signal(number, lambda got, _: _signal_group(kernel, got))
        poller = select.poll()
        poller.register(self.listener.fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        while True:
            pid, status = os.waitpid(kernel, os.WNOHANG)
            if pid:
                return status
            for fd, events in poller.poll():
                if fd == wake_r:
                    _drain(wake_r)
                elif events & select.POLLIN:
                    self.serve_one()
                elif events & (select.POLLHUP | select.POLLERR):
                    poller.unregister(self.listener.fd)  # no filtered process left

    def serve_one(self) -> None:
        taken = self.listener.receive()
        if taken is None:  # the target was killed meanwhile
            return
        nid, tid, nr, args = taken
        call = _Call(nid, tid)
        try:
            _, operation, shape = self.syscalls[nr]
            values = [_CONSTANTS[c] if c in _CONSTANTS else args[int(c)] for c in shape]
            if getattr(self, "_" + operation)(call, *values) is None:
                self.listener.answer(nid, 0)
        except OSError as exc:
            self.listener.answer(nid, exc.errno or errno.EPERM)
        except Exception:  # a bug must neither leave the target waiting nor let it through
            self.listener.answer(nid, errno.EPERM)
        finally:
            for fd in call.fds:
                os.close(fd)

    def _valid(self, call: _Call) -> None:
        """After opening /proc/TID/...: TID is still the waiting thread, not a reused number."""
        if not self.listener.waiting(call.nid):
            raise OSError(errno.ENOENT, "the target is gone")

    def _send_fd(self, nid: int, fd: int, flags: int) -> bool:
        """Install `fd` (then closed here) in the target as its syscall's result."""
        try:
            self.listener.send_fd(nid, fd, bool(flags & os.O_CLOEXEC))
        finally:
            os.close(fd)
        return True

    # -- reading the target ---------------------------------------------------------------
    def _read(self, call: _Call, address: int, size: int = 4096, string: bool = True) -> bytes:
        """`size` bytes at `address` in the target, or the string there (up to PATH_MAX)."""
        mem = self._proc(call, "mem", os.O_RDONLY | os.O_CLOEXEC)
        try:  # a read into an unmapped page stops short there: a string may end before one
            out = os.pread(mem, size, address) if address else b""
        except OSError:
            out = b""
        if string and b"\0" in out:
            return out[: out.index(b"\0")]
        if len(out) < size or string:
            raise OSError(errno.EFAULT if len(out) < size else errno.ENAMETOOLONG, "bad address or path")
        return out

    def _proc(self, call: _Call, what: str, flags: int = _PATH) -> int:
        fd = call.keep(os.open(f"/proc/{call.tid}/{what}", flags))
        self._valid(call)
        return fd

    def _parent(self, call: _Call, dirfd: int, path: bytes, start: int | None = None) -> _Parent:
        """The folder the last component of `path` goes in, that name, whether the path
        ended in "/", the folder's stat. `start`: where a relative path begins (a symlink's
        folder), else the target's dirfd or cwd."""
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        for prefix, into in (
            (b"/proc/self/", "/proc/{g}/"),
            (b"/proc/thread-self/", "/proc/{g}/task/{t}/"),
            (b"/dev/fd/", "/proc/{g}/fd/"),
        ):  # they mean the target, not us
            if path.startswith(prefix) or path == prefix[:-1]:
                path = into.format(g=call.field(b"Tgid"), t=call.tid).encode() + path[len(prefix) :]
                break
        head, _, name = path.rstrip(b"/").rpartition(b"/")
        dirfd = ctypes.c_int32(dirfd & 0xFFFFFFFF).value
        if path.startswith(b"/"):
            base = self._proc(call, "root")
        elif start is not None:
            base = start
        elif dirfd == AT_FDCWD:
            base = self._proc(call, "cwd")
        else:
            try:
                base = self._proc(call, f"fd/{dirfd}")
            except FileNotFoundError:
                raise OSError(errno.EBADF, "bad dirfd") from None
        parent = call.keep(os.open(head.lstrip(b"/") or b".", _PATH | os.O_DIRECTORY, dir_fd=base))
        info = os.fstat(parent)
        self._not_ours(parent, info)
        return parent, name or b".", path.endswith(b"/"), info

    def _not_ours(self, fd: int, info: os.stat_result) -> None:
        """In /proc, the note's entries or others', never this process's own (its listener
        and memory are there); no other procfs, where "self" is this process too."""
        if info.st_dev != self.proc_dev:
            if _is_procfs(fd):
                raise OSError(errno.EACCES, "a procfs other than /proc")
            return
        where = os.readlink(f"/proc/self/fd/{fd}").split("/")
        if len(where) > 2 and where[2].isdigit() and _tgid(int(where[2])) == os.getpid():
            raise OSError(errno.EACCES, "the supervisor's own /proc entry")

    def _where(self, fd: int, info: os.stat_result) -> int | None:
        """2: the vault root, 1: in the vault, 0: outside, None: unknown (a folder on the way
        up the note may not search, or removed meanwhile). By inode, walking `..` up."""
        key = (info.st_dev, info.st_ino)
        if key == self.vault:
            return 2
        current = os.dup(fd)
        try:
            for _ in range(4096):
                up = os.open(b"..", _PATH | os.O_DIRECTORY, dir_fd=current)
                os.close(current)
                current, info = up, os.fstat(up)
                if (info.st_dev, info.st_ino) == self.vault:
                    return 1
                if (info.st_dev, info.st_ino) == key:
                    return 0  # the root: its `..` is itself
                key = (info.st_dev, info.st_ino)
        except OSError:
            pass  # the note decides who may search its folders: never a way out of the check
        finally:
            os.close(current)
        return None

    def _check(self, parent: int, info: os.stat_result, name: bytes) -> int | None:
        where = self._where(parent, info)
        if refused(name, 1 if where is None else where, self.names):
            raise OSError(errno.EPERM, "a protected vault name")
        return where

    # -- the operations, done here as the target asked ------------------------------------
    def _open(self, call: _Call, dirfd: int, address: int, flags: int, mode: int) -> bool:
        path, flags, start = self._read(call, address), flags & 0xFFFFFFFF, None
        if flags & os.O_DIRECTORY:  # with O_CREAT (O_TMPFILE holds it too), as the kernel says
            raise OSError(errno.EINVAL, "O_CREAT with O_DIRECTORY")
        for _ in range(40):  # final symlinks are followed here: O_CREAT would make their target
            parent, name, slash, info = self._parent(call, dirfd, path, start)
            if info.st_dev == self.proc_dev:  # nothing is made in /proc: /dev/stdout and the like
                node = call.keep(os.open(name, _PATH, dir_fd=parent))
                self._not_ours(node, os.fstat(node))
                return self._open_existing(call, os.dup(node), flags)
            self._check(parent, info, name)
            if slash:
                raise OSError(errno.EISDIR, "a folder")
            try:
                found = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
            except FileNotFoundError:
                found = 0
            if stat.S_ISLNK(found) and not flags & (os.O_NOFOLLOW | os.O_EXCL):
                path, start = os.readlink(name, dir_fd=parent), parent
                continue
            if found:
                if flags & os.O_EXCL:
                    raise OSError(errno.EEXIST, "exists")
                if stat.S_ISLNK(found):
                    raise OSError(errno.ELOOP, "O_NOFOLLOW on a symlink")
                return self._open_existing(call, os.open(name, _PATH | os.O_NOFOLLOW, dir_fd=parent), flags)
            os.umask(call.field(b"Umask"))  # the kernel applies it (or a default ACL)
            try:  # O_EXCL: never through a symlink made meanwhile (F_GETFL does not show it)
                fd = os.open(name, flags | os.O_EXCL | os.O_NOCTTY | os.O_CLOEXEC, mode & 0o7777, dir_fd=parent)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                continue  # made meanwhile (by a sibling kernel): looked at again
            return self._send_fd(call.nid, fd, flags)
        raise OSError(errno.ELOOP, "too many symlinks")

    def _open_existing(self, call: _Call, node: int, flags: int) -> bool:
        """Open the file `node` (O_PATH, closed here) as asked, through its /proc link: that
        inode, no other. A FIFO waits for its other end, a device may: in a thread of its
        own, so that the note's other calls do not wait behind it."""
        try:
            info = os.fstat(node)
            mode = info.st_mode
            terminal = stat.S_ISCHR(mode) and info.st_rdev == os.makedev(5, 0)
            theirs = _tty(call.tid) if terminal else 0
            if terminal and (theirs is None or theirs != _tty(os.getpid())):
                raise OSError(errno.ENXIO, "/dev/tty is the opener's terminal")  # and this one's is not the note's
            if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
                try:  # O_NONBLOCK: a lease another holds says EWOULDBLOCK, it does not wait here
                    fd = os.open(f"/proc/self/fd/{node}", _reopened(flags) | os.O_NONBLOCK)
                except BlockingIOError:
                    pass
                else:
                    if not flags & os.O_NONBLOCK:
                        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
                    return self._send_fd(call.nid, fd, flags)
            threading.Thread(target=self._open_node, args=(call, node, flags), daemon=True).start()
            node = -1  # the thread's now
            return True
        finally:
            if node >= 0:
                os.close(node)

    def _open_node(self, call: _Call, node: int, flags: int) -> None:
        """A FIFO's or device's open, which may wait: a signal the note catches meanwhile
        interrupts it (EINTR), as it would the kernel's own open; what opens later is closed."""
        lock, state = threading.Lock(), {"fd": -1, "error": 0, "done": False, "abandoned": False}

        def opening() -> None:
            try:
                fd, error = os.open(f"/proc/self/fd/{node}", _reopened(flags)), 0
            except OSError as exc:
                fd, error = -1, exc.errno or errno.EPERM
            with lock:
                if state["abandoned"] and fd >= 0:
                    os.close(fd)
                state.update(fd=fd, error=error, done=True)
            os.close(node)

        opener = threading.Thread(target=opening, daemon=True)
        opener.start()
        while True:
            opener.join(0.05)
            with lock:
                if state["done"]:
                    break
                if _signalled(call.tid) or not self.listener.waiting(call.nid):
                    state["abandoned"] = True
                    self.listener.answer(call.nid, errno.EINTR)
                    return
        try:
            if state["fd"] >= 0:
                self._send_fd(call.nid, state["fd"], flags)
            else:
                self.listener.answer(call.nid, state["error"])
        except OSError:
            pass  # the note's thread is gone meanwhile

    def _mkdir(self, call: _Call, dirfd: int, address: int, mode: int) -> None:
        parent, name, slash, info = self._parent(call, dirfd, self._read(call, address))
        self._check(parent, info, name)
        os.umask(call.field(b"Umask"))
        os.mkdir(name + (b"/" if slash else b""), mode & 0o7777, dir_fd=parent)

    def _mknod(self, call: _Call, dirfd: int, address: int, mode: int, device: int) -> None:
        parent, name, slash, info = self._parent(call, dirfd, self._read(call, address))
        self._check(parent, info, name)
        os.umask(call.field(b"Umask"))
        os.mknod(_slashed(name, slash), mode & 0xFFFF, device & 0xFFFFFFFF, dir_fd=parent)

    def _symlink(self, call: _Call, target: int, dirfd: int, address: int) -> None:
        content = self._read(call, target)
        parent, name, slash, info = self._parent(call, dirfd, self._read(call, address))
        self._check(parent, info, name)
        os.symlink(content, _slashed(name, slash), dir_fd=parent)

    def _link(self, call: _Call, olddir: int, old: int, newdir: int, new: int, flags: int) -> None:
        source = self._read(call, old) if old or not flags & AT_EMPTY_PATH else b""
        if not source and flags & AT_EMPTY_PATH:  # flink(): the fd itself
            src, src_name = self._proc(call, f"fd/{ctypes.c_int32(olddir & 0xFFFFFFFF).value}"), b""
        else:
            src, src_name, src_slash, src_info, start = *self._parent(call, olddir, source), None
            for _ in range(40 if flags & AT_SYMLINK_FOLLOW else 0):  # a final symlink followed here,
                if src_info.st_dev == self.proc_dev:  # as open follows it; in /proc, the note's link
                    break
                if not stat.S_ISLNK(os.stat(src_name, dir_fd=src, follow_symlinks=False).st_mode):
                    flags &= ~AT_SYMLINK_FOLLOW
                    break
                source, start = os.readlink(src_name, dir_fd=src), src
                src, src_name, src_slash, src_info = self._parent(call, olddir, source, start)
            else:
                if flags & AT_SYMLINK_FOLLOW:
                    raise OSError(errno.ELOOP, "too many symlinks")
            src_name = _slashed(src_name, src_slash)
        parent, name, slash, info = self._parent(call, newdir, self._read(call, new))
        self._check(parent, info, name)
        _libc_call("linkat", src, src_name, parent, _slashed(name, slash), flags & 0xFFFFFFFF)

    def _rename(self, call: _Call, olddir: int, old: int, newdir: int, new: int, flags: int) -> None:
        src, src_name, src_slash, src_info = self._parent(call, olddir, self._read(call, old))
        dst, dst_name, dst_slash, dst_info = self._parent(call, newdir, self._read(call, new))
        moved = os.stat(src_name, dir_fd=src, follow_symlinks=False)  # ENOENT first, as natively
        for folder, entry in ((src_info, src_name), (dst_info, dst_name)):
            if (folder.st_dev, folder.st_ino, entry) in self.path_names:
                raise OSError(errno.EBUSY, "the vault's folder, or one above it")
        moved = moved.st_mode
        into = self._check(dst, dst_info, dst_name)
        exchange = flags & RENAME_EXCHANGE
        # An exchange puts something new under both names; a plain rename under dst only.
        back = self._check(src, src_info, src_name) if exchange else self._where(src, src_info)
        # A folder made outside may hold a .git: none comes in (a file holds no name). Where
        # the way up cannot be walked, the vault may be on either side.
        if stat.S_ISDIR(moved) and _entering(into, back):
            raise OSError(errno.EXDEV, "a folder into the vault")  # mv and shutil.move copy instead
        if (
            exchange
            and _entering(back, into)
            and stat.S_ISDIR(os.stat(dst_name, dir_fd=dst, follow_symlinks=False).st_mode)
        ):
            raise OSError(errno.EXDEV, "a folder into the vault")
        src_name, dst_name = _slashed(src_name, src_slash), _slashed(dst_name, dst_slash)
        _libc_call("renameat2", src, src_name, dst, dst_name, flags & 0xFFFFFFFF)

    def _bind(self, call: _Call, sockfd: int, address: int, size: int) -> None:
        if not 0 < size <= 128:
            raise OSError(errno.EINVAL, "bad address length")
        raw = self._read(call, address, size, string=False)
        pidfd = call.keep(_checked(_libc.syscall(_PIDFD_OPEN, call.field(b"Tgid"), 0)))
        self._valid(call)
        sock = call.keep(_checked(_libc.syscall(_PIDFD_GETFD, pidfd, sockfd & 0xFFFFFFFF, 0)))
        family = struct.unpack_from("=H", raw)[0] if size >= 2 else 0
        if family == socket.AF_NETLINK and size >= 12 and struct.unpack_from("=I", raw, 4)[0] == 0:
            # Bound "automatically": the kernel would give the caller's pid, not ours.
            try:
                mine = raw[:4] + struct.pack("=I", call.field(b"Tgid")) + raw[8:]
                return _libc_call("bind", sock, mine, size)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        if family != socket.AF_UNIX or size <= 2 or raw[2] == 0:
            return _libc_call("bind", sock, raw, size)  # no name made: bound as asked
        parent, name, slash, info = self._parent(call, AT_FDCWD, raw[2:].split(b"\0", 1)[0])
        self._check(parent, info, name)
        if slash:
            raise OSError(errno.ENOENT, "a socket's name ends in /")
        os.umask(call.field(b"Umask"))
        # bind has no *at(): it resolves a path. The folder decided on, by its real path where
        # that path leads to it through no symlink (getsockname() then says where the socket
        # is from any folder, which multiprocessing needs); else the name alone, from it.
        # Only a name made meanwhile could change where the path leads, and those wait here.
        full = _plain_path(parent, info)
        full = full + b"/" + name if full is not None and len(full) + len(name) < 107 else None
        if full is None:
            os.fchdir(parent)
        try:
            address = struct.pack("=H", socket.AF_UNIX) + (full or name)
            _libc_call("bind", sock, address, len(address))
        finally:
            os.chdir("/")
        try:  # where it was decided, or nowhere
            bound = stat.S_ISSOCK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except OSError:
            bound = False
        if not bound:
            if full is not None:
                os.unlink(full)
            raise OSError(errno.EPERM, "the folder changed while the socket was bound")


def _plain_path(folder: int, info: os.stat_result) -> bytes | None:
    """The absolute path of `folder` if it leads there through no symlink, else None."""
    path = os.readlink(f"/proc/self/fd/{folder}").encode()
    if not path.startswith(b"/"):
        return None  # unreachable from this root
    current = os.open(b"/", _PATH | os.O_DIRECTORY)
    try:
        for part in filter(None, path.split(b"/")):
            step = os.open(part, _PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=current)
            os.close(current)
            current = step
        found = os.fstat(current)
    except OSError:
        return None  # gone, or " (deleted)", or a symlink on the way
    finally:
        os.close(current)
    return path.rstrip(b"/") if (found.st_dev, found.st_ino) == (info.st_dev, info.st_ino) else None


def _slashed(name: bytes, slash: bool) -> bytes:
    """The name as given: a trailing "/" makes the kernel's own errors (ENOTDIR ...)."""
    return name + b"/" if slash else name


def _entering(into: int | None, back: int | None) -> bool:
    """Whether something goes from `back` (where it was) into the vault (`into`)."""
    return (into is None or into > 0) and (back is None or back == 0)


def _reopened(flags: int) -> int:
    """How an existing file is opened again through its /proc link, as the note asked."""
    return flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW) | os.O_NOCTTY | os.O_CLOEXEC


def _is_procfs(fd: int) -> bool:
    """Whether the folder `fd` is on a procfs (PROC_SUPER_MAGIC), whatever mount."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs; f_type first
    if _libc.fstatfs(fd, buffer) != 0:
        return True  # cannot tell: taken as one
    return struct.unpack_from("l", buffer.raw)[0] == 0x9FA0


def _status(tid: int) -> bytes:
    """/proc/TID/status."""
    with open(f"/proc/{tid}/status", "rb") as handle:
        return handle.read()


def _field(status: bytes, name: bytes) -> bytes:
    """One field of a /proc/TID/status (KeyError where there is none)."""
    start = status.find(b"\n" + name + b":")
    if start < 0:
        raise KeyError(name)
    start += len(name) + 2
    return status[start : status.find(b"\n", start)].strip()


def _tty(pid: int) -> int | None:
    """The controlling terminal of `pid` (0: none; None: cannot be told)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[4])
    except (OSError, ValueError, IndexError):
        return None


def _tgid(tid: int) -> int:
    """The process of thread `tid`; this process's own where it cannot be told."""
    try:
        return int(_field(_status(tid), b"Tgid"))
    except (OSError, KeyError, ValueError):
        return os.getpid()


_SIGNAL_FIELDS = (b"SigPnd", b"ShdPnd", b"SigBlk", b"SigCgt")


def _signalled(tid: int) -> bool:
    """Whether thread `tid` has a signal pending that it catches and does not block."""
    try:
        status = _status(tid)
        pending, shared, blocked, caught = (int(_field(status, key), 16) for key in _SIGNAL_FIELDS)
        return bool((pending | shared) & ~blocked & caught)
    except (OSError, KeyError, ValueError):
        return False


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _checked(value: int) -> int:
    if value < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return int(value)


def _libc_call(function: str, *args: object) -> None:
    _checked(getattr(_libc, function)(*args))
