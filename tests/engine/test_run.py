"""The engine end to end with a real ipykernel: run, render, write back, clean.

These call the engine (Engine.run_note, clean_note) as the front ends do; what the CLI
prints and returns is tested in tests/frontends/test_cli.py."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import copy_sample_vault, make_note_vault
from vault_runner import engine as engine_mod
from vault_runner.core import note as notes
from vault_runner.disk.vault import load_vault
from vault_runner.engine.targets import notes_under
from vault_runner.model import NoteReport

pytestmark = pytest.mark.kernel


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def render(*paths: Path, force: bool = False) -> list[NoteReport]:
    """What `render PATHS` does: every opted-in note under the paths, one engine each."""
    return [
        engine_mod.Engine(vault, force=force).run_note(note, require_opt_in=True) for vault, note in notes_under(paths)
    ]


def run(note: Path, *, force: bool = False) -> NoteReport:
    """What `run NOTE` does: the note runs whether or not it opted in."""
    [(vault, path)] = notes_under([note])
    return engine_mod.Engine(vault, force=force).run_note(path, require_opt_in=False)


def statuses(report: NoteReport) -> list[str]:
    return [b.status for b in report.blocks]


@pytest.fixture(scope="module")
def rendered_vault(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_sample_vault(tmp_path_factory.mktemp("rendered") / "vault")
    for note in root.rglob("*.md"):  # start from the sources, whatever state the repo copy is in
        engine_mod.clean_note(load_vault(root), note)
    assert not any(r.failed or r.status == "refused" for r in render(root))
    return root


def test_render_writes_outputs_plots_and_expected_error(rendered_vault: Path) -> None:
    tensores = (rendered_vault / "PyTorch" / "01 Tensores.md").read_text(encoding="utf-8")
    assert tensores.count("<!-- vault-runner:output code=") == len(notes.parse_note(tensores).blocks)
    regresion = rendered_vault / "PyTorch" / "04 Regresión lineal.md"
    embeds = re.findall(r"!\[\[([^\]]+-vr-[0-9a-f]{12}\.png)\]\]", regresion.read_text(encoding="utf-8"))
    assert len(embeds) >= 3
    for name in embeds:  # attachmentFolderPath is "adjuntos" in the sample vault
        data = (rendered_vault / "adjuntos" / name).read_bytes()
        assert data.startswith(b"\x89PNG")
    operaciones = (rendered_vault / "PyTorch" / "02 Operaciones con tensores.md").read_text(encoding="utf-8")
    callout = re.search(
        r"> \[!example\] RuntimeError: mat1 and mat2 shapes cannot be multiplied.*?<!-- vault-runner:end",
        operaciones,
        re.S,
    )
    assert callout, "the deliberate shape error (raises: RuntimeError) is shown in a neutral callout"
    line = next(i for i, text in enumerate(operaciones.splitlines(), 1) if text == "torch.matmul(tensor_A, tensor_B)")
    assert f'File "02 Operaciones con tensores.md", line {line}' in callout.group(0)
    # The block after the error still ran.
    after = operaciones[callout.end() :]
    assert "<!-- vault-runner:output code=" in after
    # The note that does not opt in was not touched, the note without code neither.
    for name in ["Borradores/Ideas sin ejecutar.md", "Inicio.md", "PyTorch/00 Fundamentos de deep learning.md"]:
        assert (rendered_vault / name).read_bytes() == (
            Path(__file__).parent.parent.parent / "sample_vault" / name
        ).read_bytes()


def test_second_render_writes_nothing(rendered_vault: Path) -> None:
    before = snapshot(rendered_vault)
    reports = render(rendered_vault)
    assert snapshot(rendered_vault) == before
    assert {r.status for r in reports} <= {"current", "no-blocks", "not-opted-in"}
    assert not any(r.written for r in reports)


def test_clean_gives_back_the_source_notes(rendered_vault: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(rendered_vault, copy)
    vault = load_vault(copy)
    for note in vault.notes(copy):
        assert not engine_mod.clean_note(vault, note).kept
    sources = Path(__file__).parent.parent.parent / "sample_vault"
    for note in copy.rglob("*.md"):
        original = sources / note.relative_to(copy)
        assert notes.strip_regions(notes.parse_note(original.read_text(encoding="utf-8"))) == note.read_text(
            encoding="utf-8"
        )
    assert not list((copy / "adjuntos").glob("*-vr-*.png"))
    assert (copy / "adjuntos" / "diagrama-tensores.png").exists()  # the user's own image stays


def test_report_of_a_note_with_an_error_and_an_unrun_block(tmp_path: Path) -> None:
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
        ```python
        #| eval: false
        nunca()
        ```
        """
        },
    )
    report = run(root / "n.md")
    assert report.failed and report.written
    first, second, third = report.blocks
    assert (first.status, first.line, first.first_line) == ("ok", 1, 'print("hola")')
    assert first.outputs == [{"type": "stream", "name": "stdout", "text": "hola\n"}]
    assert first.device == "cpu" and first.duration >= 0
    assert second.status == "error" and second.outputs[0]["ename"] == "ZeroDivisionError"
    assert third.status == "not-run"
    text = (root / "n.md").read_text(encoding="utf-8")
    assert "nunca()\n```\n" in text and text.count("vault-runner:output") == 2


