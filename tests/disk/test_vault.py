"""Vault settings, attachment placement, safe writes and option precedence: no kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vault_runner.core import options
from vault_runner.disk import vault
from vault_runner.disk.atomic import write_if_unchanged
from vault_runner.errors import OptionError, VaultError, WriteConflict


def make_vault(root: Path, app: dict | None = None, config: str | None = None) -> vault.Vault:
    (root / ".obsidian").mkdir(parents=True, exist_ok=True)
    (root / ".obsidian" / "app.json").write_text(json.dumps(app or {}), encoding="utf-8")
    if config is not None:
        (root / "vault-runner.toml").write_text(config, encoding="utf-8")
    return vault.load_vault(root)


@pytest.mark.parametrize(
    "setting,expected",
    [
        ("/", "."),
        ("./", "Cursos"),
        ("./adjuntos", "Cursos/adjuntos"),
        ("adjuntos", "adjuntos"),
        ("adjuntos/img", "adjuntos/img"),
    ],
)
def test_attachment_folder_follows_obsidian(tmp_path: Path, setting: str, expected: str) -> None:
    v = make_vault(tmp_path, {"attachmentFolderPath": setting})
    note = tmp_path / "Cursos" / "Nota.md"
    assert v.attachment_dir(note) == (tmp_path / expected).resolve() or v.attachment_dir(note) == tmp_path / expected


@pytest.mark.parametrize(
    "markdown,fmt,expected",
    [
        (False, "shortest", "![[a-vr-0.png]]"),
        (False, "absolute", "![[adjuntos/a-vr-0.png]]"),
        (False, "relative", "![[../adjuntos/a-vr-0.png]]"),
        (True, "shortest", "![](a-vr-0.png)"),
        (True, "relative", "![](../adjuntos/a-vr-0.png)"),
    ],
)
def test_embed_follows_link_settings(tmp_path: Path, markdown: bool, fmt: str, expected: str) -> None:
    v = make_vault(tmp_path, {"attachmentFolderPath": "adjuntos", "useMarkdownLinks": markdown, "newLinkFormat": fmt})
    note = tmp_path / "Cursos" / "Nota.md"
    assert v.embed(note, v.attachment_dir(note) / "a-vr-0.png") == expected


def test_markdown_links_encode_spaces(tmp_path: Path) -> None:
    v = make_vault(tmp_path, {"useMarkdownLinks": True})
    assert v.embed(tmp_path / "N.md", tmp_path / "Mi nota-vr-1.png") == "![](Mi%20nota-vr-1.png)"


def test_notes_skip_hidden_trash_and_ignore_filters(tmp_path: Path) -> None:
    v = make_vault(tmp_path, {"userIgnoreFilters": ["Plantillas/", "/borrador/"]})
    for rel in [
        "a.md",
        "Plantillas/p.md",
        ".trash/t.md",
        "x/.hidden/h.md",
        "mi borrador/b.md",
        "c/d.md",
        ".obsidian/o.md",
        "img.png",
    ]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x", encoding="utf-8")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in v.notes()) == ["a.md", "c/d.md"]
    # A folder of the vault is filtered like the vault: filters are relative to its root.
    assert list(v.notes(tmp_path / "Plantillas")) == []
    assert [p.relative_to(tmp_path).as_posix() for p in v.notes(tmp_path / "c")] == ["c/d.md"]


def test_write_if_unchanged_keeps_mode_and_refuses_a_changed_file(tmp_path: Path) -> None:
    note = tmp_path / "n.md"
    note.write_bytes(b"one\n")
    os.chmod(note, 0o640)
    write_if_unchanged(note, b"one\n", b"two\n")
    assert note.read_bytes() == b"two\n" and (note.stat().st_mode & 0o777) == 0o640
    with pytest.raises(WriteConflict):
        write_if_unchanged(note, b"one\n", b"three\n")
    assert note.read_bytes() == b"two\n"
    assert [p.name for p in tmp_path.iterdir()] == ["n.md"]  # no temp file left behind


def test_reading_refuses_symlinks_out_of_the_vault_and_huge_notes(tmp_path: Path) -> None:
    root = tmp_path / "vault"
    v = make_vault(root)
    outside = tmp_path / "secret.md"
    outside.write_text("secreto", encoding="utf-8")
    (root / "link.md").symlink_to(outside)
    with pytest.raises(VaultError, match="outside the vault"):
        v.read_note(root / "link.md")
    big = root / "big.md"
    with big.open("wb") as handle:
        handle.truncate(vault.MAX_NOTE_BYTES + 1)
    with pytest.raises(VaultError, match="MB limit") as info:
        v.read_note(big)
    assert str(big) in info.value.one_line()


def test_broken_config_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(VaultError) as info:
        make_vault(tmp_path, config='include = ["a"]\n[defaults\n')
    assert "vault-runner.toml:2" in info.value.one_line()


def test_option_precedence_defaults_config_frontmatter_block() -> None:
    config = {"timeout": 10, "seed": 1, "warning": False}
    frontmatter = {"execute": {"seed": 2, "timeout": 20}}
    resolved = options.resolve(config, frontmatter, {"timeout": 30})
    assert resolved["timeout"] == 30 and resolved["seed"] == 2 and resolved["warning"] is False
    assert resolved["eval"] is True  # built-in default
    block_seed = options.resolve({}, {}, {"seed": 5})
    assert block_seed["seed"] is None and any("whole note" in w for w in block_seed.warnings)
    assert any("unknown option" in w for w in options.resolve({}, {}, {"colour": 1}).warnings)


@pytest.mark.parametrize(
    "name,value", [("timeout", -1), ("timeout", "x"), ("eval", "yes"), ("device", "gpu"), ("seed", 1.5)]
)
def test_bad_option_values_are_refused(name: str, value: object) -> None:
    with pytest.raises(options.OptionError, match=name):
        options.resolve({}, {}, {name: value})


@pytest.mark.parametrize(
    "frontmatter,path,include,expected",
    [
        ({"vault-runner": True}, "x/a.md", [], True),
        ({"vault-runner": False}, "PyTorch/a.md", ["PyTorch/**"], False),
        ({}, "PyTorch/sub/a.md", ["PyTorch/**"], True),
        ({}, "PyTorch/a.md", ["PyTorch"], True),
        ({}, "Otros/a.md", ["PyTorch/**"], False),
        ({}, "a.md", ["*.md"], True),
        ({}, "x/a.md", ["**/a.md"], True),
    ],
)
def test_opt_in(frontmatter: dict, path: str, include: list[str], expected: bool) -> None:
    assert options.opted_in(frontmatter, path, include, []) is expected


def test_a_flat_network_property_is_a_security_option_not_ignored() -> None:
    """Issue 9.7: a top-level `network: false` was silently ignored."""
    assert options.resolve({}, {"network": False})["network"] is False
    assert options.resolve({}, {"network": False, "execute": {"seed": 1}})["network"] is False
    assert options.resolve({}, {"network": False, "execute": {"network": True}})["network"] is True
    with pytest.raises(OptionError):
        options.resolve({}, {"network": "no"})
