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
