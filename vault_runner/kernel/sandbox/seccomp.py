"""The seccomp filters of a sandboxed kernel: `network: false` (no connection out of the
sandbox, by any socket), the hardening every sandboxed kernel gets, and the name filter of
its name supervisor (below).

Standard library only: the launcher (launch.py, run by path with ``-I -S``) loads this file
and applies the filter just before it execs the kernel, so nothing of the note's runs
unfiltered, and everything the kernel forks or execs inherits it (a seccomp filter cannot
be removed). A hand-built classic BPF program (about 40 instructions) rather than
libseccomp: the launcher must work on machines without that library, and one program is
easier to check than two.

A filter sees a syscall's registers, never the memory they point to, so it cannot tell
where a ``connect`` goes. It therefore refuses, with EACCES:

- ``connect``, for every socket: a kernel without network has nothing to connect to,
  and a unix socket path or an abstract name reaches host services that neither a network
  namespace (filesystem sockets) nor Landlock (any unix socket, before ABI 6) stops. The
  kernel's own sockets are bound (ipc) or come from ``socketpair``, which stay allowed;
- sockets that send without connecting: UDP and every other datagram or raw socket, unix
  datagram sockets (``/dev/log``, journald), and every family but unix, IPv4/IPv6 TCP and
  netlink route (glibc's interface queries); ``socketpair`` gets the same check (a datagram
  pair can ``sendto`` any unix path);
- TCP Fast Open (``sendto``/``sendmsg`` with MSG_FASTOPEN), which connects without
  ``connect``;
- io_uring, whose socket and connect operations are not syscalls and pass any filter;
- syscalls of another ABI than the launcher's (x32, or 32-bit ``int 0x80`` on x86-64).

The hardening filter (`apply_hardening`, every sandboxed kernel, `network` or not) keeps a
note from leaving anything on the host that runs with more rights than the note had. The
files a kernel makes are its user's on the host, root's when vault-runner runs as root, so
with EPERM it refuses:

- setuid and setgid bits, in every call that sets a mode (chmod family, open/creat with a
  mode, mknod): a setuid-root binary in a vault is root for any local user;
- new user namespaces (``unshare``/``clone`` with CLONE_NEWUSER; ``clone3``, whose flags the
  filter cannot read, gets ENOSYS and libc falls back to ``clone``): as root's stand-in in a
  namespace of its own, a kernel could set file capabilities the host honours, and mount
  over what the sandbox made read-only;
- ``prlimit64`` on another process (without a pid namespace, in the Landlock tier, a note
  could lower the limits of the fork template, and so of every later note, or of any host
  process of its user); its own limits stay its to set;
- io_uring (ENOSYS: its operations pass any filter) and ``openat2`` (ENOSYS: its mode is in
  memory; libc's ``open`` does not use it), and syscalls of another ABI.

The name filter (`install_names_filter`, after the hardening filter where the name
supervisor works) traps every call that makes a name and hands it to the supervisor of
name_supervisor.py, which makes it or refuses it: a filter cannot read the path.

What it costs a note with `network: false`: Python code that hands data between processes
over a *connected* unix socket (multiprocessing managers and the forkserver, DataLoader
workers that pass tensors as file descriptors) gets PermissionError, and ipykernel cannot
forward what a forked child prints (it connects to the kernel over TCP); pipes, queues,
``socketpair`` and shared memory work. Binding and listening stay allowed (the kernel's
ipc sockets); ``socketpair`` gives stream and seqpacket pairs only; under Landlock a listening TCP socket on a random port is still possible.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = (
    "ARCHES",
    "Listener",
    "apply_hardening",
    "apply_no_network",
    "hardening_program",
    "install_names_filter",
    "name_calls",
    "names_program",
    "no_network_program",
    "supported",
)

_PR_SET_NO_NEW_PRIVS = 38
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_USER_NOTIF = 0x7FC00000
# seccomp(2) itself: its number per machine, the operation, and the flags of a listener.
_SECCOMP_SYSCALL = {"x86_64": 317, "aarch64": 277}
_SECCOMP_SET_MODE_FILTER = 1
_FILTER_FLAG_NEW_LISTENER, _FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 3, 1 << 5
_DENY = _RET_ERRNO | errno.EACCES

# Classic BPF opcodes (linux/filter.h).
_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_AND = 0x54  # BPF_ALU | BPF_AND | BPF_K
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]. The low
# half of an argument (little-endian: the first four bytes) is all an int argument has.
_NR, _ARCH = 0, 4


def _arg(index: int) -> int:
    return 16 + 8 * index


AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
SOCK_STREAM, SOCK_SEQPACKET, SOCK_TYPE_MASK = 1, 5, 0xF
IPPROTO_TCP, NETLINK_ROUTE = 6, 0
MSG_FASTOPEN = 0x20000000
_X32_SYSCALL_BIT = 0x40000000

# Per machine: (AUDIT_ARCH_*, syscall numbers). io_uring's are the same everywhere.
ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (
        0xC000003E,
        {"socket": 41, "socketpair": 53, "connect": 42, "sendto": 44, "sendmsg": 46, "sendmmsg": 307},
    ),
    "aarch64": (
        0xC00000B7,
        {"socket": 198, "socketpair": 199, "connect": 203, "sendto": 206, "sendmsg": 211, "sendmmsg": 269},
    ),
}
_IO_URING = (425, 426, 427)  # io_uring_setup, io_uring_enter, io_uring_register
_CLONE3, _OPENAT2, _FCHMODAT2 = 435, 437, 452  # the same everywhere too
CLONE_NEWUSER = 0x10000000
S_ISUID_ISGID = 0o6000

# Per machine: the calls that set a file's mode, with the index of their mode argument, and
# those that can make a user namespace (flags in argument 0). aarch64 has only the *at forms.
_MODE_CALLS: dict[str, dict[int, int]] = {
    "x86_64": {2: 2, 257: 3, 85: 1, 90: 1, 91: 1, 268: 2, _FCHMODAT2: 2, 133: 1, 259: 2},
    "aarch64": {56: 3, 52: 1, 53: 2, _FCHMODAT2: 2, 33: 2},
}
_NAMESPACE_CALLS = {"x86_64": (272, 56), "aarch64": (97, 220)}  # unshare, clone
_PRLIMIT64 = {"x86_64": 302, "aarch64": 261}


# The calls that make a name, for the name filter and its supervisor (name_supervisor.py):
# numbers (x86_64, aarch64; "-": none there), the operation, its arguments ("F" AT_FDCWD,
# "Z" 0, "C" creat's flags, a digit the syscall's argument). open and openat make one only
# with O_CREAT in their flags (argument 1, 2).
_NAME_CALLS = """
open      2   -   open    F012
creat     85  -   open    F0C1
openat    257 56  open    0123
mkdir     83  -   mkdir   F01
mkdirat   258 34  mkdir   012
mknod     133 -   mknod   F012
mknodat   259 33  mknod   0123
symlink   88  -   symlink 0F1
symlinkat 266 36  symlink 012
link      86  -   link    F0F1Z
linkat    265 37  link    01234
rename    82  -   rename  F0F1Z
renameat  264 38  rename  0123Z
renameat2 316 276 rename  01234
bind      49  200 bind    012
"""
_CREATE_FLAGS = {"open": 1, "openat": 2}


def name_calls(machine: str | None = None) -> dict[int, tuple[str, str, str]]:
    """Syscall number -> (name, operation, arguments) of the calls that make a name."""
    column = 1 + list(ARCHES).index(machine or _machine())
    rows = [line.split() for line in _NAME_CALLS.strip().splitlines()]
    return {int(row[column]): (row[0], row[3], row[4]) for row in rows if row[column] != "-"}


def _machine() -> str:
    machine = os.uname().machine.lower()  # not `platform`: a slow import for the launcher
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def supported() -> bool:
    """Whether this machine's ABI has a filter here (x86-64 and arm64 Linux)."""
    return _machine() in ARCHES


