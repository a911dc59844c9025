"""Which notes a command runs on: folders expanded into their notes, each with its vault, once."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from vault_runner.disk.vault import Vault, find_root, load_vault
from vault_runner.errors import VaultError

__all__ = ("notes_under",)


def notes_under(paths: Iterable[Path]) -> list[tuple[Vault, Path]]:
    """Expand folders into their notes; each note with the vault it belongs to."""
    found: list[tuple[Vault, Path]] = []
    vaults: dict[Path, Vault] = {}
    for path in paths:
        if not path.exists():
            raise VaultError(path, "does not exist")
        root = find_root(path)
        vault = vaults.get(root) or vaults.setdefault(root, load_vault(path))
        if path.is_dir():
            found.extend((vault, p) for p in vault.notes(path.resolve()))
        else:
            found.append((vault, path))
    return _once_each(found)


def _once_each(found: list[tuple[Vault, Path]]) -> list[tuple[Vault, Path]]:
    """A note reached twice (a symlink to another note, a note given twice) runs once."""
    seen: set[Path] = set()
    unique = []
    for vault, path in found:
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop: load() reports it
            real = path
        if real not in seen:
            seen.add(real)
            unique.append((vault, path))
    return unique
