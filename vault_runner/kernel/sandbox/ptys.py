"""Ptys for a Landlock kernel that has no /dev/pts of its own (no mount namespace here).

IPython runs ``!cmd`` on a pty (pexpect), and opening one goes through /dev/pts, where
Landlock cannot tell the kernel's new pty from the user's terminals (whose keystrokes a
reader would take). So the kernel gets no /dev/pts at all, and `start_broker`, called by the
launcher before Landlock applies, forks a small helper that opens fresh pty pairs on request
and passes them over a socket: the kernel only ever holds ptys made for it. `STARTUP`, an
IPython startup file in the kernel's own IPYTHONDIR, makes ``os.openpty``/``pty.fork`` ask it.

The helper runs nothing but the loop below, has no capabilities (dropped before it is
forked), cannot be traced by the Landlock-restricted kernel, and ends with the kernel.
Standard library only: loaded by path by launch.py.
"""

from __future__ import annotations

import array
import ctypes
import os
import signal
import socket

__all__ = ("ENV", "STARTUP", "start_broker")

ENV = "VAULT_RUNNER_PTY_FD"  # the kernel's end of the socket
_PR_SET_PDEATHSIG = 1


def start_broker() -> int:
    """Fork the helper; return the inheritable fd of the kernel's end (also put in ENV)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the helper
        try:
            theirs.close()
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(0)
            _serve(ours)
        finally:
            os._exit(0)
    ours.close()
    fd = theirs.detach()
    os.set_inheritable(fd, True)
    os.environ[ENV] = str(fd)
    return fd


def _serve(channel: socket.socket) -> None:
    while True:
        try:
            request = channel.recv(16)
        except OSError:
            return
        if not request:
            return  # the kernel is gone
        try:
            master, slave = os.openpty()
        except OSError:
            channel.send(b"e")
            continue
        try:
            channel.sendmsg([b"p"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master, slave]))])
        except OSError:
            return
        finally:
            os.close(master)
            os.close(slave)


STARTUP = """
def __vault_runner_ptys():
    import array, fcntl, os, pty, socket, termios, threading
    fd = os.environ.pop(__ENV__, None)
    if fd is None:
        return
    channel = socket.socket(fileno=int(fd))
    channel.set_inheritable(False)
    lock = threading.Lock()

    def openpty():
        size = array.array("i").itemsize
        with lock:
            channel.send(b"p")
            reply, ancillary, _, _ = channel.recvmsg(1, socket.CMSG_SPACE(2 * size))
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % size])
        if reply != b"p" or len(fds) != 2:
            raise OSError("out of pty devices")
        return fds[0], fds[1]

    def fork():
        # pty.fork() reopens the terminal by its /dev/pts name, which Landlock refuses here.
        master, slave = openpty()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            os.close(master)
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for target in (0, 1, 2):
                os.dup2(slave, target)
            if slave > 2:
                os.close(slave)
        else:
            os.close(slave)
        return pid, master

    os.openpty = pty.openpty = openpty
    pty.fork = fork
__vault_runner_ptys()
del __vault_runner_ptys
""".replace("__ENV__", repr(ENV))
