"""Writes on a note's behalf never leave the vault, whatever the vault became meanwhile (issue 9)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.disk.atomic import remove_file, swap_note, write_attachment
from vault_runner.disk.vault import load_vault
from vault_runner.errors import VaultError, WriteConflict

NOTE = "---\nvault-runner: true\n---\n```python\nprint(1)\n```\n"


@pytest.fixture
def vault_and_outside(tmp_path: Path) -> tuple[Path, Path]:
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": NOTE})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "n.md").write_text(NOTE, encoding="utf-8")
    return root, outside


def test_a_folder_swapped_for_a_symlink_out_of_the_vault_is_refused(vault_and_outside: tuple[Path, Path]) -> None:
    root, outside = vault_and_outside
    note = root / "Notas" / "n.md"
    data = note.read_bytes()
    os.rename(root / "Notas", root / "Notas-old")
    os.symlink(outside, root / "Notas")
    with pytest.raises(VaultError, match="symlink"):
        swap_note(note, data, data + b"written\n", root=root)
    assert (outside / "n.md").read_text(encoding="utf-8") == NOTE
    assert (root / "Notas-old" / "n.md").read_bytes() == data


def test_an_attachment_folder_swapped_for_a_symlink_gets_nothing_written(vault_and_outside: tuple[Path, Path]) -> None:
    root, outside = vault_and_outside
    os.symlink(outside, root / "adjuntos")
    with pytest.raises(VaultError):
        write_attachment(root / "adjuntos" / "x-vr-0123456789ab.png", b"#!/bin/sh\necho pwned\n", root=root)
    assert sorted(p.name for p in outside.iterdir()) == ["n.md"]


def test_an_attachment_named_like_a_symlink_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "vault", {})
    target = tmp_path / "precious.txt"
    target.write_text("keep me", encoding="utf-8")
    os.symlink(target, root / "x-vr-0123456789ab.png")
    assert write_attachment(root / "x-vr-0123456789ab.png", b"\x89PNG\r\n\x1a\nfake", root=root)
    assert target.read_text(encoding="utf-8") == "keep me"
    assert not (root / "x-vr-0123456789ab.png").is_symlink()


def test_a_stale_attachment_that_became_a_symlink_is_not_followed(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "vault", {})
    target = tmp_path / "precious.png"
    target.write_bytes(b"keep")
    os.symlink(target, root / "x-vr-0123456789ab.png")
    assert not remove_file(root / "x-vr-0123456789ab.png", root=root)
    assert target.read_bytes() == b"keep"


def test_a_note_moved_out_of_the_vault_after_its_folder_was_opened_is_refused(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": NOTE})
    note = root / "Notas" / "n.md"
    data = note.read_bytes()
    away = tmp_path / "away"
    os.rename(root / "Notas", away)
    with pytest.raises(VaultError):
        swap_note(note, data, data + b"x\n", root=root)
    assert (away / "n.md").read_bytes() == data


def test_a_fifo_named_like_a_note_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "vault", {})
    fifo = root / "x.md"
    os.mkfifo(fifo)
    vault = load_vault(root)
    started = time.monotonic()
    with pytest.raises(VaultError, match="not a regular file"):
        vault.read_note(fifo)
    assert time.monotonic() - started < 5


def test_a_symlink_loop_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "vault", {})
    os.symlink(root / "b.md", root / "a.md")
    os.symlink(root / "a.md", root / "b.md")
    with pytest.raises(VaultError, match="symlink loop"):
        load_vault(root).read_note(root / "a.md")


def test_an_in_place_save_blocked_by_the_lease_lands_in_the_note(tmp_path: Path) -> None:
    """The editor's open for writing waits on our read lease; its save is kept, ours redone."""
    path = tmp_path / "note.md"
    path.write_bytes(b"start\n")
    saved = threading.Event()

    def editor(old_file: Path) -> None:
        # Opens the file the note was before our rename (as an editor whose open() resolved the
        # path just before it): the kernel holds it in open() while our read lease is held.
        with open(old_file, "w", encoding="utf-8") as handle:
            handle.write("start\ntyped\n")
        saved.set()

    import vault_runner.disk.atomic as atomic

    real = atomic._replace_if_unchanged

    def replace_then_type(folder: atomic.Folder, name: str, expected: bytes, new: bytes) -> None:
        real(folder, name, expected, new)
        if new == b"ours\n":
            (old_file,) = tmp_path.glob(".note.md.*.vr-old")  # the hard link to the replaced file
            thread = threading.Thread(target=editor, args=(old_file,))
            thread.start()
            time.sleep(0.3)  # the editor is now waiting inside open()

    atomic._replace_if_unchanged = replace_then_type
    try:
        with pytest.raises(WriteConflict):
            swap_note(path, b"start\n", b"ours\n")
    finally:
        atomic._replace_if_unchanged = real
    assert saved.wait(10)
    assert path.read_bytes() == b"start\ntyped\n"


def test_clean_leaves_no_empty_attachment_folder_behind(tmp_path: Path) -> None:
    """Issue 15.14: clean left the (now empty) attachment folder it had created."""
    from vault_runner.disk.attachments import remove_stale_attachments

    root = make_note_vault(tmp_path / "vault", {})
    folder = root / "adjuntos"
    write_attachment(folder / "n-vr-0123456789ab.png", b"\x89PNG\r\n\x1a\n", root=root)
    remove_stale_attachments(folder, {"n-vr-0123456789ab.png"}, "", root=root)
    assert not folder.exists()
    keep = root / "mine"
    keep.mkdir()
    (keep / "photo.png").write_bytes(b"x")
    write_attachment(keep / "n-vr-0123456789ab.png", b"\x89PNG\r\n\x1a\n", root=root)
    remove_stale_attachments(keep, {"n-vr-0123456789ab.png"}, "", root=root)
    assert (keep / "photo.png").exists()  # a folder with the user's files stays


def test_clean_removes_every_empty_folder_its_attachments_needed_and_no_other(tmp_path: Path) -> None:
    """Issue 15 review: an attachment folder `figs/plots` left `figs/` behind."""
    from vault_runner.disk.attachments import remove_stale_attachments

    root = make_note_vault(tmp_path / "vault", {})
    name = "n-vr-0123456789ab.png"
    folder = root / "figs" / "plots"
    write_attachment(folder / name, b"\x89PNG\r\n\x1a\n", root=root)
    remove_stale_attachments(folder, {name}, "", root=root)
    assert not (root / "figs").exists() and root.is_dir()

    write_attachment(folder / name, b"\x89PNG\r\n\x1a\n", root=root)
    (root / "figs" / "mine.png").write_bytes(b"x")
    remove_stale_attachments(folder, {name}, "", root=root)
    assert not folder.exists() and (root / "figs" / "mine.png").exists()  # not empty: it stays
