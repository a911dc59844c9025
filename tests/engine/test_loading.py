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


def test_a_bad_block_option_value_names_the_option_line(tmp_path: Path) -> None:
    """Not the block's first line: the `#| timeout:` line under the `#| echo:` one."""
    note = "---\nvault-runner: true\n---\n\n```python\n#| echo: true\n#| timeout: slow\nprint(1)\n```\n"
    root = make_note_vault(tmp_path / "v", {"a.md": note})
    with pytest.raises(VaultError) as caught:
        load(load_vault(root), root / "a.md")
    assert caught.value.line == 7
    assert "option `timeout`" in caught.value.message


def test_a_bad_default_in_the_vault_config_names_the_config_and_its_line(tmp_path: Path) -> None:
    """It was reported as the note's frontmatter, at the note's line 2."""
    root = make_note_vault(
        tmp_path / "v",
        {"a.md": "---\nvault-runner: true\n---\n```python\nprint(1)\n```\n"},
        config='include = ["**"]\n\n[defaults]\nseed = 1\ntimeout = "fast"\n',
    )
    with pytest.raises(VaultError) as caught:
        load_vault(root)
    assert caught.value.path == root / "vault-runner.toml"
    assert caught.value.line == 5
    assert caught.value.message.startswith("[defaults]: option `timeout`")
