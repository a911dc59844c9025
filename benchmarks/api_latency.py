"""Request-to-output latency of a one-line block through the plugin API, next to Jupyter's own.

    python benchmarks/api_latency.py [--runs 200] [--fresh-runs 10] [--json]

Starts `vault-runner serve` (a subprocess, as the plugin sees it) on a tmp vault whose note
has one block, `print("hi")`, warms the note's kernel with one run, then times `runs`
POST /api/v1/run-block requests on that warm note (the block runs every time; the
response carries its output, after the write-back). It also times, from the same request
start, the arrival of the block's `output` event on the SSE stream.

The peers, measured in the same run on the same machine:
- jupyter_client on a warm kernel: execute_request -> the stream output, and -> idle
  (no HTTP, no note, no sandbox: the floor under any warm-kernel front end);
- nbclient, fresh each time: a one-cell notebook executed from scratch (kernel start
  included), which is what running a note costs without a warm kernel.
Target (issue 5): p50 of the API under 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

NOTE = '---\nvault-runner: true\n---\n# Latency\n\n```python\nprint("hi")\n```\n'


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {
        "n": len(ordered),
        "p50_ms": round(at(0.50) * 1000, 2),
        "p95_ms": round(at(0.95) * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
        "min_ms": round(ordered[0] * 1000, 2),
    }


# -- through the API ------------------------------------------------------------------------
def _read_events(client: httpx.Client, arrivals: queue.Queue[tuple[float, str]], ready: threading.Event) -> None:
    try:
        with client.stream("GET", "/api/v1/events", params={"note": "latency.md"}) as response:
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    if kind == "ready":
                        ready.set()
                    elif kind in ("output", "closing"):
                        arrivals.put((time.perf_counter(), kind))
                        if kind == "closing":
                            return
    except httpx.HTTPError:
        pass


def measure_api(runs: int, kernels_env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        root = base / "vault"
        (root / ".obsidian").mkdir(parents=True)
        (root / ".obsidian" / "app.json").write_text("{}", encoding="utf-8")
        (root / "latency.md").write_text(NOTE, encoding="utf-8")
        env = {**os.environ, **kernels_env, "VAULT_RUNNER_CONFIG_DIR": str(base / "config")}
        subprocess.run([sys.executable, "-m", "vault_runner", "trust", str(root)], env=env, check=True,
                       capture_output=True)  # fmt: skip
        server = subprocess.Popen(
            [sys.executable, "-m", "vault_runner", "serve", str(root), "--port", "0", "--no-watch",
             "--warm", "0", "--kernels", "1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            info = json.loads(server.stdout.readline())
            token = Path(info["token_file"]).read_text(encoding="ascii").strip()
            headers = {"Authorization": f"Bearer {token}"}
            with (
                httpx.Client(base_url=info["url"], headers=headers, timeout=120) as client,
                httpx.Client(base_url=info["url"], headers=headers, timeout=None) as stream_client,
            ):
                arrivals: queue.Queue[tuple[float, str]] = queue.Queue()
                ready = threading.Event()
                reader = threading.Thread(target=_read_events, args=(stream_client, arrivals, ready), daemon=True)
                reader.start()
                ready.wait(60)
                cold_start = time.perf_counter()
                warm_up = client.post("/api/v1/run", json={"note": "latency.md"})
                cold = time.perf_counter() - cold_start
                assert warm_up.status_code == 200 and warm_up.json()["report"]["blocks"][0]["status"] == "ok", (
                    warm_up.text
                )
                while not arrivals.empty():
                    arrivals.get()
                response_times: list[float] = []
                event_times: list[float] = []
                for _ in range(runs):
                    started = time.perf_counter()
                    response = client.post("/api/v1/run-block", json={"note": "latency.md", "index": 0})
                    answered = time.perf_counter()
                    block = response.json()["report"]["blocks"][0]
                    text = "".join(o.get("text", "") for o in block["outputs"] if o["type"] == "stream")
                    assert text == "hi\n", response.text  # one or more stream chunks, as Jupyter sends them
                    response_times.append(answered - started)
                    arrived, _kind = arrivals.get(timeout=60)
                    event_times.append(arrived - started)
                    while not arrivals.empty():
                        arrivals.get()
                status = client.get("/api/v1/status").json()
        finally:
            server.terminate()
            server.wait(60)
            if server.stdout is not None:
                server.stdout.close()
    return {
        "response": percentiles(response_times),
        "output_event": percentiles(event_times),
        "first_run_with_kernel_start_s": round(cold, 3),
        "sandbox": (status.get("sandbox") or {}).get("tier"),
    }


# -- the peers ------------------------------------------------------------------------------
def measure_jupyter_client(runs: int) -> dict[str, Any]:
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(stderr=subprocess.DEVNULL)  # its start-up warnings are not the benchmark's output
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        to_output: list[float] = []
        to_idle: list[float] = []
        for attempt in range(runs + 5):
            started = time.perf_counter()
            msg_id = client.execute('print("hi")')
            output_at = idle_at = None
            while idle_at is None:
                message = client.get_iopub_msg(timeout=60)
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                kind = message["msg_type"]
                if kind == "stream" and output_at is None:
                    output_at = time.perf_counter()
                elif kind == "status" and message["content"]["execution_state"] == "idle":
                    idle_at = time.perf_counter()
            client.get_shell_msg(timeout=60)
            if attempt >= 5 and output_at is not None:  # the first few warm the kernel up
                to_output.append(output_at - started)
                to_idle.append(idle_at - started)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return {"to_output": percentiles(to_output), "to_idle": percentiles(to_idle)}


def measure_nbclient_fresh(runs: int) -> dict[str, Any]:
    import nbformat
    from nbclient import NotebookClient

    times: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(runs):
            nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('print("hi")')])
            started = time.perf_counter()
            NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
            times.append(time.perf_counter() - started)
            assert nb.cells[0].outputs[0]["text"] == "hi\n"
    return {"fresh": percentiles(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="timed requests on the warm note (default 200)")
    parser.add_argument("--fresh-runs", type=int, default=10, help="fresh nbclient runs (default 10)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    results = {
        "api": measure_api(args.runs, {}),
        "jupyter_client_warm": measure_jupyter_client(args.runs),
        "nbclient_fresh": measure_nbclient_fresh(args.fresh_runs),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    api, warm, fresh = results["api"], results["jupyter_client_warm"], results["nbclient_fresh"]
    rows = [
        ("API run-block -> response (outputs written)", api["response"]),
        ("API run-block -> `output` SSE event", api["output_event"]),
        ("jupyter_client warm kernel -> stream output", warm["to_output"]),
        ("jupyter_client warm kernel -> idle", warm["to_idle"]),
        ("nbclient fresh kernel, one cell", fresh["fresh"]),
    ]
    print(f'one-line block `print("hi")`, {results["cpus"]} CPU(s), API kernel sandbox: {api["sandbox"]}')
    print(f"{'path':48} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'mean ms':>9}")
    for name, row in rows:
        print(f"{name:48} {row['n']:>5} {row['p50_ms']:>9.2f} {row['p95_ms']:>9.2f} {row['mean_ms']:>9.2f}")
    print(f"first API run of the note (kernel start included): {api['first_run_with_kernel_start_s']:.2f} s")
    verdict = "met" if api["response"]["p50_ms"] < 50 else "NOT met"
    print(f"target p50 < 50 ms through the API: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
