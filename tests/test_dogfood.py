"""This project's own sample vault must be current and must pass `vault-runner test` (CI runs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vault_runner.frontends.cli.main import main

from .conftest import SAMPLE_VAULT


@pytest.mark.kernel
def test_sample_vault_passes_vault_runner_test(tmp_path: Path) -> None:
    copy = tmp_path / "vault"
    shutil.copytree(SAMPLE_VAULT, copy)
    assert main(["test", "--compare", str(copy)]) == 0
