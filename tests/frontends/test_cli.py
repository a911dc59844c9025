"""The command line as a user meets it: exit codes, the summary line, `--json`, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.frontends.cli.main import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "vault_runner", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "vault-runner" in result.stdout


def test_bad_input_exits_2_with_one_line_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_note_vault(tmp_path / "v", {})
    data = b"# t\n```python\nprint(1)\n"
    (root / "open.md").write_bytes(data)
    code, _, err = run_cli(["run", str(root / "open.md")], capsys)
    assert code == 2
    [line] = [text for text in err.splitlines() if "open.md:2:" in text]
    assert "never closed" in line
    assert (root / "open.md").read_bytes() == data


@pytest.mark.kernel
def test_json_report_exit_codes_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {
            "n.md": """
        ```python
        print("hola")
        ```
        ```python
        1 / 0
        ```
        """,
            "h.md": "```python\nprint('original')\n```\n",
        },
    )
    code, out, _ = run_cli(["run", "--json", str(root / "n.md")], capsys)
    assert code == 1  # a block failed
    [report] = json.loads(out)["notes"]
    assert report["note"] == "n.md"
    assert [b["status"] for b in report["blocks"]] == ["ok", "error"]
    assert report["blocks"][0]["outputs"] == [{"type": "stream", "name": "stdout", "text": "hola\n"}]

    assert run_cli(["run", str(root / "h.md")], capsys)[0] == 0
    note = root / "h.md"
    note.write_text(note.read_text(encoding="utf-8").replace("original\n```", "mi comentario\n```"), encoding="utf-8")
    code, _, err = run_cli(["run", str(note)], capsys)
    assert code == 1 and "edited by hand" in err and "h.md:4" in err

    code, _, err = run_cli(["render", "--force", str(root / "n.md")], capsys)
    assert code == 0  # render runs only opted-in notes: n.md has not opted in
    assert "0 note(s) written" in err


@pytest.mark.parametrize(
    "args",
    [
        ["watch", "VAULT", "--debounce", "nan"],
        ["watch", "VAULT", "--idle-timeout", "nan"],
        ["serve", "VAULT", "--port", "70000"],
        ["serve", "VAULT", "--port", "-1"],
        ["render", "VAULT", "-j", "-1"],
        ["test", "VAULT", "-j", "-2"],
    ],
)
def test_a_number_out_of_its_range_is_a_usage_error_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """Issue 15 review: NaN was taken (then watch never ran anything), port 70000 was a
    traceback, `render -j -1` went ahead, `test -j -2` said `error .:`."""
    root = make_note_vault(tmp_path / "v", {"n.md": "---\nvault-runner: true\n---\n```python\nprint(1)\n```\n"})
    with pytest.raises(SystemExit) as exited:
        main([str(root) if arg == "VAULT" else arg for arg in args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"vault-runner {args[0]}: error: argument " in err, err
    assert "trust" not in err and "Traceback" not in err  # said before the trust check
    assert "vault-runner:output" not in (root / "n.md").read_text(encoding="utf-8")  # nothing ran
