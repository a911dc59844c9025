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


def test_a_warning_streamed_while_its_block_runs_names_the_notes_line(tmp_path: Path) -> None:
    """Issue 15 review: `output` events (the API's SSE stream) said `Cell In[1]:3:` while the
    report said the note's line."""
    from tests.conftest import Recorder

    text = (
        "---\nvault-runner: true\n---\n```python\nimport warnings\nwarnings.warn('uno')\n```\n\n"
        "```python\nx = 1\nwarnings.warn('dos')\n```\n"
    )
    root = make_note_vault(tmp_path / "v", {"w.md": text})
    lines = text.split("\n")  # the note as it was while the blocks ran
    events = Recorder()
    Engine(load_vault(root), on_event=events).run_note(root / "w.md")
    streamed = "".join(str(e.data.get("text", "")) for e in events.kinds("output"))
    for word in ("uno", "dos"):
        line = lines.index(f"warnings.warn('{word}')") + 1
        assert f"w.md:{line}: UserWarning: {word}" in streamed, streamed
    assert "Cell In" not in streamed
