"""What the command line says, tried as a new user meets it: paths, advice, warnings, refusals.

Issue 15 (10, 11, 12, 14) and issue 10 (9, 15): one path rule, one wording of each fix,
warnings on note lines, one line and exit 2 for a note that must not or cannot be written,
the plain tier's warning outside the outputs, no asyncio noise when `watch` stops.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from tests.conftest import REPO, make_note_vault
from vault_runner.core.note import region_checksum
from vault_runner.disk import trust
from vault_runner.frontends.cli.watch import Feedback
from vault_runner.model import Event

NOTE = """\
---
vault-runner: true
---
# Notas

```python
print("hola")
```

```python
print(2)
```
"""


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`vault-runner ARGS` as a user types it, in the folder `cwd`."""
    merged = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "vault_runner", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=merged,
    )


def hand_edit(note: Path) -> None:
    text = note.read_text(encoding="utf-8")
    assert "hola\n```" in text
    note.write_text(text.replace("hola\n```", "hola, mi comentario\n```", 1), encoding="utf-8")


# -- one path rule (15.12) ----------------------------------------------------------------------
def test_every_command_names_a_note_relative_to_the_current_folder_or_absolute(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {"sub/roto.md": "---\nvault-runner: true\n---\n```python\nprint(1)\n"})
    broken = root / "sub" / "roto.md"
    for command in ("check", "render", "clean"):
        inside = cli(command, "v", cwd=tmp_path)
        assert inside.returncode == 2, inside.stderr
        assert "v/sub/roto.md:4: " in inside.stdout + inside.stderr
        assert str(broken) not in inside.stdout + inside.stderr  # not absolute, not vault-relative
        outside = cli(command, str(root), cwd=REPO)  # the note is not under the current folder
        assert f"{broken}:4: " in outside.stdout + outside.stderr
    done = cli("render", "--json", "v", cwd=tmp_path)
    [report] = json.loads(done.stdout)["notes"]
    assert report["note"] == "sub/roto.md"  # JSON: vault-relative always


# -- the vault by default (15.1): every command, one rule ---------------------------------------
def test_every_command_takes_the_vault_the_current_folder_is_in(tmp_path: Path) -> None:
    """Issue 15 review: watch, serve, trust, untrust and obsidian install still required VAULT."""
    root = make_note_vault(tmp_path / "v", {"sub/n.md": "# nada\n"})
    sub = root / "sub"
    for command in ("watch", "serve"):
        done = cli(command, cwd=sub)  # untrusted: it names the vault it would run, and stops
        assert done.returncode == 2, done.stderr
        assert "required" not in done.stderr
        assert f"{root.resolve()}: this vault is not trusted" in done.stderr
    done = cli("trust", cwd=sub)
    assert done.returncode == 0 and trust.is_trusted(root), done.stderr
    done = cli("untrust", cwd=sub)
    assert done.returncode == 0 and not trust.is_trusted(root), done.stderr
    done = cli("obsidian", "install", cwd=sub)
    assert done.returncode == 0, done.stderr
    assert (root / ".obsidian" / "plugins" / "vault-runner" / "manifest.json").is_file()
    assert not (sub / ".obsidian").exists()


def test_render_in_a_folder_without_notes_to_run_says_so(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {"sub/n.md": "# nada\n"})
    done = cli("render", cwd=root / "sub")
    assert done.returncode == 0, done.stderr
    summary = done.stderr.strip().splitlines()[-1]
    assert ": ;" not in summary and "no blocks" not in summary, summary
    assert "no note with python blocks" in summary, summary


# -- hand edits: what render, watch and check say (15.10) ----------------------------------------
@pytest.mark.kernel
def test_a_hand_edit_reads_the_same_in_render_and_check_and_nothing_is_said_to_have_run(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {"sub/n.md": NOTE})
    assert cli("render", "v", cwd=tmp_path).returncode == 0
    hand_edit(root / "sub" / "n.md")
    render = cli("render", "v", cwd=tmp_path)
    check = cli("check", "v", cwd=tmp_path)
    assert render.returncode == 1 and check.returncode == 1
    [finding] = [line for line in check.stdout.splitlines() if "edited by hand" in line]
    assert finding.startswith("v/sub/n.md:")
    # The very line check prints, under the note's line in render: one path, one advice.
    assert finding in render.stderr
    [said] = [line for line in render.stderr.splitlines() if "edited by hand" in line]
    assert said.count("n.md") == 1
    header = next(line for line in render.stderr.splitlines() if line.startswith("v/sub/n.md ·"))
    assert "nothing run" in header and "?" not in header
    assert "1 hand-edited" in render.stderr and " ran" not in render.stderr.splitlines()[-1]


@pytest.mark.kernel
def test_a_stale_region_edited_by_hand_is_advised_the_command_that_updates_it(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {"n.md": NOTE})
    assert cli("render", "v", cwd=tmp_path).returncode == 0
    note = root / "n.md"
    hand_edit(note)
    note.write_text(note.read_text(encoding="utf-8").replace('print("hola")', 'print("adiós")'), encoding="utf-8")
    check = cli("check", "v", cwd=tmp_path)
    [stale] = [line for line in check.stdout.splitlines() if "stale output: this block" in line]
    # A plain `render` leaves a hand-edited region alone: advising it would not fix anything.
    assert "`vault-runner render --force`" in stale
    render = cli("render", "v", cwd=tmp_path)
    assert "`vault-runner render --force`" in render.stderr
    assert "hola, mi comentario" in note.read_text(encoding="utf-8")  # left, as the advice says


