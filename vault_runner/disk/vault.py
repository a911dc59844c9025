"""The vault on disk: where it is, its settings, its notes and where attachments go."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from vault_runner.core.options import resolve
from vault_runner.disk.atomic import read_fd
from vault_runner.errors import OptionError, VaultError

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
        """The real path of a note (symlinks resolved), which must lie inside the vault."""
        try:
            resolved = path.resolve()
        except (RuntimeError, OSError):  # RuntimeError: a symlink loop (Python < 3.13)
            raise VaultError(path, "is a symlink loop; fix or remove the link") from None
        if not resolved.is_relative_to(self.root):
            raise VaultError(
                path,
                f"points outside the vault {self.root} (a symlink?); vault-runner only touches files inside the vault",
            )
        return resolved

    def read_note(self, path: Path) -> bytes:
        """A note's bytes. Only a regular file inside the vault is read: a FIFO, a device or a
        folder named like a note gets one line, and is never opened in a way that blocks."""
        self.check_inside(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise VaultError(path, "no longer exists (deleted or renamed?)") from None
        except PermissionError:
            raise VaultError(path, "cannot be read (permission denied); check the file's permissions") from None
        except IsADirectoryError:
            raise VaultError(path, "is a folder, not a note") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise VaultError(path, "is a folder, not a note")
            if not stat.S_ISREG(info.st_mode):
                raise VaultError(path, "is not a regular file (a FIFO, socket or device?), so it is skipped; rename it")
            if info.st_size > MAX_NOTE_BYTES:
                raise VaultError(
                    path,
                    f"is {info.st_size / 2**20:.1f} MB, over the "
                    f"{MAX_NOTE_BYTES // 2**20} MB limit for notes vault-runner runs; "
                    "split it into smaller notes",
                )
            return read_fd(fd)
        finally:
            os.close(fd)

    def check_writable(self, path: Path) -> None:
        """Refuse, before anything runs, a note vault-runner must not or cannot write: one the
        user made read-only (its write permission is off: the rename would replace it anyway,
        so it is asked here), one the user may not write, or one in a folder where no file can
        be created (the compare-and-swap writes a temp file beside the note). Raises VaultError."""
        real = self.check_inside(path)
        try:
            info = os.stat(real)
        except FileNotFoundError:
            raise VaultError(path, "no longer exists (deleted or renamed?)") from None
        if not info.st_mode & stat.S_IWUSR:
            raise VaultError(
                path,
                "is read-only, so vault-runner leaves it as it is; make it writable (chmod u+w) "
                "if you want vault-runner to write it",
            )
        if not os.access(real, os.W_OK):
            raise VaultError(path, "cannot be written (permission denied); check the file's permissions")
        if not os.access(real.parent, os.W_OK | os.X_OK):
            raise VaultError(
                path,
                "cannot be written: its folder does not let you create files (permission denied), and "
                "vault-runner writes a new copy beside the note to replace it safely; fix the folder's permissions",
            )

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
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
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
    try:
        resolve(defaults, {})  # a bad value here is the vault's, not a note's
    except OptionError as exc:
        raise VaultError(path, f"[defaults]: {exc}", _toml_key_line(text, exc.option)) from None
    sanitizers = []
    for item in data.get("sanitize", []):
        if not isinstance(item, dict) or "pattern" not in item:
            raise VaultError(path, "each [[sanitize]] entry needs a `pattern` (and a `replace`)")
        sanitizers.append((str(item["pattern"]), str(item.get("replace", ""))))
    return VaultConfig(strings("include"), strings("exclude"), defaults, sanitizers)


def _toml_key_line(text: str, key: str | None) -> int | None:
    """The line where `key = ...` is written (the first such line), if it is found."""
    if key:
        for number, line in enumerate(text.splitlines(), start=1):
            if re.match(rf"\s*{re.escape(key)}\s*=", line):
                return number
    return None
