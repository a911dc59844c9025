"""Remove the output regions of a note, and the attachments vault-runner made for them.

Only what vault-runner wrote goes: a region edited by hand is kept and reported (unless
forced), an orphaned region (its block gone) is removed only while its checksum says it is
unchanged, and markers that pair with nothing are the user's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vault_runner.core import note as notes
from vault_runner.core.freshness import hand_edit_message
from vault_runner.disk.atomic import swap_note
from vault_runner.disk.attachments import attachment_names, remove_stale_attachments
from vault_runner.disk.vault import Vault, VaultError
from vault_runner.engine.writeback import MAX_WRITE_ATTEMPTS
from vault_runner.errors import WriteConflict, shown_path

__all__ = ("Cleaned", "clean_note")


@dataclass
class Cleaned:
    """What `clean` did to one note."""

    written: bool = False
    kept: list[str] = field(default_factory=list)  # `note:line: why` for each region left in place


def clean_note(vault: Vault, path: Path, *, force: bool = False) -> Cleaned:
    """Remove the note's regions and their attachments. Same compare-and-swap as a write-back.

    Raises VaultError (one line) for a note that cannot be cleaned safely.
    """
    real = vault.check_inside(path)
    shown = shown_path(path)
    for _attempt in range(MAX_WRITE_ATTEMPTS):
        data = vault.read_note(path)
        if b"vault-runner:" not in data:
            return Cleaned()  # no region of ours: nothing to parse
        try:
            note = notes.parse_note(notes.decode_note(data))
        except notes.NoteError as exc:
            raise VaultError(path, exc.message, exc.line) from None
        if note.problems:
            raise VaultError(path, note.problems[0].message, note.problems[0].line)
        result = Cleaned()
        remove: dict[int, list[str] | None] = {}
        links: set[str] = set()
        for block in note.blocks:
            region = block.region
            if region is None:
                continue
            if region.hand_edited and not force:
                message = hand_edit_message(block.fence_line, cleaning=True)
                result.kept.append(f"{shown}:{region.first_line}: {message}")
                continue
            remove[block.index] = None
            links |= attachment_names(region.body)
        orphans = notes.removable_orphans(note)
        for orphan in orphans:
            links |= attachment_names(orphan.body)
        for orphan in note.orphans:
            if orphan.hand_edited:
                result.kept.append(
                    f"{shown}:{orphan.first_line}: an output region that follows no python block was edited "
                    "by hand, so it is left as it is; delete it yourself if you no longer need it"
                )
        if not remove and not orphans:
            return result
        vault.check_writable(path)  # a read-only note stays as the user made it
        new_text = notes.cleaned(note, force=force)
        try:
            swap_note(real, data, new_text.encode("utf-8", "surrogatepass"), root=vault.root)
        except WriteConflict:
            continue
        except PermissionError as exc:  # what check_writable could not foresee (an ACL, a sealed file)
            raise VaultError(
                path, f"cannot be written ({exc.strerror}); check its permissions and its folder's"
            ) from None
        try:
            remove_stale_attachments(vault.attachment_dir(real), links, new_text, root=vault.root)
        except PermissionError as exc:
            raise VaultError(
                vault.attachment_dir(real),
                f"holds attachments of the cleaned note that cannot be removed ({exc.strerror}); "
                "check the folder's permissions",
            ) from None
        result.written = True
        return result
    raise VaultError(path, "kept changing while vault-runner tried to clean it; try again")
