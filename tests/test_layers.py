"""The package keeps its shape: the import-linter contracts of pyproject.toml hold, and no
module grows past what one concept needs (issue 11)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vault_runner"
MAX_MODULE_LINES = 600


def test_imports_point_down_the_layers_only() -> None:
    command = shutil.which("lint-imports")
    if command is None:
        pytest.fail("lint-imports is missing: install the test extra (`pip install -e '.[test]'`)")
    done = subprocess.run([command], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_module_is_over_600_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_module_imports_another_modules_private_names() -> None:
    import ast

    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vault_runner"):
                found += [
                    f"{path.relative_to(PACKAGE)}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.endswith("__")
                ]
    assert found == []


def test_check_starts_no_kernel_machinery() -> None:
    code = (
        "import sys, vault_runner.frontends.cli.main as m, vault_runner.ci.check;"
        "print(any(n.startswith(('jupyter_client', 'zmq')) for n in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False", done.stdout
