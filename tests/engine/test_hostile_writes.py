"""Hostile notes in every sandbox tier the machine has: a block swaps its folder, or the
attachment folder, for a symlink out of the vault, and the write-back must not follow it
(issue 9, items 1 and 2). Real kernels, real sandboxes."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.disk.vault import load_vault
from vault_runner.engine import Engine
from vault_runner.engine.machine import sandbox_tier as sandbox_tier_of_engine
from vault_runner.kernel.sandbox.protected import names_supervised

pytestmark = pytest.mark.kernel


@pytest.fixture
def tier(sandbox_tier: str) -> str:
    assert sandbox_tier_of_engine()["tier"] == sandbox_tier
    return sandbox_tier


def hostile(code: str) -> str:
    return f"---\nvault-runner: true\n---\n# Nota\n\n```python\n{code}\n```\n"


def test_a_block_that_swaps_its_folder_for_a_symlink_gets_nothing_written_outside(tier: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    code = (
        "import os\n"
        "root = os.environ['VAULT_RUNNER_VAULT']\n"
        "os.rename(root + '/Notas', root + '/Notas-old')\n"
        f"os.symlink({str(outside)!r}, root + '/Notas')\n"
        "print('swapped')"
    )
    note_text = hostile(code)
    (outside / "n.md").write_text(note_text, encoding="utf-8")  # same code: a write-back would match it
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note_text})
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    assert (outside / "n.md").read_text(encoding="utf-8") == note_text
    assert sorted(p.name for p in outside.iterdir()) == ["n.md"]
    if (root / "Notas").is_symlink():  # the tier let the block swap it (Landlock may refuse the rename)
        assert report.status == "failed" and "symlink" in (report.message or ""), report
        assert (root / "Notas-old" / "n.md").read_text(encoding="utf-8") == note_text
    else:
        assert report.blocks[0].status == "error", report


def test_a_block_that_swaps_the_attachment_folder_writes_no_file_outside(tier: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    script = base64.b64encode(b"#!/bin/sh\necho pwned\n").decode()
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
    code = (
        "import os\n"
        "from IPython.display import display\n"
        "root = os.environ['VAULT_RUNNER_VAULT']\n"
        f"os.symlink({str(outside)!r}, root + '/adjuntos')\n"
        f"display({{'image/png': {png!r}}}, raw=True)\n"
        f"display({{'image/png': {script!r}}}, raw=True)"
    )
    root = make_note_vault(tmp_path / "vault", {"n.md": hostile(code)}, app={"attachmentFolderPath": "adjuntos"})
    report = Engine(load_vault(root)).run_note(root / "n.md")
    assert list(outside.iterdir()) == []
    if (root / "adjuntos").is_symlink():
        assert report.status == "failed" and "symlink" in (report.message or ""), report


def test_an_image_whose_bytes_are_not_its_type_is_not_written(tier: str, tmp_path: Path) -> None:
    script = base64.b64encode(b"#!/bin/sh\necho pwned\n").decode()
    code = f"from IPython.display import display\ndisplay({{'image/png': {script!r}}}, raw=True)"
    root = make_note_vault(tmp_path / "vault", {"n.md": hostile(code)})
    report = Engine(load_vault(root)).run_note(root / "n.md")
    assert report.written, report
    assert not [p for p in root.rglob("*.png")]
    assert "its bytes are not that kind of image" in (root / "n.md").read_text(encoding="utf-8")


def test_a_block_that_makes_a_git_repository_in_the_vault_gets_none(tier: str, tmp_path: Path) -> None:
    # `git init` writes .git/config, whose core.fsmonitor git would run on the host at the
    # user's next `git status` in that folder (issue 9.3).
    code = "!git init -q datos\nimport time\ntime.sleep(3)\nprint('still running')"
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": hostile(code)})
    report = Engine(load_vault(root)).run_note(root / "Notas" / "n.md")
    assert not list(root.rglob(".git")), report
    region = (root / "Notas" / "n.md").read_text(encoding="utf-8").split("vault-runner:output", 1)[1]
    if tier != "plain" and names_supervised():
        # Refused as it was made (name_supervisor.py): git says so, the note goes on.
        assert "Operation not permitted" in region and "still running" in region, region
        assert "which no note may create or change" not in region
        return
    # Made, then moved out by the guard, which stops the kernel and says so.
    assert report.blocks[0].failed, report
    assert "still running" not in region
    assert "`Notas/datos/.git`" in region and "which no note may create or change" in region