def test_output_false_shows_only_errors_in_the_note_and_everything_in_the_report(tmp_path: Path) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {"n.md": '```python\n#| output: false\nprint("sali" + "da")\n1 / 0\n```\n'},
    )
    report = run(root / "n.md")
    [block] = report.blocks
    assert [o["type"] for o in block.outputs] == ["stream", "error"]  # the report has them all
    region = notes.parse_note((root / "n.md").read_text(encoding="utf-8")).blocks[0].region
    assert region is not None and "ZeroDivisionError" in region.body and "salida" not in region.body


def test_errors_continue_and_error_false_stops(tmp_path: Path) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {
            "sigue.md": """
            ```python
            raise ValueError("uno")
            ```
            ```python
            print("dos")
            ```
            """,
            "para.md": """
            ---
            execute:
              error: false
            ---
            ```python
            raise ValueError("uno")
            ```
            ```python
            print("dos")
            ```
            """,
        },
    )
    assert statuses(run(root / "sigue.md")) == ["error", "ok"]
    assert statuses(run(root / "para.md")) == ["error", "skipped"]
    assert "dos" in (root / "sigue.md").read_text(encoding="utf-8")
    stopped = (root / "para.md").read_text(encoding="utf-8")
    assert "ValueError: uno" in stopped and "\ndos\n" not in stopped


def test_timeout_interrupts_and_the_note_goes_on(tmp_path: Path) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {
            "t.md": """
        ```python
        x = 41
        ```
        ```python
        #| timeout: 1
        while True:
            pass
        ```
        ```python
        print(x + 1)
        ```
        """
        },
    )
    assert statuses(run(root / "t.md")) == ["ok", "timeout", "ok"]
    text = (root / "t.md").read_text(encoding="utf-8")
    assert "TimeoutError: the block ran longer than its timeout of 1 s" in text
    assert "\n42\n" in text  # state survived the interrupt


def test_seed_reproduces(tmp_path: Path) -> None:
    note = """
        ---
        execute:
          seed: 7
        ---
        ```python
        import random, torch, numpy as np
        print(random.random(), np.random.rand(), torch.rand(2))
        ```
        """
    root = make_note_vault(tmp_path / "v", {"a.md": note, "b.md": note})
    assert not run(root / "a.md").failed and not run(root / "b.md").failed
    a = (root / "a.md").read_text(encoding="utf-8")
    assert a == (root / "b.md").read_text(encoding="utf-8")
    assert not run(root / "a.md", force=True).failed
    assert (root / "a.md").read_text(encoding="utf-8") == a


@pytest.mark.parametrize(
    "setting,folder", [("/", "."), ("./", "Curso"), ("./img", "Curso/img"), ("adjuntos", "adjuntos")]
)
def test_figures_follow_attachment_folder(tmp_path: Path, setting: str, folder: str) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {
            "Curso/plot.md": """
        ```python
        import matplotlib.pyplot as plt
        plt.plot([1, 2, 3])
        plt.show()
        ```
        """
        },
        app={"attachmentFolderPath": setting, "useMarkdownLinks": True, "newLinkFormat": "relative"},
    )
    assert statuses(run(root / "Curso" / "plot.md")) == ["ok"]
    [image] = list((root / folder).glob("plot-*-vr-*.png"))
    text = (root / "Curso" / "plot.md").read_text(encoding="utf-8")
    relative = os.path.relpath(image, root / "Curso").replace(os.sep, "/")
    assert f"![]({relative})" in text
    # An unchanged figure is not rewritten; a changed one replaces the old file.
    mtime = image.stat().st_mtime_ns
    assert statuses(run(root / "Curso" / "plot.md", force=True)) == ["ok"]
    assert image.stat().st_mtime_ns == mtime
    (root / "Curso" / "plot.md").write_text(text.replace("[1, 2, 3]", "[3, 2, 1]"), encoding="utf-8")
    assert statuses(run(root / "Curso" / "plot.md")) == ["ok"]
    [new_image] = list((root / folder).glob("plot-*-vr-*.png"))
    assert new_image != image and not image.exists()


