"""Atomic, compare-and-swap writes of notes and attachments: the one place a byte of a note changes.

write_if_unchanged is contract 5 (temp file in the same folder, fsync, keep the mode, re-check,
rename); swap_note adds the guard against an editor's in-place save landing during the swap.
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from vault_runner.errors import WriteConflict

__all__ = ("swap_note", "write_attachment", "write_if_unchanged")


def write_if_unchanged(path: Path, expected: bytes, new: bytes) -> None:
    """Atomically replace `path` with `new`, only if it still holds `expected`.

    Temp file in the same folder, fsync, keep the mode, re-check, rename. Raises
    WriteConflict when the file no longer holds `expected`, so the caller can redo its
    splice on the fresh text; no edit made meanwhile is ever overwritten.
    """
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        raise WriteConflict(f"{path} disappeared") from None
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".vr-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(new)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            raise WriteConflict(f"{path} disappeared") from None
        if current != expected:
            raise WriteConflict(f"{path} changed while it ran")
        os.replace(temp_name, path)
        temp_name = ""
        _fsync_dir(path.parent)
    finally:
        if temp_name:
            try:
                os.unlink(temp_name)
            except FileNotFoundError:
                pass


# -- an in-place save that lands during the swap ----------------------------------------------
# An editor that saves in place (Obsidian does) and opens the note between our compare and our
# rename writes into the file the rename just replaced: its save would be lost. A read lease on
# the old file (fcntl F_SETLEASE) makes the kernel tell us of every open for writing while we
# hold it; the writer waits until we let go. So: hold the lease, keep the old file reachable by a
# hard link, swap; if the lease was broken, put the old file back under its name before letting
# go, and the save lands where the editor meant it to. Where leases are not available (another
# owner without CAP_LEASE, a filesystem without them), the replaced file is read after the rename
# instead, which catches a save unless the writer stalls between its open and its write.
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
_WRITER_WAIT_S = 0.5


def swap_note(path: Path, expected: bytes, new: bytes) -> None:
    """write_if_unchanged, and no in-place save that opens the note meanwhile is lost.

    Raises WriteConflict when the note changed or was being saved, so the caller splices
    again on the saved text.
    """
    try:
        old = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise WriteConflict(f"{path} disappeared") from None
    try:
        if _take_read_lease(old):
            _swap_under_lease(path, old, expected, new)
        else:
            _swap_and_look_back(path, old, expected, new)
    finally:
        os.close(old)


def _take_read_lease(fd: int) -> bool:
    """True once we hold a read lease; False where leases cannot be had here."""
    deadline = time.monotonic() + _WRITER_WAIT_S
    while True:
        try:
            # The kernel signals the lease holder when a writer comes (SIGIO by default, which
            # would kill us): ask for SIGURG, ignored by default, then for no signal at all;
            # the lease state is polled instead.
            fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)
            fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
            fcntl.fcntl(fd, fcntl.F_SETOWN, 0)
            return True
        except BlockingIOError:  # someone has it open for writing: a save is under way
            if time.monotonic() > deadline:
                raise WriteConflict("the note is being saved") from None
            time.sleep(0.002)
        except OSError:  # EACCES (not our file), EINVAL (no leases on this filesystem), ...
            return False


def _swap_under_lease(path: Path, old: int, expected: bytes, new: bytes) -> None:
    keep = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.vr-old")
    try:
        os.link(path, keep, follow_symlinks=False)
    except OSError:
        keep = None
    try:
        write_if_unchanged(path, expected, new)
        if fcntl.fcntl(old, _F_GETLEASE) == fcntl.F_RDLCK:
            return
        # A writer opened the old file after our compare: it is waiting for us.
        if keep is not None and path.read_bytes() == new:
            os.replace(keep, path)
            keep = None
            raise WriteConflict(f"{path} was saved while vault-runner replaced it")
        _put_back_late_save(path, old, expected, new, release=True)
    finally:
        _release_lease(old)
        if keep is not None:
            try:
                os.unlink(keep)
            except FileNotFoundError:
                pass


def _swap_and_look_back(path: Path, old: int, expected: bytes, new: bytes) -> None:
    write_if_unchanged(path, expected, new)
    _put_back_late_save(path, old, expected, new, release=False)


def _put_back_late_save(path: Path, old: int, expected: bytes, new: bytes, *, release: bool) -> None:
    if release:
        _release_lease(old)
    late = _late_save(old, expected)
    if late is not None and late != new:
        write_if_unchanged(path, new, late)
        raise WriteConflict(f"{path} was saved while vault-runner replaced it")


def _release_lease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def _late_save(fd: int, expected: bytes) -> bytes | None:
    """What was saved into the replaced file (through `fd`) after the compare, or None."""
    for pause in (0.0, 0.002):  # the second look catches an open() that was mid-way
        time.sleep(pause)
        data = _read_fd(fd)
        if data != expected:
            break
    else:
        return None
    deadline = time.monotonic() + _WRITER_WAIT_S
    while time.monotonic() < deadline:  # it is being written: wait until it holds still
        time.sleep(0.002)
        again = _read_fd(fd)
        if again == data and data:
            break
        data = again
    return data


def _read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def write_attachment(path: Path, data: bytes) -> bool:
    """Write an attachment unless an identical file is already there. True if written."""
    try:
        if path.read_bytes() == data:
            return False
    except (FileNotFoundError, IsADirectoryError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".vr-tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temp_name, 0o644)
    os.replace(temp_name, path)
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
