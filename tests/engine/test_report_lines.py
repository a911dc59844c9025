"""Reports name blocks by the lines they have in the file as written (issue 15.5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.core import note as notes
from vault_runner.disk.vault import load_vault
from vault_runner.engine import Engine

pytestmark = pytest.mark.kernel


def test_block_lines_in_the_report_are_those_of_the_written_note(tmp_path: Path) -> None:
    text = "---\nvault-runner: true\n---\n```python\nfor i in range(5):\n    print(i)\n```\n\n```python\n1 / 0\n```\n"
    root = make_note_vault(tmp_path / "v", {"n.md": text})
    report = Engine(load_vault(root)).run_note(root / "n.md")
    assert report.written
    written = notes.parse_note((root / "n.md").read_text(encoding="utf-8"))
    assert [b.line for b in report.blocks] == [b.fence_line for b in written.blocks]
    assert report.blocks[1].line > 9  # moved down by the first block's region
