"""The pytest plugin, run as users run it: `pytest --vault DIR` in a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.core import note as notes
from vault_runner.disk.vault import load_vault
from vault_runner.engine import load
from vault_runner.frontends.cli.main import main

pytestmark = pytest.mark.kernel

OPERACIONES = "PyTorch/02 Operaciones con tensores.md"


@pytest.fixture
def rendered_vault(rendered_sample_vault: Path) -> Path:
    return rendered_sample_vault


def expected_items(root: Path) -> set[tuple[str, str]]:
    """(note, item name) for every runnable block of every opted-in note, from the engine."""
    vault = load_vault(root)
    items = set()
    for path in vault.notes():
        loaded = load(vault, path)
        if loaded.opted_in:
            for planned in loaded.runnable:
                label = planned.options["label"]
                items.add((loaded.relative, label or f"line {planned.block.fence_line}"))
    return items


def kernels_of(root: Path) -> list[int]:
    """Live processes started for this vault (the engine gives kernels VAULT_RUNNER_VAULT)."""
    marker = f"VAULT_RUNNER_VAULT={root}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def run_pytest(workdir: Path, *args: str) -> tuple[int, str, dict[tuple[str, str], str]]:
    """Run pytest in `workdir` (its own rootdir and ini); return code, output and outcome by (file, name)."""
    report = workdir / "report.xml"
    report.unlink(missing_ok=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-o",
            "junit_family=xunit1",  # test cases carry their file
            f"--junit-xml={report}",
            *args,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTEST_ADDOPTS": ""},
    )
    outcomes: dict[tuple[str, str], str] = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            if case.find("failure") is not None or case.find("error") is not None:
                outcome = "failed"
            elif case.find("skipped") is not None:
                outcome = "skipped"
            outcomes[(case.get("file") or "", case.get("name") or "")] = outcome
    return done.returncode, done.stdout + done.stderr, outcomes


def by_note(outcomes: dict[tuple[str, str], str], root_name: str) -> dict[tuple[str, str], str]:
    """Key the outcomes by vault-relative note."""
    return {(file.removeprefix(root_name + "/"), name): outcome for (file, name), outcome in outcomes.items()}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    return tmp_path


def test_collects_one_item_per_block_named_after_note_and_line(rendered_vault: Path, workdir: Path) -> None:
    vault = Path(shutil.copytree(rendered_vault, workdir / "vault"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", "--vault", "vault"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    collected = {tuple(line.split("::")) for line in done.stdout.splitlines() if "::" in line}
    assert collected == {(f"vault/{note}", name) for note, name in expected_items(vault)}
    assert ("vault/PyTorch/03 Manipulación de tensores.md", "apilar-tensores") in collected
    assert kernels_of(vault) == []  # collecting starts nothing


def test_vault_passes_and_kernels_are_shut_down(rendered_vault: Path, workdir: Path) -> None:
    vault = Path(shutil.copytree(rendered_vault, workdir / "vault"))
    before = {p: p.read_bytes() for p in vault.rglob("*.md")}

    code, output, outcomes = run_pytest(workdir, "--vault", "vault")

    assert code == 0, output
    assert set(by_note(outcomes, "vault")) == expected_items(vault)
    assert set(outcomes.values()) == {"passed"}
    assert {p: p.read_bytes() for p in vault.rglob("*.md")} == before  # nothing written
    assert kernels_of(vault) == []


def test_a_broken_block_fails_exactly_its_item_also_under_xdist(rendered_vault: Path, workdir: Path) -> None:
    vault = Path(shutil.copytree(rendered_vault, workdir / "vault"))
    (vault / "PyTorch" / "04 Regresión lineal.md").unlink()  # the slow note; not needed here
    note = vault / OPERACIONES
    text = note.read_text(encoding="utf-8")
    broken_line = text.split("\n").index("print(torch.add(tensor, 10))") + 1
    fence = max(b for b in range(broken_line) if text.split("\n")[b - 1] == "```python")
    note.write_text(text.replace("print(torch.add(tensor, 10))", "print(torch.add(tensor, no_existe))"), "utf-8")

    code, output, outcomes = run_pytest(workdir, "--vault", "vault")

    assert code == 1
    results = by_note(outcomes, "vault")
    assert set(results) == expected_items(vault)
    assert {key for key, outcome in results.items() if outcome != "passed"} == {(OPERACIONES, f"line {fence}")}
    # The failure shows the block's code and the traceback with the note's line numbers.
    assert f"{broken_line} | print(torch.add(tensor, no_existe))" in output
    assert f'File "02 Operaciones con tensores.md", line {broken_line}' in output
    assert "NameError: name 'no_existe' is not defined" in output
    assert kernels_of(vault) == []

    # The same through the ini option, with two xdist workers: notes go whole to a worker.
    (workdir / "pytest.ini").write_text("[pytest]\nvault = vault\n", encoding="utf-8")
    code_n, output_n, outcomes_n = run_pytest(workdir, "-n", "2", "-v")
    assert code_n == 1, output_n
    assert by_note(outcomes_n, "vault") == results
    assert "LoadFileScheduling" in output_n
    workers: dict[str, set[str]] = {}
    for match in re.finditer(r"(?m)^\[(gw\d+)\] \[\s*\d+%\] \w+ (.+?)::", output_n):
        workers.setdefault(match.group(2), set()).add(match.group(1))
    assert workers and all(len(names) == 1 for names in workers.values()), workers
    assert kernels_of(vault) == []


def test_raises_option_and_compare_under_pytest(workdir: Path) -> None:
    from tests.ci.test_testing import BIEN, ERRORES

    root = make_note_vault(
        workdir / "v",
        {"errores.md": ERRORES, "bien.md": BIEN, "valor.txt": "41\n"},
        config='include = ["**"]\n',
    )
    assert main(["test", str(root), "--update"]) == 1  # errores.md fails; bien.md gets its outputs
    (root / "valor.txt").write_text("42\n")
    errores = [b.fence_line for b in notes.parse_note((root / "errores.md").read_text()).blocks]
    bien = [b.fence_line for b in notes.parse_note((root / "bien.md").read_text()).blocks]

    code, output, outcomes = run_pytest(workdir, "--vault", "v", "--vault-compare")

    assert code == 1, output
    assert by_note(outcomes, "v") == {
        ("errores.md", f"line {errores[0]}"): "passed",
        ("errores.md", f"line {errores[1]}"): "failed",  # raised unexpectedly
        ("errores.md", f"line {errores[2]}"): "passed",  # raises: ZeroDivisionError, and it did
        ("errores.md", f"line {errores[3]}"): "failed",  # raises: KeyError, but raised ZeroDivisionError
        ("bien.md", f"line {bien[0]}"): "passed",  # another memory address: sanitized
        ("bien.md", f"line {bien[1]}"): "passed",  # other %%time figures: sanitized
        ("bien.md", f"line {bien[2]}"): "failed",  # 41 -> 42
    }
    assert "expected it to raise KeyError, but it raised ZeroDivisionError" in output
    assert "-41" in output and "+42" in output
    assert kernels_of(root) == []


def test_vault_alone_collects_only_the_vault_and_with_paths_both(workdir: Path) -> None:
    """Issue 15.13: `pytest --vault V` also collected the tests of the current folder."""
    make_note_vault(workdir / "v", {"n.md": "---\nvault-runner: true\n---\n```python\nprint(1)\n```\n"})
    (workdir / "test_mine.py").write_text("def test_mine():\n    assert False\n", encoding="utf-8")
    code, output, outcomes = run_pytest(workdir, "--vault", "v")
    assert code == 0, output
    assert [name for (_, name) in outcomes] == ["line 4"], outcomes
    code, output, outcomes = run_pytest(workdir, "--vault", "v", "test_mine.py")
    assert code == 1 and len(outcomes) == 2, output


def test_option_warnings_show_in_the_run_without_failing_it(workdir: Path) -> None:
    """Issue 15 review: `pytest --vault` never said that `#| timout: 5` is ignored."""
    from tests.core.test_warnings import NOTE

    make_note_vault(workdir / "v", {"sub/n.md": NOTE})
    code, output, outcomes = run_pytest(workdir, "--vault", "v")
    assert code == 0, output
    assert list(outcomes.values()) == ["passed"]
    assert "warnings summary" in output
    for line, text in (
        (5, "unknown option `colour` in frontmatter is ignored"),
        (10, "unknown option `timout` in block is ignored"),
        (11, "option `seed` applies to the whole note; set it in the frontmatter"),
    ):
        assert f"v/sub/n.md:{line}: VaultOptionWarning: {text}" in output, output
