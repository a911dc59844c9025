"""The files of a vault that reach a Ray worker, and the private copy a note runs in there.

A note reads files beside itself (a CSV, a helper module, an image), so its worker needs
the vault. Two ways (README, "Running on a Ray cluster"): the driver ships a snapshot of
it (`pack`, one zip in Ray's object store, fetched once per node), or the workers see it
on a shared filesystem, maybe under another path (`worker_path`). Either way the note
runs in a scratch copy on the worker (`materialize`), emptied after the note: its kernel
may write anywhere in its vault, as it does locally, and none of that reaches the user's
vault, which only the driver writes (DESIGN.md, addition 13).

What is left out, both ways: what Obsidian and git keep for themselves (dot folders such
as `.obsidian/` and `.git/`, `node_modules`, `__pycache__`), the attachments
vault-runner wrote (outputs, which no note reads), and symlinks (a link out of the vault
would hand the worker a file of the driver's machine).
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from vault_runner.disk.vault import ATTACHMENT_RE
from vault_runner.errors import VaultError
from vault_runner.kernel.sandbox.policy import format_size, parse_size

__all__ = ("DEFAULT_MAX_VAULT", "MAX_VAULT_ENV", "materialize", "max_vault_bytes", "pack", "vault_files", "worker_path")

MAX_VAULT_ENV = "VAULT_RUNNER_RAY_MAX_VAULT"  # e.g. 2G: the most of a vault copied to a worker
DEFAULT_MAX_VAULT = 512 * 2**20
_SKIPPED_DIRS = {"node_modules", "__pycache__"}


def max_vault_bytes() -> int:
    value = os.environ.get(MAX_VAULT_ENV)
    return parse_size(value) if value else DEFAULT_MAX_VAULT


def vault_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Every file that reaches a worker: (its path, its `/`-separated path in the vault), sorted."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS)
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or ATTACHMENT_RE.search(name) or path.is_symlink() or not path.is_file():
                continue
            yield path, path.relative_to(root).as_posix()


def _checked(root: Path, limit: int) -> list[tuple[Path, str, int]]:
    found, total = [], 0
    for path, relative in vault_files(root):
        size = path.stat().st_size
        total += size
        if total > limit:
            raise VaultError(
                root,
                f"holds more than {format_size(limit)} of files to copy to each Ray worker; keep large data "
                f"outside the vault (workers read it by its own path), or raise the limit with {MAX_VAULT_ENV}=4G",
            )
        found.append((path, relative, size))
    return found


def pack(root: Path, limit: int) -> bytes:
    """A zip of the vault's files that reach a worker (VaultError when over `limit` bytes)."""
    buffer = io.BytesIO()
    # Stored, not deflated: notes are small, images and data do not shrink, and time matters.
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path, relative, _size in _checked(root, limit):
            archive.write(path, relative)
    return buffer.getvalue()


def worker_path(driver_root: Path, path_map: Sequence[tuple[str, str]]) -> Path:
    """Where a worker finds the vault on a shared filesystem: the first mapping whose driver
    side holds the vault (`/home/me/vaults=/mnt/vaults`), else the same path."""
    for driver, worker in path_map:
        try:
            rest = driver_root.relative_to(Path(driver))
        except ValueError:
            continue
        return Path(worker) / rest
    return driver_root


def materialize(destination: Path, source: bytes | Path, limit: int) -> None:
    """Fill the empty folder `destination` with the vault: from a `pack`ed zip, or by copying
    the files that reach a worker from the vault's folder on a shared filesystem."""
    if isinstance(source, bytes):
        with zipfile.ZipFile(io.BytesIO(source)) as archive:
            for name in archive.namelist():
                # Written by `pack`, but checked anyway: nothing lands outside the copy.
                if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                    raise VaultError(destination, f"the shipped vault holds a path outside it: {name}")
            archive.extractall(destination)
        return
    if not source.is_dir():
        raise VaultError(
            source,
            "is not a folder on this Ray worker: with --ray-vault shared the workers must see the vault, "
            "at the same path or where --ray-path-map DRIVER=WORKER says",
        )
    for path, relative, _size in _checked(source, limit):
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
