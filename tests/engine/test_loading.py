"""Reading a note: a bad option value names the line the note-taker would fix. No kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.disk.vault import load_vault
from vault_runner.engine import load
from vault_runner.errors import VaultError


@pytest.mark.parametrize(
    ("frontmatter", "line", "said"),
    [
        ("title: a\ntags: [x]\nvault-runner: true\nexecute:\n  seed: 1\n  timeout: fast\n", 7, "option `timeout`"),
        ("vault-runner: true\nnetwork: maybe\n", 3, "option `network`"),
        ("vault-runner: true\ntags: []\nexecute: 5\n", 4, "the `execute` property"),
    ],
)
def test_a_bad_frontmatter_value_names_the_options_own_line(
    tmp_path: Path, frontmatter: str, line: int, said: str
) -> None:
    """Issue 15 review: it named line 2 whatever the line of the option."""
    root = make_note_vault(tmp_path / "v", {"a.md": f"---\n{frontmatter}---\n```python\nprint(1)\n```\n"})
    with pytest.raises(VaultError) as caught:
        load(load_vault(root), root / "a.md")
    assert caught.value.line == line
    assert caught.value.message.startswith(f"frontmatter: {said}")
