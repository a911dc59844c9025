"""`vault-runner test`: fresh kernels, expected exceptions, --compare, reports, -j."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.ci import reports
from vault_runner.ci.testing import NoteResult
from vault_runner.core import note as notes
from vault_runner.engine import BlockReport, NoteReport
from vault_runner.frontends.cli.main import main

ERRORES = """
    # Errores

    ```python
    x = 1
    print("hola", x)
    ```

    ```python
    raise ValueError("inesperado")
    ```

    ```python
    #| raises: ZeroDivisionError
    1 / 0
    ```

    ```python
    #| raises: KeyError
    1 / 0
    ```
"""

BIEN = """
    ```python
    print(object())
    ```

    ```python
    %%time
    total = sum(range(1000))
    ```

    ```python
    print(open("valor.txt").read().strip())
    ```
"""


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    }


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cases(xml_path: Path) -> dict[tuple[str, str], str]:
    """(classname, line) -> passed | failure | skipped."""
    out = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome = (
            "failure"
            if case.find("failure") is not None
            else "skipped"
            if case.find("skipped") is not None
            else "passed"
        )
        out[(case.get("classname") or "", case.get("line") or "")] = outcome
    return out


@pytest.mark.kernel
def test_unexpected_raise_fails_and_raises_option_is_honoured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {"notas/errores.md": ERRORES, "notas/bien.md": BIEN, "notas/valor.txt": "41\n"},
        config='include = ["notas/**"]\n',
    )
    monkeypatch.chdir(tmp_path)
    before = snapshot(root)
    fences = [b.fence_line for b in notes.parse_note((root / "notas/errores.md").read_text()).blocks]

    code, out, err = run(["test", "v", "-j", "2", "--junit-xml", "report.xml"], capsys)

    assert code == 1
    assert snapshot(root) == before  # test writes nothing
    errores, bien = "v/notas/errores.md", "v/notas/bien.md"
    assert cases(tmp_path / "report.xml") == {
        (bien, "1"): "passed",
        (bien, "5"): "passed",
        (bien, "10"): "passed",
        (errores, str(fences[0])): "passed",
        (errores, str(fences[1])): "failure",  # raised unexpectedly
        (errores, str(fences[2])): "passed",  # raises: ZeroDivisionError, and it did
        (errores, str(fences[3])): "failure",  # raises: KeyError, but raised ZeroDivisionError
    }
    failures = [line for line in out.splitlines() if line.startswith("v/")]
    assert failures == [
        f"{errores}:{fences[1]}: error: ValueError: inesperado",
        f"{errores}:{fences[3]}: error: expected it to raise KeyError, but it raised ZeroDivisionError",
    ]
    # The failure shows the block's code and a traceback with the note's line numbers.
    assert f'File "errores.md", line {fences[1] + 1}' in out
    assert f'{fences[1] + 1} | raise ValueError("inesperado")' in out
    assert "failed: 2 note(s), 7 block(s): 5 passed, 2 failed" in err

    code, out, _ = run(["test", "v/notas/errores.md", "--json"], capsys)
    data = json.loads(out)
    assert code == 1 and data["passed"] is False
    statuses = [(b["line"], b["status"]) for b in data["notes"][0]["blocks"]]
    assert statuses == [(fences[0], "ok"), (fences[1], "error"), (fences[2], "raised"), (fences[3], "error")]
    assert "ValueError: inesperado" in data["notes"][0]["blocks"][1]["details"]


HAMBRIENTA = """
    ```python
    hoard = b"x" * (600 * 2**20)
    print("tengo", len(hoard) >> 20, "MiB")
    ```
