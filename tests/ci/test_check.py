"""`vault-runner check`: stale, missing and hand-edited regions, found without running anything."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_sample_vault, make_note_vault
from tests.core.test_warnings import NOTE as WARNED  # ignored options on lines 5, 10 and 11
from vault_runner.ci import check as checks
from vault_runner.core import compare
from vault_runner.core import note as notes
from vault_runner.disk.vault import load_vault
from vault_runner.engine import load
from vault_runner.errors import SanitizerError
from vault_runner.frontends.cli.main import main
from vault_runner.kernel.session import KernelSession

OPERACIONES = "PyTorch/02 Operaciones con tensores.md"
TENSORES = "PyTorch/01 Tensores.md"


@pytest.fixture
def rendered_vault(rendered_sample_vault: Path) -> Path:
    return rendered_sample_vault


@pytest.fixture
def vault(rendered_vault: Path, tmp_path: Path) -> Path:
    """A private rendered copy each test may edit."""
    return Path(shutil.copytree(rendered_vault, tmp_path / "vault"))


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any kernel start: `check` must never start one."""
    started: list[str] = []

    def refuse(self: object, *args: object, **kwargs: object) -> None:
        started.append(type(self).__name__)
        raise AssertionError("check started a kernel")

    monkeypatch.setattr(KernelSession, "start", refuse)
    from jupyter_client.manager import KernelManager

    monkeypatch.setattr(KernelManager, "start_kernel", refuse)
    return started


