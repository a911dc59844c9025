"""Remove every output region of a note, and the attachments vault-runner made for them."""

from __future__ import annotations

from pathlib import Path

from vault_runner.core import note as notes
from vault_runner.disk.atomic import swap_note
from vault_runner.disk.attachments import attachment_names, remove_stale_attachments
from vault_runner.disk.vault import Vault, VaultError
from vault_runner.engine.writeback import MAX_WRITE_ATTEMPTS
from vault_runner.errors import WriteConflict

__all__ = ("clean_note",)


def clean_note(vault: Vault, path: Path) -> bool:
    """Remove every output region of a note and the attachments vault-runner made for them.

    Returns True when the note was written. Same compare-and-swap as a run's write-back.
    """
    for _attempt in range(MAX_WRITE_ATTEMPTS):
        loaded_bytes = vault.read_note(path)
        if b"vault-runner:" not in loaded_bytes:
            return False  # no region of ours: nothing to parse
        try:
            note = notes.parse_note(notes.decode_note(loaded_bytes))
        except notes.NoteError as exc:
            raise VaultError(path, exc.message, exc.line) from None
        if note.problems:
            raise VaultError(path, note.problems[0].message, note.problems[0].line)
        with_region = [b for b in note.blocks if b.region is not None]
        if not with_region:
            return False
        links: set[str] = set()
        for block in with_region:
            assert block.region is not None
            links |= attachment_names(block.region.body)
        new_text = notes.strip_regions(note)
        try:
            swap_note(path, loaded_bytes, new_text.encode("utf-8", "surrogatepass"), root=vault.root)
        except WriteConflict:
            continue
        remove_stale_attachments(vault.attachment_dir(path), links, new_text, root=vault.root)
        return True
    raise VaultError(path, "kept changing while vault-runner tried to clean it; try again")