"""


@pytest.mark.kernel
def test_notes_tested_in_worker_processes_share_one_memory_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `test -j 2` runs notes in two worker processes: each has its share of the budget, so two
    # notes of 600 MiB at once cannot hold 1.2 GiB of a 1 GiB budget (each had all of it).
    make_note_vault(tmp_path / "v", {"a.md": HAMBRIENTA, "b.md": HAMBRIENTA}, config='include = ["*.md"]\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAULT_RUNNER_MEMORY", "1G")
    code, out, _ = run(["test", "v", "-j", "2", "--json"], capsys)
    data = json.loads(out)
    assert code == 1
    assert [[b["status"] for b in note["blocks"]] for note in data["notes"]] == [["dead"], ["dead"]]
    assert all("limit of 512.0 MiB" in note["blocks"][0]["details"] for note in data["notes"]), data
    code, out, _ = run(["test", "v/a.md", "--json"], capsys)  # alone, it has the whole budget
    assert code == 0, out


@pytest.mark.kernel
def test_compare_catches_a_changed_value_and_ignores_addresses_and_timings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_note_vault(tmp_path / "v", {"bien.md": BIEN, "valor.txt": "41\n"}, config='include = ["**"]\n')
    monkeypatch.chdir(tmp_path)
    note = root / "bien.md"

    # --update writes the outputs, as render does; then the note is current.
    assert run(["test", "v", "--update"], capsys)[0] == 0
    assert run(["check", "v"], capsys)[0] == 0

    # Make sure the stored address and timings differ from whatever the next run prints,
    # keeping the regions valid (not hand-edited), as another machine's render would.
    parsed = notes.parse_note(note.read_text(encoding="utf-8"))
    regions = {}
    for block in parsed.blocks:
        assert block.region is not None
        new_body = re.sub(r"0x[0-9a-f]+", "0x7f0000abcdef", block.region.body)
        new_body = re.sub(r"(?m)^Wall time: .*$", "Wall time: 9.99 s", new_body)
        regions[block.index] = notes.region_lines(block, block.region.code_hash, new_body)
    note.write_text(notes.splice(parsed, regions), encoding="utf-8")
    stored = note.read_text(encoding="utf-8")
    assert "0x7f0000abcdef" in stored and "Wall time: 9.99 s" in stored
    assert run(["check", "v"], capsys)[0] == 0

    code, out, _ = run(["test", "v", "--compare"], capsys)
    assert (code, out) == (0, "")

    (root / "valor.txt").write_text("42\n")
    code, out, _ = run(["test", "v", "--compare"], capsys)
    assert code == 1
    last = notes.parse_note(stored).blocks[-1].fence_line
    assert out.splitlines()[0].startswith(f"v/bien.md:{last}: mismatch: its output differs from the output stored")
    assert "-41" in out and "+42" in out
    assert note.read_text(encoding="utf-8") == stored  # still nothing written


@pytest.mark.kernel
def test_option_warnings_are_annotated_with_github_and_follow_the_path_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 review: `test --format github` showed no option warning at all, and the text
    lines named the note vault-relative while findings follow the one path rule."""
    from tests.core.test_warnings import NOTE

    make_note_vault(tmp_path / "v", {"sub/n.md": NOTE})
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["test", "v", "--format", "github"], capsys)
    assert code == 0, out
    assert [line for line in out.splitlines() if line.startswith("::warning")] == [
        "::warning file=v/sub/n.md,line=5,title=vault-runner test%3A warning::"
        "unknown option `colour` in frontmatter is ignored",
        "::warning file=v/sub/n.md,line=10,title=vault-runner test%3A warning::unknown option `timout` in block is ignored",
        "::warning file=v/sub/n.md,line=11,title=vault-runner test%3A warning::"
        "option `seed` applies to the whole note; set it in the frontmatter",
    ]

    code, out, _ = run(["test", "v"], capsys)
    assert code == 0, out
    assert [line for line in out.splitlines() if ": warning: " in line] == [
        "v/sub/n.md:5: warning: unknown option `colour` in frontmatter is ignored",
        "v/sub/n.md:10: warning: unknown option `timout` in block is ignored",
        "v/sub/n.md:11: warning: option `seed` applies to the whole note; set it in the frontmatter",
    ]


def test_junit_and_github_reports_name_note_and_line() -> None:
    failed = BlockReport("n.md", 1, 12, "raise X", "etiqueta", "error", 0.5, "cpu", message="X: boom, 100%")
    skipped = BlockReport("n.md", 2, 20, "y", None, "skipped", message="not run: the kernel was restarted")
    passed = BlockReport("n.md", 0, 3, "x = 1", None, "ok", 0.25, "cpu")
    result = NoteResult(
        "Cursos/n.md",
        NoteReport("n.md", "ran", device="cpu", blocks=[passed, failed, skipped]),
        code={1: "raise X\n"},
        details={1: "> [!failure] X: boom\n> ```pytb\n> \x1b[0m trace\n> ```\n"},
    )
    root = ET.fromstring(reports.results_junit([result]))
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("3", "1", "1")
    case = root.find(".//testcase[failure]")
    assert case is not None
    assert (case.get("classname"), case.get("name"), case.get("line")) == ("Cursos/n.md", "line 12 (etiqueta)", "12")
    failure = case.find("failure")
    assert failure is not None and "13 | raise X" in (failure.text or "") and "\x1b" not in (failure.text or "")

    (annotation,) = reports.results_github([result])
    assert annotation.startswith("::error file=Cursos/n.md,line=12,title=vault-runner test%3A error::")
    assert "100%25" in annotation and "\n" not in annotation and "%0A" in annotation