def test_clean_advises_its_own_force(tmp_path: Path) -> None:
    region = (
        "<!-- vault-runner:output code=000000000000 -->\n```\nmine\n```\n<!-- vault-runner:end sum=000000000000 -->\n"
    )
    root = make_note_vault(tmp_path / "v", {"n.md": "```python\nprint(1)\n```\n" + region})
    done = cli("clean", "v", cwd=tmp_path)
    assert done.returncode == 1
    assert "`vault-runner clean --force`" in done.stderr and "render --force" not in done.stderr
    assert (root / "n.md").read_text(encoding="utf-8").endswith(region)


# -- watch's lines (15.10) ------------------------------------------------------------------------
def feedback(root: Path) -> tuple[Feedback, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=400, highlight=False, soft_wrap=True, force_terminal=False)
    return Feedback(console, as_json=False, root=root), out


def finished(note: str, blocks: list[dict], **data: object) -> Event:
    report = {"note": note, "status": "ran", "device": "cpu", "blocks": blocks, "warnings": [], "message": None}
    base = {"status": "ran", "failed": False, "written": False, "duration": 0.01, "restored": 0, "report": report}
    return Event("note-finished", note, data={**base, **data})


def test_watch_says_where_a_superseded_run_stops_by_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    show, out = feedback(tmp_path / "v")
    show(Event("superseded", "sub/n.md", 1, 22, data={"interrupted": True}))
    assert out.getvalue().strip() == "↻ v/sub/n.md: saved again while it ran; the run stops at the block at line 22"


def test_watch_says_nothing_of_a_run_cut_before_its_first_block(tmp_path: Path) -> None:
    show, out = feedback(tmp_path)
    skipped = {"line": 6, "status": "skipped", "message": "not run: a newer save changed the code"}
    show(finished("n.md", [skipped], from_line=6))
    assert out.getvalue() == ""


def test_watch_reports_a_hand_edit_once_without_a_device_or_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    show, out = feedback(tmp_path / "v")
    message = "sub/n.md:11: the output region of the block at line 6 was edited by hand, so it is left as it is"
    show(finished("sub/n.md", [{"line": 6, "status": "hand-edited", "message": message}], failed=True))
    header, line = out.getvalue().splitlines()
    assert "nothing run" in header and "?" not in header and "block(s)" not in header
    assert line.strip().endswith(
        "v/sub/n.md:11: the output region of the block at line 6 was edited by hand, so it is left as it is"
    )
    assert line.count("n.md") == 1


