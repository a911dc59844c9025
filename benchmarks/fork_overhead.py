"""Per-note kernel overhead: a kernel forked from a warm template vs a started one vs nbclient.

    python benchmarks/fork_overhead.py [--runs 10] [--fork-runs 30] [--code pass]

One "note" = get a fresh kernel, run one block (`--code`, default `pass`), shut the kernel
down. Measured in the same run, interleaved so machine noise hits all of them:

- fork:        KernelTemplate.fork + BlockingKernelClient + forkserver.wait_for_ready +
               execute + shutdown (polite; `fork, bg shutdown`: the shutdown is handed to
               a thread, as a batch that goes on to the next note would)
- jupyter_client: KernelManager.start_kernel + client.wait_for_ready + execute +
               shutdown_kernel (what kernel.KernelSession does today)
- nbclient:    NotebookClient.execute of a one-cell notebook
- engine, forked: what `vault-runner run` does for a note of one block, in process:
               Engine.run_note (read, fresh kernel, setup, run, render, write) with the
               fork factory, its template warm and its spare kernel ready (the slow runs
               in between give it time to refill); `engine, forked, back to back`: notes
               one after another, so a spare is not always ready
- engine, started: the same with a kernel started the normal way (VAULT_RUNNER_FORK=0)

Prints the median of each, the fork template's start-up time, and ratios. Target
(issue 12): per-note overhead <= 50 ms with a warm template on a 2-core machine. With
--trace the forked children print their stage timings on stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vault_runner.disk.vault import load_vault  # noqa: E402
from vault_runner.engine import Engine  # noqa: E402
from vault_runner.kernel.factory import KernelFactory, started_kernel_factory  # noqa: E402
from vault_runner.kernel.fork import ForkFactory, KernelTemplate, fork_unavailable_reason, wait_for_ready  # noqa: E402


def run_forked(template: KernelTemplate, cwd: Path, code: str, background_shutdown: bool) -> float:
    started = time.perf_counter()
    kernel = template.fork(cwd, {"VAULT_RUNNER_NOTE": str(cwd / "note.md")})
    client = kernel.client()
    client.start_channels()
    try:
        wait_for_ready(client, 60, kernel.is_alive)
        reply = client.execute_interactive(code, timeout=60, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
        kernel.shutdown(wait=not background_shutdown)
    return time.perf_counter() - started


def run_jupyter_client(cwd: Path, code: str) -> float:
    started = time.perf_counter()
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=str(cwd), extra_arguments=["--HistoryManager.enabled=False"])
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive(code, timeout=60, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
    return time.perf_counter() - started


def run_nbclient(cwd: Path, code: str) -> float:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    started = time.perf_counter()
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return time.perf_counter() - started


def make_note(root: Path, code: str) -> Path:
    (root / ".obsidian").mkdir(parents=True, exist_ok=True)
    note = root / "notas" / "uno.md"
    note.parent.mkdir(exist_ok=True)
    note.write_text(f"---\nvault-runner: true\n---\n# Uno\n\n```python\n{code}\n```\n", encoding="utf-8")
    return note


def run_engine(root: Path, note: Path, factory: KernelFactory, expect: str) -> float:
    started = time.perf_counter()
    report = Engine(load_vault(root), kernel_factory=factory, force=True).run_note(note)
    elapsed = time.perf_counter() - started
    assert report.status == "ran" and not report.failed and report.kernel == expect, report
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of the started kernels (each takes seconds)")
    parser.add_argument("--fork-runs", type=int, default=30, help="runs of the forked kernel")
    parser.add_argument("--code", default="pass", help="the note's one block")
    parser.add_argument("--trace", action="store_true", help="stage timings of every fork on stderr")
    args = parser.parse_args()
    reason = fork_unavailable_reason()
    if reason is not None:
        print(f"fork is not available here: {reason}")
        return 1
    folder = Path(tempfile.mkdtemp(prefix="vr-fork-bench-"))
    env = {**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    if args.trace:
        env["VAULT_RUNNER_FORK_TRACE"] = "1"
    times: dict[str, list[float]] = {
        "fork": [],
        "fork, bg shutdown": [],
        "engine, forked": [],
        "engine, forked, back to back": [],
        "engine, started": [],
        "jupyter_client": [],
        "nbclient": [],
    }
    vault = folder / "vault"
    note = make_note(vault, args.code)
    factory = ForkFactory(spares=1)
    try:
        started = time.perf_counter()
        template = KernelTemplate(env=env, cwd=folder, runtime_dir=folder).start()
        template_start = time.perf_counter() - started
        run_engine(vault, note, factory, "forked")  # the factory's template starts (cold)
        with template:
            run_forked(template, folder, args.code, False)  # warm the parent side (imports, zmq context)
            per_slow = max(1, args.fork_runs // max(1, args.runs))
            for index in range(max(args.runs, args.fork_runs)):
                for _ in range(per_slow if index < args.runs else 1):
                    if len(times["fork"]) < args.fork_runs:
                        times["fork"].append(run_forked(template, folder, args.code, False))
                        times["fork, bg shutdown"].append(run_forked(template, folder, args.code, True))
                        time.sleep(0.3)  # the factory's spare is ready again
                        times["engine, forked"].append(run_engine(vault, note, factory, "forked"))
                if index < args.runs:
                    times["engine, started"].append(run_engine(vault, note, started_kernel_factory, "started"))
                    times["jupyter_client"].append(run_jupyter_client(folder, args.code))
                    times["nbclient"].append(run_nbclient(folder, args.code))
                if index >= args.runs and len(times["fork"]) >= args.fork_runs:
                    break
            for _ in range(args.fork_runs):
                times["engine, forked, back to back"].append(run_engine(vault, note, factory, "forked"))
            time.sleep(0.5)  # background shutdowns finish before the template closes
    finally:
        factory.close()
        shutil.rmtree(folder, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items() if values}
    load = os.getloadavg()
    print(f"per-note overhead (start a kernel, run {args.code!r}, shut it down), {os.cpu_count()} CPUs")
    print(f"  load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"  template start (once): {template_start * 1000:8.1f} ms  ({template.info.get('modules')} modules)")
    for name, median in medians.items():
        values = times[name]
        print(
            f"  {name:<18} median {median * 1000:8.1f} ms   min {min(values) * 1000:8.1f}   "
            f"max {max(values) * 1000:8.1f}   n={len(values)}"
        )
    for fast in ("fork", "fork, bg shutdown", "engine, forked", "engine, forked, back to back"):
        for slow in ("engine, started", "jupyter_client", "nbclient"):
            if fast in medians and slow in medians:
                print(f"  {slow} / {fast}: {medians[slow] / medians[fast]:6.1f}x")
    best = medians.get("engine, forked", 0)
    print(f"  target engine, forked <= 50 ms: {'met' if best <= 0.050 else 'not met'} ({best * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
