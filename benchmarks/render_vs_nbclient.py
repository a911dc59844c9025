"""Render a note of 80 small blocks with vault_runner, and run the same code as a notebook with nbclient.

    python benchmarks/render_vs_nbclient.py [--blocks 80] [--repeat 3]

Both start a fresh kernel and run every block top to bottom; vault_runner also renders
the outputs and writes the note. Prints the median wall time of each and the ratio
(vault_runner / nbclient; target <= 1.0). Runs alternate so machine noise hits both.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _notebooks import notebook_to_note, run_nbclient  # noqa: E402

from vault_runner.disk.vault import load_vault  # noqa: E402
from vault_runner.engine import Engine  # noqa: E402

SNIPPETS = [
    "import torch\nx = torch.arange(12.)\nx",
    "y = x.reshape(3, 4)\nprint(y.shape)",
    "y.sum(dim=0)",
    "z = y @ y.T\nz.mean().item()",
    "print([i * i for i in range(5)])",
    "torch.stack([x, x]).shape",
    "y[:, 1]",
    "a = 3\nb = a + 4\nb",
]


def small_notebook(blocks: int) -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_markdown_cell("# Benchmark\nA note of small blocks.")]
    cells += [nbformat.v4.new_code_cell(SNIPPETS[0])]
    cells += [nbformat.v4.new_code_cell(SNIPPETS[1 + i % (len(SNIPPETS) - 1)]) for i in range(blocks - 1)]
    return nbformat.v4.new_notebook(cells=cells)


def time_vault_runner(note_text: str, folder: Path) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / ".obsidian").mkdir(parents=True)
    note = folder / "bench.md"
    note.write_text(note_text, encoding="utf-8")
    started = time.perf_counter()
    report = Engine(load_vault(folder)).run_note(note)
    elapsed = time.perf_counter() - started
    assert report.written and not report.failed, report
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    nb = small_notebook(args.blocks)
    note_text = notebook_to_note(nb)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            ours.append(time_vault_runner(note_text, Path(tmp) / "vault"))
            theirs.append(run_nbclient(nb, Path(tmp))[1])
    mine, peer = statistics.median(ours), statistics.median(theirs)
    print(f"blocks: {args.blocks}, runs each: {args.repeat}")
    print(
        f"vault_runner render (fresh kernel, run, render, write): median {mine:.3f} s  runs {[round(t, 3) for t in ours]}"
    )
    print(
        f"nbclient execute    (fresh kernel, run):                median {peer:.3f} s  runs {[round(t, 3) for t in theirs]}"
    )
    print(f"ratio vault_runner / nbclient: {mine / peer:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
