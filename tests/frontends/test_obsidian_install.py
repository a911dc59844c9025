"""`vault-runner obsidian install VAULT` into copies of sample_vault: the plugin's files land in
.obsidian/plugins/vault-runner, it is enabled only with a yes, a re-install updates it, and a
hostile .obsidian (symlinks out of the vault) is refused with nothing written outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_sample_vault
from vault_runner.errors import VaultError
from vault_runner.frontends.cli.obsidian import install, shipped_plugin

PLUGIN = REPO / "obsidian-plugin"
FILES = ("main.js", "manifest.json", "styles.css")


def cli(*args: str, stdin: int | None = None, text_in: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vault_runner", "obsidian", *args],
        cwd=REPO,
        input=text_in,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def enabled(root: Path) -> list[str] | None:
    path = root / ".obsidian" / "community-plugins.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    return copy_sample_vault(tmp_path / "vault")


def test_the_shipped_plugin_is_the_built_one_of_obsidian_plugin() -> None:
    shipped = shipped_plugin()
    for name in FILES:
        assert shipped[name] == (PLUGIN / name).read_bytes(), (
            f"vault_runner/frontends/obsidian_plugin/{name} differs from obsidian-plugin/{name}: "
            "run `python obsidian-plugin/scripts/ship_bundle.py` after `npm run build`"
        )
    assert json.loads(shipped["manifest.json"])["id"] == "vault-runner"


def test_install_without_a_yes_copies_the_plugin_and_enables_nothing(vault: Path) -> None:
    done = cli("install", str(vault), text_in="y\n")  # stdin is not a terminal: nobody is asked
    assert done.returncode == 0, done.stderr
    target = vault / ".obsidian" / "plugins" / "vault-runner"
    assert sorted(p.name for p in target.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (target / name).read_bytes() == (PLUGIN / name).read_bytes()
    assert enabled(vault) is None
    assert "not enabled" in done.stderr and "--enable" in done.stderr


def test_install_asks_on_a_terminal_and_enables_only_on_yes(vault: Path) -> None:
    for answer, expected in (("n\n", None), ("y\n", ["vault-runner"])):
        leader, follower = os.openpty()
        try:
            os.write(leader, answer.encode())
            done = cli("install", str(vault), stdin=follower)
        finally:
            os.close(follower)
            os.close(leader)
        assert done.returncode == 0, done.stderr
        assert "Enable the plugin" in done.stderr
        assert enabled(vault) == expected


def test_enable_keeps_the_vaults_other_plugins_and_a_reinstall_updates_the_files(vault: Path) -> None:
    plugins = vault / ".obsidian" / "community-plugins.json"
    plugins.write_text('["dataview"]', encoding="utf-8")
    assert cli("install", str(vault), "--enable").returncode == 0
    assert enabled(vault) == ["dataview", "vault-runner"]
    main_js = vault / ".obsidian" / "plugins" / "vault-runner" / "main.js"
    main_js.write_text("// an older version\n", encoding="utf-8")
    styles = main_js.with_name("styles.css")
    unchanged = styles.stat().st_mtime_ns
    written, now_enabled = install(vault, confirm=lambda: pytest.fail("enabled already: nobody is asked"))
    assert written == ["main.js"] and now_enabled is None
    assert main_js.read_bytes() == (PLUGIN / "main.js").read_bytes()
    assert styles.stat().st_mtime_ns == unchanged, "an identical file is not rewritten"
    assert enabled(vault) == ["dataview", "vault-runner"]


def test_a_symlinked_obsidian_folder_is_refused_and_nothing_is_written_outside(vault: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (vault / ".obsidian" / "plugins").symlink_to(outside, target_is_directory=True)
    done = cli("install", str(vault), "--enable")
    assert done.returncode == 2 and "symlink" in done.stderr, done.stderr
    assert list(outside.iterdir()) == []
    assert enabled(vault) is None

    (vault / ".obsidian" / "plugins").unlink()
    secret = outside / "settings.json"
    secret.write_text("[]", encoding="utf-8")
    (vault / ".obsidian" / "community-plugins.json").symlink_to(secret)
    with pytest.raises(VaultError, match="symlink"):
        install(vault, confirm=lambda: True)
    assert secret.read_text(encoding="utf-8") == "[]"

    linked = tmp_path / "linked-vault"
    linked.mkdir()
    (linked / ".obsidian").symlink_to(vault / ".obsidian", target_is_directory=True)
    done = cli("install", str(linked))
    assert done.returncode == 2 and "not an Obsidian vault" in done.stderr


def test_a_folder_that_is_not_a_vault_is_refused(tmp_path: Path) -> None:
    done = cli("install", str(tmp_path))
    assert done.returncode == 2 and "not an Obsidian vault" in done.stderr
    assert not (tmp_path / ".obsidian").exists()
    assert cli("install", str(tmp_path / "missing")).returncode == 2


def test_a_wrong_flag_of_install_shows_the_usage_of_install() -> None:
    """Issue 15 review: it showed the usage of `obsidian`, which has no such flag either."""
    done = cli("install", "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: vault-runner obsidian install "), done.stderr
    assert "unrecognized arguments: --bogus" in done.stderr
