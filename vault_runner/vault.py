"""The vault on disk: where it is, its settings, its notes, attachments and safe writes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from .errors import VaultError, WriteConflict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_NAME = "vault-runner.toml"
MAX_NOTE_BYTES = 10 * 1024 * 1024
ATTACHMENT_RE = re.compile(r"-vr-([0-9a-f]{12})\.(png|jpg|jpeg|gif|svg)$")
_SKIPPED_DIRS = {".obsidian", ".trash", ".git", "node_modules", "__pycache__"}


@dataclass(frozen=True)
class VaultConfig:
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    sanitizers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Vault:
    root: Path
    attachment_folder: str = "/"
    use_markdown_links: bool = False
    new_link_format: str = "shortest"
    ignore_filters: tuple[str, ...] = ()
    config: VaultConfig = field(default_factory=VaultConfig)

    # -- finding notes ---------------------------------------------------------------
    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def is_ignored(self, relative: str) -> bool:
        parts = PurePosixPath(relative).parts
        if any(part.startswith(".") or part in _SKIPPED_DIRS for part in parts):
            return True
        for flt in self.ignore_filters:
            if len(flt) > 2 and flt.startswith("/") and flt.endswith("/"):
                try:
                    if re.search(flt[1:-1], relative):
                        return True
                except re.error:
                    continue
            elif relative.startswith(flt):
                return True
        return False

    def notes(self, under: Path | None = None) -> Iterator[Path]:
        """Every markdown note of the vault (or of one of its folders), in a stable order,
        skipping what Obsidian hides."""
        for folder, dirs, files in os.walk(under or self.root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS)
            for name in sorted(files):
                if not name.lower().endswith(".md"):
                    continue
                path = Path(folder) / name
                relative = path.relative_to(self.root).as_posix()
                if not self.is_ignored(relative):
                    yield path

    # -- reading and writing ---------------------------------------------------------
    def check_inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise VaultError(
                path,
                f"points outside the vault {self.root} (a symlink?); vault-runner only touches files inside the vault",
            )
        return resolved

    def read_note(self, path: Path) -> bytes:
        self.check_inside(path)
        try:
            if path.is_dir():
                raise VaultError(path, "is a folder, not a note")
            size = path.stat().st_size
            if size > MAX_NOTE_BYTES:
                raise VaultError(
                    path,
                    f"is {size / 2**20:.1f} MB, over the "
                    f"{MAX_NOTE_BYTES // 2**20} MB limit for notes vault-runner runs; "
                    "split it into smaller notes",
                )
            return path.read_bytes()
        except FileNotFoundError:
            raise VaultError(path, "no longer exists (deleted or renamed?)") from None
        except PermissionError:
            raise VaultError(path, "cannot be read (permission denied)") from None

    # -- attachments -------------------------------------------------------------------
    def attachment_dir(self, note: Path) -> Path:
        folder = self.attachment_folder.strip() or "/"
        if folder == "/":
            return self.root
        if folder == "." or folder == "./":
            return note.parent
        if folder.startswith("./"):
            return note.parent / folder[2:]
        return self.root / folder.strip("/")

    def embed(self, note: Path, attachment: Path) -> str:
        """How the note embeds an attachment, following the vault's link settings."""
        if self.new_link_format == "absolute":
            target = attachment.relative_to(self.root).as_posix()
        elif self.new_link_format == "relative":
            target = os.path.relpath(attachment, note.parent).replace(os.sep, "/")
        else:  # shortest: our names carry a content hash, so the bare name is unique
            target = attachment.name
        if self.use_markdown_links:
            return f"![]({quote(target, safe='/')})"
        return f"![[{target}]]"


def find_root(path: Path) -> Path:
    """The vault a path belongs to: the nearest folder above it with `.obsidian` or our config."""
    # Only the folders are resolved: a note that is a symlink belongs to the vault it sits
    # in, not to wherever it points (that is checked, and refused, when it is read).
    start = path.absolute()
    if not start.is_dir():
        start = start.parent
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / ".obsidian").is_dir() or (folder / CONFIG_NAME).is_file():
            return folder
    return start


def load_vault(path: Path) -> Vault:
    root = find_root(path)
    settings: dict[str, Any] = {}
    app_json = root / ".obsidian" / "app.json"
    if app_json.is_file():
        try:
            settings = json.loads(app_json.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise VaultError(app_json, f"cannot be read as JSON ({exc}); fix it in Obsidian's settings") from None
        if not isinstance(settings, dict):
            settings = {}
    return Vault(
        root=root,
        attachment_folder=str(settings.get("attachmentFolderPath") or "/"),
        use_markdown_links=bool(settings.get("useMarkdownLinks", False)),
        new_link_format=str(settings.get("newLinkFormat") or "shortest"),
        ignore_filters=tuple(str(f) for f in settings.get("userIgnoreFilters") or ()),
        config=load_config(root),
    )


def load_config(root: Path) -> VaultConfig:
    path = root / CONFIG_NAME
    if not path.is_file():
        return VaultConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise VaultError(path, f"is not valid TOML ({exc})", int(match.group(1)) if match else None) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VaultError(path, f"cannot be read ({exc})") from None

    def strings(key: str) -> list[str]:
        value = data.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise VaultError(path, f'`{key}` must be a list of folder globs such as ["Cursos/**"]')
        return value

    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise VaultError(path, "`[defaults]` must be a table of options")
    sanitizers = []
    for item in data.get("sanitize", []):
        if not isinstance(item, dict) or "pattern" not in item:
            raise VaultError(path, "each [[sanitize]] entry needs a `pattern` (and a `replace`)")
        sanitizers.append((str(item["pattern"]), str(item.get("replace", ""))))
    return VaultConfig(strings("include"), strings("exclude"), defaults, sanitizers)


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