def check(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def block_lines(path: Path) -> list[int]:
    return [b.fence_line for b in notes.parse_note(path.read_text(encoding="utf-8")).blocks]


@pytest.mark.kernel  # needs the rendered copy (a render, until sample_vault is committed rendered)
def test_rendered_copy_passes(vault: Path, no_kernel: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check([str(vault)], capsys)
    assert (code, out) == (0, "")
    assert "5 note(s) checked" in err
    assert no_kernel == []


@pytest.mark.kernel  # needs the rendered copy (a render, until sample_vault is committed rendered)
def test_edited_code_names_note_and_line_then_revert_passes(
    vault: Path, no_kernel: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(vault.parent)
    note = vault / OPERACIONES
    original = note.read_bytes()
    text = original.decode("utf-8")
    edited_line = text.split("\n").index("print(torch.add(tensor, 10))") + 1
    fence = max(line for line in block_lines(note) if line < edited_line)
    note.write_text(text.replace("print(torch.add(tensor, 10))", "print(torch.add(tensor, 11))"), encoding="utf-8")

    code, out, _ = check(["vault"], capsys)

    assert code == 1
    lines = out.splitlines()
    assert lines[0] == (
        f"vault/{OPERACIONES}:{fence}: stale output: this block's code or options changed since it ran; "
        "run `vault-runner render` to update it"
    )
    later = [line for line in block_lines(note) if line > fence]
    # The blocks below are stale too (hashes are chained), and say why.
    assert [line.split(":")[1] for line in lines[1:]] == [str(n) for n in later]
    assert all(f"the code above it changed (line {fence})" in line for line in lines[1:])
    assert all(line.startswith(f"vault/{OPERACIONES}:") for line in lines)

    note.write_bytes(original)
    assert check(["vault"], capsys)[0] == 0
    assert no_kernel == []


@pytest.mark.kernel  # needs the rendered copy (a render, until sample_vault is committed rendered)
def test_hand_edit_inside_a_region_is_reported(
    vault: Path, no_kernel: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    note = vault / TENSORES
    loaded = load(load_vault(vault), note)
    block = next(p.block for p in loaded.plan if p.block.region and "ndim: 0" in p.block.region.body)
    assert block.region is not None
    note.write_text(note.read_text(encoding="utf-8").replace("ndim: 0", "ndim: cero", 1), encoding="utf-8")

    code, out, _ = check([str(note)], capsys)

    assert code == 1
    assert out.splitlines() == [
        f"{note}:{block.region.first_line}: the output region of the block at line {block.fence_line} was edited "
        "by hand, so it is left as it is; move your text out of it, or run `vault-runner render --force` to overwrite it"
    ]
    assert no_kernel == []


@pytest.mark.kernel  # needs the rendered copy (a render, until sample_vault is committed rendered)
def test_missing_region_inserted_block_and_eval_false(
    vault: Path, no_kernel: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    note = vault / "Borradores" / "Experimento opt-in.md"
    text = note.read_text(encoding="utf-8")
    # A new block above the first one: it has no region; the ones below did not change themselves.
    text = text.replace("```python\nimport torch\n", "```python\nnuevo = 1\n```\n\n```python\nimport torch\n", 1)
    # And the last block switched off: its old region has to go.
    text = text.replace("#| output: false\n", "#| output: false\n#| eval: false\n", 1)
    note.write_text(text, encoding="utf-8")
    fences = block_lines(note)

    code, out, _ = check([str(note)], capsys)

    assert code == 1
    assert out.splitlines() == [
        f"{note}:{fences[0]}: this block has no output region; run `vault-runner render` to update it",
        f"{note}:{fences[1]}: stale output: the code above it changed (line {fences[0]}) and this block's output "
        "depends on the blocks before it; run `vault-runner render` to update it",
        f"{note}:{fences[2]}: this block has `eval: false` but still has an output region; "
        "run `vault-runner render` to remove it",
    ]
    assert no_kernel == []


@pytest.mark.kernel  # needs the rendered copy (a render, until sample_vault is committed rendered)
def test_diff_shows_what_render_would_change(
    vault: Path, no_kernel: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    note = vault / OPERACIONES
    note.write_text(
        note.read_text(encoding="utf-8").replace("print(torch.add(tensor, 10))", "print(torch.add(tensor, 11))"),
        encoding="utf-8",
    )
    loaded = load(load_vault(vault), note)
    first_stale = next(p for p in loaded.runnable if p.block.region and p.block.region.code_hash != p.code_hash)

    code, out, _ = check(["--diff", str(note)], capsys)

    assert code == 1
    diff = out[out.index("--- a/") :]
    assert f"+<!-- vault-runner:output code={first_stale.code_hash} -->" in diff
    assert f"-<!-- vault-runner:output code={first_stale.block.region.code_hash} -->" in diff
    assert f"+{checks.DIFF_PLACEHOLDER}" in diff
    assert "-tensor([11, 12, 13])" in diff  # the old output goes away
    # The diff, applied, gives a note that still fails check: placeholders are not outputs.
    applied = checks.render_diff(loaded)
    assert applied == diff.replace(str(note), loaded.relative)
    assert no_kernel == []


def test_unparseable_opted_in_note_exits_2_but_a_draft_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_kernel: list[str]
) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {
            "Cursos/roto.md": "# Roto\n\n```python\nprint(1)\n",
            "Borradores/idea.md": "# Idea\n\n```python\na medio escribir\n",
        },
        config='include = ["Cursos/**"]\n',
    )
    code, out, _ = check([str(root)], capsys)
    assert code == 2
    assert out.splitlines() == [
        f"{root / 'Cursos/roto.md'}:3: has a ```python block that is never closed; add a closing ``` line after its code"
    ]
    (root / "Cursos/roto.md").write_text("# Roto\n\n```python\nprint(1)\n```\n", encoding="utf-8")
    code, out, _ = check([str(root)], capsys)
    assert code == 1 and "no output region" in out and "idea.md" not in out


@pytest.mark.kernel  # needs the rendered copy (a render, until sample_vault is committed rendered)
def test_report_formats(vault: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    note = vault / TENSORES
    note.write_text(note.read_text(encoding="utf-8").replace("ndim: 0", "ndim: cero", 1), encoding="utf-8")
    region_line = next(
        b.region.first_line for b in notes.parse_note(note.read_text(encoding="utf-8")).blocks if b.region.hand_edited
    )

    code, out, _ = check(["--format", "github", str(vault)], capsys)
    assert code == 1
    assert re.fullmatch(
        rf"::error file={re.escape(str(note))},line={region_line},title=vault-runner check%3A hand-edited::.*edited by hand.*\n",
        out,
    )

    code, out, _ = check(["--json", "--junit-xml", str(tmp_path / "check.xml"), str(vault)], capsys)
    data = json.loads(out)
    assert code == 1 and data["passed"] is False and data["checked_notes"] == 5
    assert [(f["note"], f["line"], f["kind"]) for f in data["findings"]] == [(TENSORES, region_line, "hand-edited")]
    suite = ET.parse(tmp_path / "check.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "5" and suite.get("failures") == "1"
    failed = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [(c.get("classname"), c.get("line")) for c in failed] == [(str(note), str(region_line))]


def test_option_warnings_show_in_every_format_on_the_options_own_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_kernel: list[str]
) -> None:
    """Issue 15 review: `check --json` dropped them, `--format github` printed them as plain lines."""
    make_note_vault(tmp_path / "v", {"sub/n.md": WARNED})
    monkeypatch.chdir(tmp_path)
    said = [
        (5, "unknown option `colour` in frontmatter is ignored"),
        (10, "unknown option `timout` in block is ignored"),
        (11, "option `seed` applies to the whole note; set it in the frontmatter"),
    ]

    code, out, _ = check(["--json", "v"], capsys)
    assert code == 1  # the block has no region: a finding; the warnings fail nothing
    assert json.loads(out)["warnings"] == [f"sub/n.md:{line}: warning: {text}" for line, text in said]

    code, out, err = check(["--format", "github", "v"], capsys)
    assert code == 1
    annotations = [line for line in out.splitlines() if line.startswith("::warning")]
    assert annotations == [
        f"::warning file=v/sub/n.md,line={line},title=vault-runner check%3A warning::{text}" for line, text in said
    ]
    assert "warning: unknown option" not in err  # annotations only, not plain lines as well

    code, _, err = check(["v"], capsys)
    warned = [line for line in err.splitlines() if ": warning: " in line]
    assert warned == [f"v/sub/n.md:{line}: warning: {text}" for line, text in said]  # the one path rule


@pytest.mark.kernel  # needs the rendered copy (a render, until sample_vault is committed rendered)
def test_pre_commit_hook_checks_the_files_it_is_given(
    vault: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_kernel: list[str]
) -> None:
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    hook = next(h for h in hooks if h["id"] == "vault-runner-check")
    assert hook["entry"] == "vault-runner check" and hook["types"] == ["markdown"]
    # pre-commit passes the changed files, relative to the repository root, some outside any vault.
    monkeypatch.chdir(vault.parent)
    (vault.parent / "README.md").write_text("# Proyecto\n\n```python\nprint('no es una nota')\n```\n")
    note = vault / OPERACIONES
    files = ["README.md", f"vault/{OPERACIONES}", f"vault/{TENSORES}"]
    assert check(files, capsys)[0] == 0
    note.write_text(note.read_text(encoding="utf-8").replace("tensor + 10", "tensor + 1", 1), encoding="utf-8")
    code, out, _ = check(files, capsys)
    assert code == 1 and out.startswith(f"vault/{OPERACIONES}:")


def test_the_repository_sample_vault_is_current(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Dogfood: a stale sample vault fails the build."""
    code, out, _ = check([str(copy_sample_vault(tmp_path / "vault"))], capsys)
    assert (code, out) == (0, "")


# -- output comparison (pure) --------------------------------------------------------------


def body(*texts: str, images: int = 0) -> str:
    parts = ["```\n" + t + "\n```" for t in texts] + [f"![[nota-vr-{i:012x}.png]]" for i in range(images)]
    return "\n\n".join(parts) + "\n"


SANITIZERS = compare.compile_sanitizers()


def test_compare_ignores_addresses_timings_and_temp_paths() -> None:
    stored = body(
        "<object object at 0x7ff9576ad070>",
        "Bucle: 14\nCPU times: user 924 µs, sys: 201 µs, total: 1.12 ms\nWall time: 854 µs",
        "guardado en /tmp/tmpab12cd/modelo.pt",
        images=1,
    )
    fresh = body(
        "<object object at 0x7f11d0a3e2b0>",
        "Bucle: 14\nCPU times: user 2.1 ms, sys: 0 ns, total: 2.1 ms\nWall time: 3.02 s",
        "guardado en /tmp/tmpzz99yy/modelo.pt",
        images=1,
    )
    assert compare.compare_bodies(stored, fresh, SANITIZERS) is None


def test_compare_catches_a_changed_value_and_a_lost_image() -> None:
    diff = compare.compare_bodies(body("Media: 45.00"), body("Media: 45.01"), SANITIZERS)
    assert diff is not None and "-Media: 45.00" in diff and "+Media: 45.01" in diff
    assert compare.compare_bodies(body("x", images=2), body("x", images=1), SANITIZERS) == (
        "the stored output has 2 image(s), the fresh run made 1"
    )
    # Short hex values are data, not addresses.
    assert compare.compare_bodies(body("0xff"), body("0xfe"), SANITIZERS) is not None


def test_compare_reads_folded_output_skips_tracebacks_and_uses_vault_sanitizers() -> None:
    folded = "> [!abstract]- Output (3 lines)\n> ```\n> a\n> b 1.5 s\n> ```\n"
    failure = '> [!failure] ValueError: x\n> ```pytb\n> File "n.md", line 3\n> ```\n'
    assert compare.comparable(folded + "\n" + failure).texts == ("a\nb 1.5 s",)
    custom = compare.compile_sanitizers([(r"\d+\.\d+ s", "<secs>")])
    fresh = folded.replace("1.5 s", "2.25 s")
    assert compare.compare_bodies(folded, fresh, SANITIZERS) is not None
    assert compare.compare_bodies(folded, fresh, custom) is None
    with pytest.raises(SanitizerError):
        compare.compile_sanitizers([("(", "")])
