"""Does a note give, block by block, the same text outputs as Jupyter (nbclient) gives its notebook?

    python benchmarks/parity_nbclient.py NOTEBOOK.ipynb [--ignore-cell N ...]

Makes a note from the notebook (cells as python fences, markdown as text), runs it with
vault_runner and the notebook with nbclient on this machine, and prints every block whose
text output (streams, text/plain results, error name and message) differs. Cells whose
output is not deterministic (random numbers without a seed, timings) differ by nature:
run twice to tell them apart. Exit status 1 when a block differs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _notebooks import code_cells, notebook_to_note, run_nbclient, text_outputs  # noqa: E402

from vault_runner.disk.vault import load_vault  # noqa: E402
from vault_runner.engine import Engine, load  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    args = parser.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / ".obsidian").mkdir()
        note = root / (args.notebook.stem + ".md")
        note.write_text(notebook_to_note(nb), encoding="utf-8")
        vault = load_vault(root)
        run = Engine(vault).execute(load(vault, note))
        ours = [b for b in run.report.blocks]
        theirs, _ = run_nbclient(nb, root)
    cells = code_cells(theirs)
    if len(cells) != len(ours):
        print(f"block count differs: note has {len(ours)}, notebook has {len(cells)}")
        return 1
    differing = 0
    for number, (block, cell) in enumerate(zip(ours, cells, strict=True), 1):
        mine, jupyter = text_outputs(block.outputs), text_outputs(cell.outputs)
        if mine != jupyter:
            differing += 1
            print(
                f"block {number} (note line {block.line}) differs:\n  vault_runner: {mine!r}\n  nbclient:     {jupyter!r}"
            )
    print(f"{len(ours)} blocks compared, {len(ours) - differing} same, {differing} different")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
