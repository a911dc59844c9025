"""Batch render with forked kernels vs nbclient, and one cold run of the 80-block note (issue 12).

    python benchmarks/fork_batch.py [--notes 50] [--jobs 1,2] [--blocks 80] [--repeat 1] [--only b|c]

(b) A generated vault of `--notes` small torch notes (three blocks each), rendered the way
    `vault-runner render --all -j N` does (one Engine per note, N at a time), with the fork
    factory (a fresh one per batch: the template's start is part of the time) and, as the
    peer, nbclient executing the same notes as notebooks, N at a time, in the same run.
(c) The 80-block note of render_vs_nbclient.py, one cold run each: a fresh fork factory
    (template start included), a kernel started the normal way, and nbclient.

Prints wall times and ratios (nbclient / vault_runner for (b), target >= 10x;
vault_runner / nbclient for (c), target <= 1.0). Runs alternate so noise hits both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _notebooks import notebook_to_note, run_nbclient  # noqa: E402
from render_vs_nbclient import small_notebook  # noqa: E402

from vault_runner.disk.vault import load_vault  # noqa: E402
from vault_runner.engine import Engine  # noqa: E402
from vault_runner.kernel.factory import started_kernel_factory  # noqa: E402
from vault_runner.kernel.fork.factory import ForkFactory  # noqa: E402


def torch_notebook(index: int) -> nbformat.NotebookNode:
    """A small study note: a tensor, an operation, a printed result."""
    cells = [
        nbformat.v4.new_markdown_cell(f"# Nota {index}\nUn ejemplo pequeño."),
        nbformat.v4.new_code_cell(f"import torch\nx = torch.arange({4 + index % 5}.)\nx"),
        nbformat.v4.new_code_cell("y = (x * 2).reshape(-1, 1) @ x.reshape(1, -1)\ny.sum().item()"),
        nbformat.v4.new_code_cell("print(torch.softmax(x, dim=0).argmax().item())"),
    ]
    return nbformat.v4.new_notebook(cells=cells)


def make_vault(root: Path, books: list[nbformat.NotebookNode]) -> list[Path]:
    shutil.rmtree(root, ignore_errors=True)
    (root / ".obsidian").mkdir(parents=True)
    paths = []
    for index, nb in enumerate(books):
        path = root / f"tema{index % 5}" / f"nota {index:03d}.md"
        path.parent.mkdir(exist_ok=True)
        path.write_text(notebook_to_note(nb), encoding="utf-8")
        paths.append(path)
    return paths


def render_batch(root: Path, paths: list[Path], jobs: int, factory: Callable[..., object]) -> float:
    """What `render --all -j N` does: an Engine per note, N notes at a time."""
    vault = load_vault(root)

    def one(path: Path) -> None:
        report = Engine(vault, kernel_factory=factory).run_note(path, require_opt_in=False)  # type: ignore[arg-type]
        assert report.written and not report.failed, report

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - started


def nbclient_batch(books: list[nbformat.NotebookNode], cwd: Path, jobs: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda nb: run_nbclient(nb, cwd), books))
    return time.perf_counter() - started


def bench_batch(tmp: Path, notes: int, jobs_list: list[int], repeat: int) -> None:
    books = [torch_notebook(i) for i in range(notes)]
    print(f"(b) batch of {notes} small torch notes ({len(books[0].cells) - 1} blocks each), {os.cpu_count()} CPUs")
    for jobs in jobs_list:
        ours, peer = [], []
        for _ in range(repeat):
            paths = make_vault(tmp / "batch", books)
            factory = ForkFactory(spares=max(1, jobs))
            try:
                ours.append(render_batch(tmp / "batch", paths, jobs, factory))
            finally:
                factory.close()
            peer.append(nbclient_batch(books, tmp, jobs))
        mine, theirs = statistics.median(ours), statistics.median(peer)
        print(
            f"  -j {jobs}: vault_runner render (forked, template start included) {mine:7.2f} s "
            f"({mine / notes * 1000:.0f} ms/note)   nbclient {theirs:7.2f} s ({theirs / notes * 1000:.0f} ms/note)"
            f"   nbclient / vault_runner: {theirs / mine:5.1f}x (target >= 10x)"
        )


def run_once(note_text: str, folder: Path, factory: Callable[..., object]) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / ".obsidian").mkdir(parents=True)
    note = folder / "bench.md"
    note.write_text(note_text, encoding="utf-8")
    started = time.perf_counter()
    report = Engine(load_vault(folder), kernel_factory=factory).run_note(note)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    assert report.written and not report.failed, report
    return elapsed


def bench_cold(tmp: Path, blocks: int, repeat: int) -> None:
    nb = small_notebook(blocks)
    note_text = notebook_to_note(nb)
    times: dict[str, list[float]] = {
        "forked, cold template": [],
        "forked, warm template": [],
        "started": [],
        "nbclient": [],
    }
    for _ in range(repeat):
        factory = ForkFactory()
        try:
            times["forked, cold template"].append(run_once(note_text, tmp / "cold", factory))
            time.sleep(1.0)  # its spare is initialised: the next run is the warm case
            times["forked, warm template"].append(run_once(note_text, tmp / "cold", factory))
        finally:
            factory.close()
        times["started"].append(run_once(note_text, tmp / "cold", started_kernel_factory))
        times["nbclient"].append(run_nbclient(nb, tmp)[1])
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"(c) one run of the {blocks}-block note (fresh kernel, run, render, write), runs each: {repeat}")
    for name, median in medians.items():
        print(f"  {name:<22} median {median:6.2f} s   runs {[round(t, 2) for t in times[name]]}")
    for name in ("forked, cold template", "forked, warm template", "started"):
        print(f"  {name} / nbclient: {medians[name] / medians['nbclient']:.2f} (target <= 1.0 cold)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notes", type=int, default=50)
    parser.add_argument("--jobs", default="1,2", help="comma-separated -j values for (b)")
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", choices=["b", "c"])
    args = parser.parse_args()
    try:
        load = os.getloadavg()
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.only in (None, "b"):
            bench_batch(tmp, args.notes, [int(j) for j in args.jobs.split(",")], args.repeat)
        if args.only in (None, "c"):
            bench_cold(tmp, args.blocks, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
