"""Attachments vault-runner made: which a region links, and removing those no longer linked."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from vault_runner.core.render import ATTACHMENT_LINK_RE
from vault_runner.disk.atomic import remove_empty_folder, remove_file
from vault_runner.disk.vault import ATTACHMENT_RE

__all__ = ("attachment_names", "links_to", "remove_stale_attachments")


def remove_stale_attachments(folder: Path, old_links: set[str], new_text: str, *, root: Path | None = None) -> None:
    """Delete attachments our old regions linked and the note no longer does: only our own
    files (name pattern), never through a symlink, never outside the vault `root`."""
    removed = False
    for name in old_links:
        if not ATTACHMENT_RE.search(name) or links_to(new_text, name):
            continue
        removed |= remove_file(folder / name, root=root)
    if removed and root is not None:
        # The folders our attachments needed (`figs/plots` makes both), each while it is empty,
        # up to the vault root; each removed through its parent opened from the root, never by
        # path, so a symlink on the way stops it.
        while folder != root and remove_empty_folder(folder, root=root):
            folder = folder.parent


def attachment_names(body: str) -> set[str]:
    names = set()
    for match in ATTACHMENT_LINK_RE.finditer(body):
        target = match.group(1) or match.group(2) or ""
        names.add(unquote(target.strip()).rsplit("/", 1)[-1])
    return names


def links_to(text: str, name: str) -> bool:
    return name in text or name.replace(" ", "%20") in text
