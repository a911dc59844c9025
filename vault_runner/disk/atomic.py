"""Atomic, compare-and-swap writes of notes and attachments: the one place a byte of a note changes.

The vault is hostile at write time (DESIGN.md, addition 10): a block may swap a folder for a
symlink between two lines of ours. So nothing here writes through a path. The folder is
opened by walking from the vault root one name at a time without following a symlink, and
every read, temp file, rename and unlink happens inside that directory descriptor; just
before a rename the descriptor is checked to still be inside the vault.

write_if_unchanged is contract 5 (temp file in the same folder, fsync, keep the mode,
re-check, rename); swap_note adds the guard against an editor's in-place save landing
during the swap.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import signal
import stat
import threading
import time
from pathlib import Path

from vault_runner.errors import VaultError, WriteConflict

__all__ = (
    "Folder",
    "read_file",
    "remove_empty_folder",
    "remove_file",
    "swap_note",
    "write_attachment",
    "write_if_unchanged",
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class Folder:
    """A folder of the vault, opened from the vault root without following a symlink.

    `root=None` trusts the folder as given (no walk): for files that are not in a vault.
    """

    def __init__(self, folder: Path, root: Path | None = None, *, create: bool = False) -> None:
        self.path = folder
        self.root = root
        self.fd = self._open(folder, root, create)

    @staticmethod
    def _open(folder: Path, root: Path | None, create: bool) -> int:
        if root is None:
            return os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            parts = folder.relative_to(root).parts
        except ValueError:
            raise VaultError(folder, _OUTSIDE) from None
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts:
                if part in ("..", "."):
                    raise VaultError(folder, _OUTSIDE)
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    raise VaultError(folder, "no longer exists (deleted or renamed while it ran?)") from None
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise VaultError(folder, _SYMLINKED) from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_inside(self) -> None:
        """The folder we hold is still inside the vault (it may have been moved meanwhile)."""
        if self.root is None:
            return
        try:
            where = os.readlink(f"/proc/self/fd/{self.fd}")
        except OSError:
            return  # no /proc: the walk at open time is what we have
        if not Path(where).is_relative_to(self.root.resolve()):
            raise VaultError(self.path, _OUTSIDE)

    def open_file(self, name: str) -> int:
        """A read-only descriptor of a regular file of this folder (never a symlink, FIFO, ...)."""
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise VaultError(self.path / name, "was replaced by a symlink; it is left as it is") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise VaultError(self.path / name, "is not a regular file; it is left as it is")
        return fd

    def read(self, name: str) -> bytes:
        fd = self.open_file(name)
        try:
            return read_fd(fd)
        finally:
            os.close(fd)

    def temp_file(self, name: str, data: bytes, mode: int) -> str:
        """Write `data` to a new temp file beside `name`, fsynced; returns its name."""
        temp = f".{name}.{secrets.token_hex(4)}.vr-tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=self.fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.unlink(temp)
            raise
        os.close(fd)
        return temp

    def replace(self, source: str, target: str) -> None:
        self.check_inside()
        os.replace(source, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def link(self, source: str, target: str) -> None:
        os.link(source, target, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)

    def unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def mode_of(self, name: str) -> int:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode & 0o7777

    def is_regular(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    def fsync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError:
            pass


_OUTSIDE = "is no longer inside the vault (its folder was moved or replaced); nothing was written there"
_SYMLINKED = (
    "has a folder that is now a symlink (a block replaced it while it ran?); nothing was written, "
    "since vault-runner never writes through a symlink out of the vault"
)


def read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_file(path: Path, *, root: Path | None = None) -> bytes:
    """The bytes of a regular file, read through its folder opened safely inside `root`."""
    with Folder(path.parent, root) as folder:
        return folder.read(path.name)


def write_if_unchanged(path: Path, expected: bytes, new: bytes, *, root: Path | None = None) -> None:
    """Atomically replace `path` with `new`, only if it still holds `expected`.

    Temp file in the same folder, fsync, keep the mode, re-check, rename. Raises
    WriteConflict when the file no longer holds `expected`, so the caller can redo its
    splice on the fresh text; no edit made meanwhile is ever overwritten. VaultError when
    the note's folder is no longer inside the vault `root`.
    """
    with Folder(path.parent, root) as folder:
        _replace_if_unchanged(folder, path.name, expected, new)


def _replace_if_unchanged(folder: Folder, name: str, expected: bytes, new: bytes) -> None:
    try:
        mode = folder.mode_of(name)
    except FileNotFoundError:
        raise WriteConflict(f"{folder.path / name} disappeared") from None
    temp = folder.temp_file(name, new, mode)
    try:
        try:
            current = folder.read(name)
        except FileNotFoundError:
            raise WriteConflict(f"{folder.path / name} disappeared") from None
        if current != expected:
            raise WriteConflict(f"{folder.path / name} changed while it ran")
        folder.replace(temp, name)
        temp = ""
        folder.fsync()
    finally:
        if temp:
            folder.unlink(temp)


def write_attachment(path: Path, data: bytes, *, root: Path | None = None) -> bool:
    """Write an attachment unless an identical file is already there. True if written.

    Creates its folder as needed, inside the vault `root`, never through a symlink.
    """
    with Folder(path.parent, root, create=True) as folder:
        try:
            if folder.read(path.name) == data:
                return False
        except (FileNotFoundError, IsADirectoryError):
            pass
        except VaultError:
            pass  # a symlink or a FIFO by that name: replaced by our file, never followed
        temp = folder.temp_file(path.name, data, 0o644)
        try:
            folder.replace(temp, path.name)
        except BaseException:
            folder.unlink(temp)
            raise
        return True


def remove_file(path: Path, *, root: Path | None = None) -> bool:
    """Remove a regular file (never a symlink's target, never outside the vault). True if removed."""
    try:
        with Folder(path.parent, root) as folder:
            if not folder.is_regular(path.name):
                return False
            folder.check_inside()
            folder.unlink(path.name)
            return True
    except (OSError, VaultError):
        return False


def remove_empty_folder(path: Path, *, root: Path) -> bool:
    """Remove a folder inside the vault (never the vault itself) if it is empty. True if removed."""
    if path == root:
        return False
    try:
        with Folder(path.parent, root) as parent:
            parent.check_inside()
            os.rmdir(path.name, dir_fd=parent.fd)
            return True
    except (OSError, VaultError):
        return False  # not empty, a symlink, gone: left as it is


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


def swap_note(path: Path, expected: bytes, new: bytes, *, root: Path | None = None) -> None:
    """write_if_unchanged, and no in-place save that opens the note meanwhile is lost.

    Raises WriteConflict when the note changed or was being saved, so the caller splices
    again on the saved text; VaultError when the note's folder left the vault.
    """
    with Folder(path.parent, root) as folder:
        try:
            old = folder.open_file(path.name)
        except FileNotFoundError:
            raise WriteConflict(f"{path} disappeared") from None
        try:
            if _take_read_lease(old):
                _swap_under_lease(folder, path.name, old, expected, new)
            else:
                _replace_if_unchanged(folder, path.name, expected, new)
                _put_back_late_save(folder, path.name, old, expected, new, release=False)
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


def _swap_under_lease(folder: Folder, name: str, old: int, expected: bytes, new: bytes) -> None:
    keep: str | None = f".{name}.{os.getpid()}.{threading.get_ident()}.vr-old"
    try:
        folder.link(name, keep)
    except OSError:
        keep = None
    try:
        _replace_if_unchanged(folder, name, expected, new)
        if fcntl.fcntl(old, _F_GETLEASE) == fcntl.F_RDLCK:
            return
        # A writer opened the old file after our compare: it is waiting for us.
        if keep is not None and folder.read(name) == new:
            folder.replace(keep, name)
            keep = None
            raise WriteConflict(f"{folder.path / name} was saved while vault-runner replaced it")
        _put_back_late_save(folder, name, old, expected, new, release=True)
    finally:
        _release_lease(old)
        if keep is not None:
            folder.unlink(keep)


def _put_back_late_save(folder: Folder, name: str, old: int, expected: bytes, new: bytes, *, release: bool) -> None:
    if release:
        _release_lease(old)
    late = _late_save(old, expected)
    if late is not None and late != new:
        _replace_if_unchanged(folder, name, new, late)
        raise WriteConflict(f"{folder.path / name} was saved while vault-runner replaced it")


def _release_lease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def _late_save(fd: int, expected: bytes) -> bytes | None:
    """What was saved into the replaced file (through `fd`) after the compare, or None."""
    for pause in (0.0, 0.002):  # the second look catches an open() that was mid-way
        time.sleep(pause)
        data = read_fd(fd)
        if data != expected:
            break
    else:
        return None
    deadline = time.monotonic() + _WRITER_WAIT_S
    while time.monotonic() < deadline:  # it is being written: wait until it holds still
        time.sleep(0.002)
        again = read_fd(fd)
        if again == data and data:
            break
        data = again
    return data
