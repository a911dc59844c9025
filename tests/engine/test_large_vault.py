"""A real-world vault: thousands of notes, many languages, odd bytes, no python blocks."""

from __future__ import annotations

import random
from pathlib import Path

from tests.conftest import make_note_vault
from vault_runner import engine as engine_mod
from vault_runner.disk.vault import load_vault
from vault_runner.engine.targets import notes_under

SAMPLES = [
    "# 深度学习笔记\n张量是多维数组。\n```js\nconsole.log('hola')\n```\n",
    "---\ntags: [русский, заметки\n---\nСломанный YAML, но без кода.\n",
    "\ufeff---\r\ntitle: نص عربي\r\n---\r\nمرحبا بالعالم\r\n",
    "> [!note] Émoji 🤖🧠\n> Happy copy of a pycon session:\n> ```pycon\n> >>> 1 + 1\n> 2\n> ```\n",
    "n√∫meros mojibake and trailing spaces   \n\tand a tab\nno final newline",
    "```\nunclosed plain fence with the word python inside\n",
    "~~~yaml\nkey: py\n~~~\n![[imagen.png]]\n<iframe src='x'></iframe>\n",
    "---\nvault-runner: true\n---\nOpted in explicitly but nothing to run. `py` inline code.\n",
]


def test_render_of_a_large_vault_without_code_changes_nothing(tmp_path: Path) -> None:
    rng = random.Random(7)
    root = make_note_vault(tmp_path / "v", {}, config='include = ["**"]\n')
    for i in range(3000):
        folder = root / f"carpeta {i % 37}" / f"sub{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.choice(SAMPLES).encode("utf-8")
        if i % 101 == 0:
            data += b"\xff\xfe latin-1 caf\xe9 bytes\n"
        (folder / f"nota {i} ñ.md").write_bytes(data)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*.md")}
    reports = [engine_mod.Engine(v, force=False).run_note(note) for v, note in notes_under([root])]
    assert len(reports) == 3000 and not any(r.failed for r in reports)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*.md")} == before
    assert not list(root.rglob("*.png"))


def test_notes_without_blocks_never_report_input_errors(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "v", {}, config='include = ["**"]\n')
    note = root / "n.md"
    note.write_bytes(b"---\ntags: [a\n---\ncaf\xe9 happy\n")
    report = engine_mod.Engine(load_vault(root)).run_note(note)
    assert report.status == "no-blocks" and not report.failed
