"""The Obsidian plugin's own suite (vitest: regions against the Python splice vectors, the
CodeMirror editor adapter, the client against a real HTTP server) and its committed bundle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_note_vault
from vault_runner.disk import trust

PLUGIN = REPO / "obsidian-plugin"
SHIPPED = REPO / "vault_runner" / "frontends" / "obsidian_plugin"
NPM = shutil.which("npm")
NPX = shutil.which("npx")
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
    # `vault-runner obsidian install` copies the bundle the Python package ships: the same bytes.
    assert (copy / "main.js").read_bytes() == (SHIPPED / "main.js").read_bytes(), (
        "vault_runner/frontends/obsidian_plugin/main.js is not the built bundle: run "
        "`python obsidian-plugin/scripts/ship_bundle.py` after `npm run build`"
    )


LIVE_NOTE = """---
vault-runner: true
---
# Sesión

```python
import time
time.sleep(1.5)
print("listo", 42)
```

Texto de abajo.
"""


@pytest.mark.kernel
def test_the_plugin_runs_a_block_against_a_real_server_while_text_is_typed(tmp_path: Path) -> None:
    """test/live.test.ts against `vault-runner serve` started here: real HTTP, stream, token, Origin."""
    _installed()
    root = make_note_vault(tmp_path / "vault", {"Live/sesion.md": LIVE_NOTE})
    trust.trust(root)
    server = subprocess.Popen(
        [sys.executable, "-m", "vault_runner", "serve", str(root), "--kernels", "1", "--warm", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        announced = json.loads(server.stdout.readline() or "{}")  # the server file's JSON, once listening
        assert announced.get("url", "").startswith("http://127.0.0.1:"), server.stderr.read() if server.stderr else ""
        done = subprocess.run(
            [str(NPX), "vitest", "run", "test/live.test.ts"],
            cwd=PLUGIN,
            env={**os.environ, "VAULT_RUNNER_LIVE_VAULT": str(root)},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        output = done.stdout[-6000:] + done.stderr[-4000:]
        assert done.returncode == 0, output
        assert "1 passed" in output and "skipped" not in output, output
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    # What the editor saved is what the note holds: the typed text and the output, written once.
    text = (root / "Live" / "sesion.md").read_text(encoding="utf-8")
    assert "Escrito mientras corre. Texto de abajo." in text and "listo 42" in text
