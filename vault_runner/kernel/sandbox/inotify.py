"""A minimal Linux inotify reader (ctypes): the guard's way to hear of a name the moment it is made.

Only what protected.py needs: watch folders for names made or moved in, read events without
blocking. watchdog (a dependency) hides its inotify reader behind an event queue that waits
to pair moves, which costs the very latency the guard is after.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

__all__ = ("Inotify", "IN_ISDIR", "IN_Q_OVERFLOW", "IN_IGNORED")

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


class Inotify:
    """One inotify instance. `Inotify.open()` is None where there is none (not Linux, no libc)."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self.fd = fd
        self._libc = libc
        self.full = False  # the watch limit was reached: some folders are not watched

    @classmethod
    def open(cls) -> Inotify | None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init = libc.inotify_init1
        except (OSError, AttributeError, TypeError):
            return None
        fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
        return None if fd < 0 else cls(fd, libc)

    def watch(self, folder: str) -> int | None:
        """Watch `folder` (never through a symlink) for names made or moved in; its watch
        descriptor, None when it cannot be watched (gone, or the limit: `full`)."""
        mask = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), mask)
        if wd < 0:
            if ctypes.get_errno() == errno.ENOSPC:
                self.full = True
            return None
        return int(wd)

    def read(self) -> list[tuple[int, int, str]]:
        """The events waiting now, as (wd, mask, name); [] when none."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out = []
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, size = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size
            name = os.fsdecode(data[offset : offset + size].rstrip(b"\0"))
            offset += size
            out.append((wd, mask, name))
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