def test_bad_input_is_refused_and_left_untouched(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {})
    cases = {
        "latin1.md": ("```python\nprint(1)\n```\ncaf\xe9\n".encode("latin-1"), ":4:", "UTF-8"),
        "yaml.md": (b"---\ntags: [a\n---\n```python\nprint(1)\n```\n", "yaml.md:", "YAML"),
        "open.md": (b"# t\n```python\nprint(1)\n", "open.md:2:", "never closed"),
    }
    for name, (data, where, what) in cases.items():
        (root / name).write_bytes(data)
        report = run(root / name)
        assert report.status == "refused"
        assert where in report.message and what in report.message and "\n" not in report.message
        assert (root / name).read_bytes() == data
    outside = tmp_path / "fuera.md"
    outside.write_text("```python\nprint(1)\n```\n", encoding="utf-8")
    (root / "enlace.md").symlink_to(outside)
    report = run(root / "enlace.md")
    assert report.status == "refused" and "outside the vault" in report.message
    assert outside.read_text(encoding="utf-8") == "```python\nprint(1)\n```\n"


def test_hand_edited_region_is_kept_unless_forced(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {"h.md": "```python\nprint('original')\n```\n"})
    note = root / "h.md"
    assert statuses(run(note)) == ["ok"]
    edited = note.read_text(encoding="utf-8").replace("original\n```", "mi comentario\n```")
    note.write_text(edited, encoding="utf-8")
    report = run(note)
    [block] = report.blocks
    assert report.failed and block.status == "hand-edited"
    assert "edited by hand" in block.message and "h.md:4" in block.message
    assert note.read_text(encoding="utf-8") == edited
    assert statuses(run(note, force=True)) == ["ok"] and "original" in note.read_text(encoding="utf-8")


def test_edit_made_while_a_block_runs_is_never_lost(tmp_path: Path) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {
            "c.md": """
        # Nota
        ```python
        import time
        time.sleep(1.5)
        print("lento")
        ```
        ```python
        print("segundo")
        ```
        """
        },
    )
    note = root / "c.md"

    def edit() -> None:
        time.sleep(0.8)  # while the first block sleeps
        text = note.read_text(encoding="utf-8")
        note.write_text(text.replace('print("segundo")', 'print("cambiado")') + "una línea nueva\n", encoding="utf-8")

    editor = threading.Thread(target=edit)
    editor.start()
    report = run(note)
    editor.join()
    text = note.read_text(encoding="utf-8")
    assert "una línea nueva\n" in text and 'print("cambiado")' in text
    assert "lento" in text  # the unchanged block got its output
    assert "\nsegundo\n" not in text  # output of the replaced code is not attached to new code
    assert [b.status for b in report.blocks] == ["ok", "unwritten"]


def test_dead_kernel_is_reported_and_next_run_is_clean(tmp_path: Path) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {
            "d.md": """
        ```python
        import os
        os._exit(3)
        ```
        ```python
        print("después")
        ```
        """
        },
    )
    assert statuses(run(root / "d.md")) == ["dead", "skipped"]
    assert "KernelDied" in (root / "d.md").read_text(encoding="utf-8")


def test_notebook_semantics_magics_display_and_last_expression(tmp_path: Path) -> None:
    root = make_note_vault(
        tmp_path / "v",
        {
            "m.md": """
        ```python
        from IPython.display import display, Markdown
        display(Markdown("**negrita**"))
        !echo desde-shell
        3 * 7
        ```
        ```python
        %%capture salida
        print("oculto")
        ```
        ```python
        print(salida.stdout.strip())
        ```
        """
        },
    )
    assert statuses(run(root / "m.md")) == ["ok", "ok", "ok"]
    text = (root / "m.md").read_text(encoding="utf-8")
    assert "**negrita**" in text and "desde-shell" in text and "\n21\n" in text and "\noculto\n" in text