# -- warnings on note lines (15.11) ---------------------------------------------------------------
@pytest.mark.kernel
def test_a_warning_names_the_note_and_its_line_as_a_traceback_does(tmp_path: Path) -> None:
    text = (
        "---\nvault-runner: true\n---\n```python\nimport warnings\ndef f():\n    warnings.warn('hondo')\n```\n\n"
        "```python\nx = 1\nwarnings.warn('cuidado')\nf()\n```\n"
    )
    root = make_note_vault(tmp_path / "v", {"w.md": text})
    done = cli("run", "--json", "v/w.md", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = (root / "w.md").read_text(encoding="utf-8").split("\n")
    warn_line = written.index("warnings.warn('cuidado')") + 1  # lines as in the written note
    inner_line = written.index("    warnings.warn('hondo')") + 1
    body = "\n".join(written)
    (block,) = [b for note in json.loads(done.stdout)["notes"] for b in note["blocks"] if b["outputs"]]
    reported = "".join(o["text"] for o in block["outputs"] if o["type"] == "stream")
    for shown in (body, reported):  # the note and --json say the same lines
        assert f"w.md:{warn_line}: UserWarning: cuidado" in shown
        assert f"w.md:{inner_line}: UserWarning: hondo" in shown
        assert "ipykernel" not in shown and "Cell In" not in shown


# -- notes that must not or cannot be written (10.9) ---------------------------------------------
def test_a_symlink_loop_is_one_line_and_exit_2(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {"a.md": NOTE})
    (root / "loop1.md").symlink_to("loop2.md")
    (root / "loop2.md").symlink_to("loop1.md")
    for command in ("render", "check", "clean"):
        done = cli(command, "v", cwd=tmp_path)
        assert "Traceback" not in done.stderr
        assert "v/loop1.md: is a symlink loop; fix or remove the link" in done.stdout + done.stderr
        assert done.returncode == 2


@pytest.mark.kernel
def test_a_read_only_note_is_never_written(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {"n.md": NOTE, "ro.md": NOTE})
    assert cli("render", "v", cwd=tmp_path).returncode == 0
    note = root / "ro.md"
    note.chmod(0o444)
    before, mode = note.read_bytes(), note.stat().st_mode
    done = cli("clean", "v", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = [text for text in done.stderr.splitlines() if text.startswith("v/ro.md:")]
    assert "read-only" in line and "chmod u+w" in line
    assert "cleaned v/n.md" in done.stderr  # the other notes are cleaned
    done = cli("render", "--force", "v/ro.md", cwd=tmp_path)
    assert done.returncode == 2 and "v/ro.md: is read-only" in done.stderr
    assert note.read_bytes() == before and note.stat().st_mode == mode


def _without_file_permission_bypass() -> tuple[str, ...]:
    """A prefix that runs a command as a user whom file permissions bind: as root, root without
    CAP_DAC_OVERRIDE (setpriv); as anyone else, nothing."""
    if os.geteuid() != 0:
        return ()
    probe = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE here: permissions do not bind root")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def test_a_note_in_a_folder_without_write_permission_is_one_line(tmp_path: Path) -> None:
    prefix = _without_file_permission_bypass()
    body = "```\n1\n```\n"
    region = (
        f"<!-- vault-runner:output code=000000000000 -->\n{body}<!-- vault-runner:end sum={region_checksum(body)} -->\n"
    )
    root = make_note_vault(tmp_path / "v", {"locked/n.md": "```python\nprint(1)\n```\n" + region})
    folder, note = root / "locked", root / "locked" / "n.md"
    before = note.read_bytes()
    folder.chmod(0o555)
    try:
        done = cli("clean", "v", cwd=tmp_path, prefix=prefix)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = [text for text in done.stderr.splitlines() if text.startswith("v/locked/n.md:")]
    assert "folder" in line and "permission" in line
    assert note.read_bytes() == before


def test_a_note_without_read_permission_is_one_line(tmp_path: Path) -> None:
    prefix = _without_file_permission_bypass()
    root = make_note_vault(tmp_path / "v", {"secreta.md": NOTE})
    note = root / "secreta.md"
    note.chmod(0o000)
    try:
        for command in (("run", "v/secreta.md"), ("clean", "v"), ("check", "v")):
            done = cli(*command, cwd=tmp_path, prefix=prefix)
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
            assert "v/secreta.md: cannot be read (permission denied)" in done.stdout + done.stderr
    finally:
        note.chmod(0o644)
    assert note.read_text(encoding="utf-8") == NOTE


# -- the plain tier's warning (10.15) -------------------------------------------------------------
@pytest.mark.kernel
def test_the_plain_tier_warns_in_the_report_not_in_the_outputs(tmp_path: Path) -> None:
    plain = make_note_vault(tmp_path / "plain", {"n.md": NOTE})
    sandboxed = make_note_vault(tmp_path / "sandboxed", {"n.md": NOTE})
    done = cli("run", "plain/n.md", cwd=tmp_path, env={"VAULT_RUNNER_SANDBOX": "plain"})
    assert done.returncode == 0, done.stderr
    assert "no sandbox" in done.stderr  # visible where the user looks: under the note's line
    assert cli("run", "sandboxed/n.md", cwd=tmp_path).returncode == 0
    # The block's output is Jupyter's, whatever the tier.
    assert (plain / "n.md").read_bytes() == (sandboxed / "n.md").read_bytes()
    done = cli("run", "--force", "--json", "plain/n.md", cwd=tmp_path, env={"VAULT_RUNNER_SANDBOX": "plain"})
    [report] = json.loads(done.stdout)["notes"]
    assert any("no sandbox" in warning for warning in report["warnings"])
    assert all("no sandbox" not in output.get("text", "") for b in report["blocks"] for output in b["outputs"])


# -- watch stops quietly (15.14) -------------------------------------------------------------------
# `vault-runner watch` in a process that, once the command has returned, counts the asyncio
# loops still open: each would be freed at interpreter exit, where its __del__ can fail
# ("Exception ignored in BaseEventLoop.__del__"). An interrupt at Ctrl+C makes one for sure.
_WATCH_THEN_COUNT_LOOPS = """
import asyncio, gc, sys
from vault_runner.frontends.cli.main import main
code = main(sys.argv[1:])
left = [o for o in gc.get_objects() if isinstance(o, asyncio.BaseEventLoop) and not o.is_closed()]
print("open loops:", len(left), flush=True)
sys.exit(code)
"""


@pytest.mark.kernel
def test_watch_stopped_while_a_block_runs_leaves_no_event_loop_behind(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {"n.md": NOTE})
    trust.trust(root)
    process = subprocess.Popen(
        [sys.executable, "-c", _WATCH_THEN_COUNT_LOOPS, "watch", "--json", "v"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert '"watching"' in process.stdout.readline()
        note = root / "n.md"
        note.write_text(NOTE.replace("print(2)", "import time; time.sleep(60)"), encoding="utf-8")
        while True:  # bounded by the test's own timeout: a hang fails it
            line = process.stdout.readline()
            assert line, "watch ended before the long block started"
            if '"block-started"' in line and '"line": 10' in line:
                break
        time.sleep(1.5)  # past the grace period: Ctrl+C interrupts the block
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "open loops: 0" in out, out
    assert "Exception ignored" not in err and "Traceback" not in err, err
