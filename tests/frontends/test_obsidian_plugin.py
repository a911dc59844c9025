"""The Obsidian plugin's own suite (vitest: regions against the Python splice vectors, the
CodeMirror editor adapter, the client against a real HTTP server) and its committed bundle."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

PLUGIN = REPO / "obsidian-plugin"
NPM = shutil.which("npm")
pytestmark = pytest.mark.skipif(NPM is None, reason="Node.js/npm is not installed: the plugin's tests need it")


def _installed() -> None:
    if not (PLUGIN / "node_modules").is_dir():
        pytest.fail(
            "obsidian-plugin/node_modules is missing: run `npm ci` in obsidian-plugin (the README's test command does)"
        )


def test_the_plugins_vitest_suite_passes() -> None:
    _installed()
    done = subprocess.run([str(NPM), "test"], cwd=PLUGIN, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def test_the_committed_bundle_is_what_the_sources_build(tmp_path: Path) -> None:
    _installed()
    copy = tmp_path / "plugin"
    shutil.copytree(PLUGIN, copy, ignore=shutil.ignore_patterns("node_modules"))
    (copy / "node_modules").symlink_to(PLUGIN / "node_modules")
    done = subprocess.run(
        [str(NPM), "run", "build"], cwd=copy, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (copy / "main.js").read_bytes() == (PLUGIN / "main.js").read_bytes(), (
        "obsidian-plugin/main.js is out of date: run `npm run build` in obsidian-plugin and commit it"
    )
