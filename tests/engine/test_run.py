"""End to end with a real ipykernel: run, render, write back, clean."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import copy_sample_vault, make_note_vault
from vault_runner import engine as engine_mod
from vault_runner.core import note as notes
from vault_runner.disk.vault import load_vault
from vault_runner.frontends.cli.main import main

pytestmark = pytest.mark.kernel


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def rendered_vault(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_sample_vault(tmp_path_factory.mktemp("rendered") / "vault")
    for note in root.rglob("*.md"):  # start from the sources, whatever state the repo copy is in
        engine_mod.clean_note(load_vault(root), note)
    assert main(["render", str(root)]) == 0
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


def test_second_render_writes_nothing(rendered_vault: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(rendered_vault)
    code, _, err = run_cli(["render", str(rendered_vault)], capsys)
    assert code == 0
    assert snapshot(rendered_vault) == before
    assert "0 note(s) written" in err


def test_clean_gives_back_the_source_notes(rendered_vault: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(rendered_vault, copy)
    assert main(["clean", str(copy)]) == 0
    sources = Path(__file__).parent.parent.parent / "sample_vault"
    for note in copy.rglob("*.md"):
        original = sources / note.relative_to(copy)
        assert notes.strip_regions(notes.parse_note(original.read_text(encoding="utf-8"))) == note.read_text(
            encoding="utf-8"
        )
    assert not list((copy / "adjuntos").glob("*-vr-*.png"))
    assert (copy / "adjuntos" / "diagrama-tensores.png").exists()  # the user's own image stays


def test_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    code, out, _ = run_cli(["run", "--json", str(root / "n.md")], capsys)
    assert code == 1
    report = json.loads(out)["notes"][0]
    first, second, third = report["blocks"]
    assert first["status"] == "ok" and first["line"] == 1 and first["first_line"] == 'print("hola")'
    assert first["outputs"] == [{"type": "stream", "name": "stdout", "text": "hola\n"}]
    assert first["device"] == "cpu" and first["duration"] >= 0
    assert second["status"] == "error" and second["outputs"][0]["ename"] == "ZeroDivisionError"
    assert third["status"] == "not-run"
    text = (root / "n.md").read_text(encoding="utf-8")
    assert "nunca()\n```\n" in text and text.count("vault-runner:output") == 2


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
    assert main(["run", str(root / "sigue.md"), str(root / "para.md")]) == 1
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
    vault = load_vault(root)
    report = engine_mod.Engine(vault).run_note(root / "t.md", require_opt_in=False)
    assert [b.status for b in report.blocks] == ["ok", "timeout", "ok"]
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
    assert main(["run", str(root / "a.md"), str(root / "b.md")]) == 0
    a = (root / "a.md").read_text(encoding="utf-8")
    assert a == (root / "b.md").read_text(encoding="utf-8")
    assert main(["run", "--force", str(root / "a.md")]) == 0
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
    assert main(["run", str(root / "Curso" / "plot.md")]) == 0
    [image] = list((root / folder).glob("plot-*-vr-*.png"))
    text = (root / "Curso" / "plot.md").read_text(encoding="utf-8")
    import os

    relative = os.path.relpath(image, root / "Curso").replace(os.sep, "/")
    assert f"![]({relative})" in text
    # An unchanged figure is not rewritten; a changed one replaces the old file.
    mtime = image.stat().st_mtime_ns
    assert main(["run", "--force", str(root / "Curso" / "plot.md")]) == 0
    assert image.stat().st_mtime_ns == mtime
    (root / "Curso" / "plot.md").write_text(text.replace("[1, 2, 3]", "[3, 2, 1]"), encoding="utf-8")
    assert main(["run", str(root / "Curso" / "plot.md")]) == 0
    [new_image] = list((root / folder).glob("plot-*-vr-*.png"))
    assert new_image != image and not image.exists()


def test_bad_input_is_refused_and_left_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_note_vault(tmp_path / "v", {})
    cases = {
        "latin1.md": ("```python\nprint(1)\n```\ncaf\xe9\n".encode("latin-1"), ":4:", "UTF-8"),
        "yaml.md": (b"---\ntags: [a\n---\n```python\nprint(1)\n```\n", "yaml.md:", "YAML"),
        "open.md": (b"# t\n```python\nprint(1)\n", "open.md:2:", "never closed"),
    }
    for name, (data, where, what) in cases.items():
        (root / name).write_bytes(data)
        code, _, err = run_cli(["run", str(root / name)], capsys)
        assert code == 2
        assert where in err and what in err
        assert (root / name).read_bytes() == data
    outside = tmp_path / "fuera.md"
    outside.write_text("```python\nprint(1)\n```\n", encoding="utf-8")
    (root / "enlace.md").symlink_to(outside)
    code, _, err = run_cli(["run", str(root / "enlace.md")], capsys)
    assert code == 2 and "outside the vault" in err
    assert outside.read_text(encoding="utf-8") == "```python\nprint(1)\n```\n"


def test_hand_edited_region_is_kept_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_note_vault(tmp_path / "v", {"h.md": "```python\nprint('original')\n```\n"})
    assert main(["run", str(root / "h.md")]) == 0
    note = root / "h.md"
    edited = note.read_text(encoding="utf-8").replace("original\n```", "mi comentario\n```")
    note.write_text(edited, encoding="utf-8")
    code, _, err = run_cli(["run", str(note)], capsys)
    assert code == 1 and "edited by hand" in err and "h.md:4" in err
    assert note.read_text(encoding="utf-8") == edited
    code, _, _ = run_cli(["run", "--force", str(note)], capsys)
    assert code == 0 and "original" in note.read_text(encoding="utf-8")


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
    report = engine_mod.Engine(load_vault(root)).run_note(note, require_opt_in=False)
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
    report = engine_mod.Engine(load_vault(root)).run_note(root / "d.md", require_opt_in=False)
    assert [b.status for b in report.blocks] == ["dead", "skipped"]
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
    assert main(["run", str(root / "m.md")]) == 0
    text = (root / "m.md").read_text(encoding="utf-8")
    assert "**negrita**" in text and "desde-shell" in text and "\n21\n" in text and "\noculto\n" in text


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "vault_runner", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "vault-runner" in result.stdout