class _Program:
    """A tiny assembler: instructions with jumps to labels, resolved to relative offsets."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        self.code.append((code, jt, jf, k))

    def prologue(self, arch: int, other_abi: str) -> None:
        """Load the syscall number; a syscall of another ABI (x32, or 32-bit on x86-64) jumps
        to `other_abi`: its numbers mean other calls, so nothing of it is let through."""
        self.op(_LD_ABS, _ARCH)
        self.op(_JEQ, arch, 0, other_abi)
        self.op(_LD_ABS, _NR)
        if arch == ARCHES["x86_64"][0]:
            self.op(_JGE, _X32_SYSCALL_BIT, other_abi, 0)

    def assemble(self) -> bytes:
        out = b""
        for index, (code, jt, jf, k) in enumerate(self.code):
            offsets = [self.labels[j] - index - 1 if isinstance(j, str) else j for j in (jt, jf)]
            if any(not 0 <= offset < 256 for offset in offsets):
                raise ValueError("a seccomp jump out of range")
            out += struct.pack("HBBI", code, offsets[0], offsets[1], k)
        return out


def no_network_program(machine: str | None = None) -> bytes:
    """The filter for `machine` (this one by default) as packed `struct sock_filter`s."""
    arch, nr = ARCHES[machine or _machine()]
    p = _Program()
    p.prologue(arch, "deny")
    p.op(_JEQ, nr["socket"], "socket", 0)
    p.op(_JEQ, nr["socketpair"], "socket", 0)  # same arguments (family, type, protocol)
    p.op(_JEQ, nr["connect"], "deny", 0)
    p.op(_JEQ, nr["sendto"], "flags3", 0)
    p.op(_JEQ, nr["sendmmsg"], "flags3", 0)
    p.op(_JEQ, nr["sendmsg"], "flags2", 0)
    for number in _IO_URING:
        p.op(_JEQ, number, "deny", 0)
    p.op(_RET, _RET_ALLOW)

    p.label("socket")
    p.op(_LD_ABS, _arg(0))  # family
    p.op(_JEQ, AF_UNIX, "unix", 0)
    p.op(_JEQ, AF_INET, "inet", 0)
    p.op(_JEQ, AF_INET6, "inet", 0)
    p.op(_JEQ, AF_NETLINK, "netlink", "deny")
    p.label("unix")  # stream and seqpacket need connect(); datagrams do not
    p.op(_LD_ABS, _arg(1))
    p.op(_AND, SOCK_TYPE_MASK)  # without SOCK_CLOEXEC / SOCK_NONBLOCK
    p.op(_JEQ, SOCK_STREAM, "allow", 0)
    p.op(_JEQ, SOCK_SEQPACKET, "allow", "deny")
    p.label("inet")  # TCP only: SCTP and MPTCP are streams too, with their own ways out
    p.op(_LD_ABS, _arg(1))
    p.op(_AND, SOCK_TYPE_MASK)
    p.op(_JEQ, SOCK_STREAM, 0, "deny")
    p.op(_LD_ABS, _arg(2))
    p.op(_JEQ, 0, "allow", 0)
    p.op(_JEQ, IPPROTO_TCP, "allow", "deny")
    p.label("netlink")
    p.op(_LD_ABS, _arg(2))
    p.op(_JEQ, NETLINK_ROUTE, "allow", "deny")

    p.label("flags2")
    p.op(_LD_ABS, _arg(2))
    p.op(_JSET, MSG_FASTOPEN, "deny", "allow")
    p.label("flags3")
    p.op(_LD_ABS, _arg(3))
    p.op(_JSET, MSG_FASTOPEN, "deny", "allow")

    p.label("allow")
    p.op(_RET, _RET_ALLOW)
    p.label("deny")
    p.op(_RET, _DENY)
    return p.assemble()


def hardening_program(machine: str | None = None) -> bytes:
    """The hardening filter for `machine` (this one by default); see the module docstring."""
    name = machine or _machine()
    p = _Program()
    p.prologue(ARCHES[name][0], "nosys")
    for number in (*_IO_URING, _CLONE3, _OPENAT2):
        p.op(_JEQ, number, "nosys", 0)
    for number in _NAMESPACE_CALLS[name]:
        p.op(_JEQ, number, "flags0", 0)
    p.op(_JEQ, _PRLIMIT64[name], "pid0", 0)
    modes = sorted(_MODE_CALLS[name].items())
    for number, index in modes:
        p.op(_JEQ, number, f"mode{index}", 0)
    p.op(_RET, _RET_ALLOW)

    p.label("pid0")  # its own limits only (libc's setrlimit is prlimit64 with pid 0)
    p.op(_LD_ABS, _arg(0))
    p.op(_JEQ, 0, "allow", "deny")
    p.label("flags0")
    p.op(_LD_ABS, _arg(0))
    p.op(_JSET, CLONE_NEWUSER, "deny", "allow")
    for index in sorted({index for _, index in modes}):
        p.label(f"mode{index}")
        p.op(_LD_ABS, _arg(index))
        p.op(_JSET, S_ISUID_ISGID, "deny", "allow")

    p.label("allow")
    p.op(_RET, _RET_ALLOW)
    p.label("deny")
    p.op(_RET, _RET_ERRNO | errno.EPERM)
    p.label("nosys")
    p.op(_RET, _RET_ERRNO | errno.ENOSYS)
    return p.assemble()


def names_program(machine: str | None = None) -> bytes:
    """The filter that hands every call making a name (`name_calls`) to the supervisor of
    name_supervisor.py; open and openat only with O_CREAT."""
    p = _Program()
    p.prologue(ARCHES[machine or _machine()][0], "nosys")
    trapped = {nr: _CREATE_FLAGS.get(name) for nr, (name, _, _) in name_calls(machine).items()}
    for number, flags in sorted(trapped.items()):
        p.op(_JEQ, number, "notify" if flags is None else f"create{flags}", 0)
    p.op(_RET, _RET_ALLOW)
    for index in sorted({flags for flags in trapped.values() if flags is not None}):
        p.label(f"create{index}")
        p.op(_LD_ABS, _arg(index))
        p.op(_JSET, os.O_CREAT, "notify", "allow")
    p.label("allow")
    p.op(_RET, _RET_ALLOW)
    p.label("notify")
    p.op(_RET, _RET_USER_NOTIF)
    p.label("nosys")
    p.op(_RET, _RET_ERRNO | errno.ENOSYS)
    return p.assemble()


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def apply_no_network() -> None:
    """Filter this process (and all it later forks or execs); raises OSError if it cannot."""
    _apply(no_network_program)


def apply_hardening() -> None:
    """The hardening filter on this process (and all it later forks or execs); OSError if not."""
    _apply(hardening_program)


def install_names_filter() -> int:
    """`names_program` on this process (and all it later forks or execs); the descriptor of
    its listener, from which the supervisor takes each trapped call. WAIT_KILLABLE_RECV: once
    the supervisor holds a call, no signal can restart it (a folder made twice, EEXIST)."""
    return _apply(names_program, _FILTER_FLAG_NEW_LISTENER | _FILTER_FLAG_WAIT_KILLABLE_RECV)


class Listener:
    """The supervisor's end of the name filter: the calls it takes, and its answers
    (linux/seccomp.h: SECCOMP_IOCTL_NOTIF_*)."""

    _NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif: id, pid, flags, seccomp_data
    _RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags
    _ADDFD = struct.Struct("=QIIII")  # struct seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags

    def __init__(self, fd: int) -> None:
        self.fd = fd
        ioc = lambda way, nr, size: way << 30 | size << 16 | ord("!") << 8 | nr  # noqa: E731 - _IOC, asm-generic
        self._recv, self._send = ioc(3, 0, self._NOTIF.size), ioc(3, 1, self._RESP.size)
        self._id_valid, self._addfd = ioc(1, 2, 8), ioc(1, 3, self._ADDFD.size)
        try:  # 6.6+: a wake-up hands over the CPU (the kernel waits for the answer anyway)
            fcntl.ioctl(fd, ioc(1, 4, 8), 1)  # SECCOMP_IOCTL_NOTIF_SET_FLAGS, FD_SYNC_WAKE_UP
        except OSError:
            pass

    def receive(self) -> tuple[int, int, int, list[int]] | None:
        """(id, thread, syscall number, arguments) of the next call; None if it is gone."""
        buffer = bytearray(self._NOTIF.size)  # zeroed, or the kernel says EINVAL
        try:
            fcntl.ioctl(self.fd, self._recv, buffer, True)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return None
            raise
        nid, tid, _, nr, _, _, *args = self._NOTIF.unpack(buffer)
        return nid, tid, nr, args

    def answer(self, nid: int, error: int) -> None:
        """The call's result: 0, or -`error`."""
        try:
            fcntl.ioctl(self.fd, self._send, self._RESP.pack(nid, 0, -error, 0))
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the target is gone
                raise

    def waiting(self, nid: int) -> bool:
        """Whether call `nid` still waits (its thread was not killed, its number not reused)."""
        try:
            fcntl.ioctl(self.fd, self._id_valid, struct.pack("=Q", nid))
        except OSError:
            return False
        return True

    def send_fd(self, nid: int, fd: int, cloexec: bool) -> None:
        """A copy of `fd` in the target, returned as the call's result (ADDFD_FLAG_SEND)."""
        flags = os.O_CLOEXEC if cloexec else 0
        fcntl.ioctl(self.fd, self._addfd, self._ADDFD.pack(nid, 2, fd, 0, flags))


def _apply(make: Callable[[], bytes], flags: int = 0) -> int:
    """Put the filter `make` builds on this process, by seccomp(2) with `flags`; its result
    (a listener's descriptor with NEW_LISTENER)."""
    if not supported():
        raise OSError(errno.ENOSYS, f"no seccomp filter for this machine ({os.uname().machine})")
    program = make()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _Fprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # Without no_new_privs a filter needs CAP_SYS_ADMIN; with it, exec cannot gain privileges
    # (a setuid binary would otherwise run unfiltered).
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    done = libc.syscall(_SECCOMP_SYSCALL[_machine()], _SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog))
    if done < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER) failed")
    return int(done)
