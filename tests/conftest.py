from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_VAULT = REPO / "sample_vault"


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the real user's config dir (trust store) from a test."""
    monkeypatch.setenv("VAULT_RUNNER_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))


def copy_sample_vault(destination: Path) -> Path:
    shutil.copytree(SAMPLE_VAULT, destination)
    return destination


def make_note_vault(root: Path, notes: dict[str, str], app: dict | None = None, config: str | None = None) -> Path:
    """A small vault: `notes` maps relative paths to (dedented) note text."""
    (root / ".obsidian").mkdir(parents=True, exist_ok=True)
    (root / ".obsidian" / "app.json").write_text(json.dumps(app or {}), encoding="utf-8")
    if config is not None:
        (root / "vault-runner.toml").write_text(config, encoding="utf-8")
    for relative, text in notes.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root
