"""What the name supervisor (vault_runner/kernel/sandbox/name_supervisor.py) costs a note.

    python benchmarks/name_supervisor.py [--files 3000] [--seconds 2]

Each kernel call that makes a name (open with O_CREAT, mkdir, rename, link, symlink, bind)
goes to the supervisor, which makes it and answers; every other call (read, write, stat,
open without O_CREAT) runs as before. Measured in the same run, through the real launcher
(launch.py), on one folder:

- none:       plain Python, no filter
- hardening:  the hardening filter only (what every sandboxed kernel had before)
- supervised: the hardening filter and the name supervisor (what it has now)

for three workloads: N files written (open "w", write, close), N folders made and removed,
N files read back (no name made: the filter's cost only). Then how often a signal handler
that fires at a given rate turns an `os.mkdir` into InterruptedError: a signal that comes
after the call is queued and before the supervisor has taken it interrupts it (Python
retries `open` by itself, not `mkdir`; once taken, WAIT_KILLABLE_RECV keeps it).

Prints the median of 3 runs per cell (microseconds per operation) and the ratio to `none`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "vault_runner" / "kernel" / "sandbox" / "launch.py"
sys.path.insert(0, str(ROOT))

from vault_runner.kernel.sandbox.protected import names_spec, names_supervised  # noqa: E402

WORK = """
import json, os, signal, sys, time
folder, n, seconds, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
os.chdir(folder)
out = {}
if rate == 0:
    t = time.perf_counter()
    for i in range(n):
        with open(f"f{i}", "w") as handle:
            handle.write("x")
    out["write"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for i in range(n):
        os.mkdir(f"d{i}")
        os.rmdir(f"d{i}")
    out["mkdir+rmdir"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for i in range(n):
        with open(f"f{i}") as handle:
            handle.read()
    out["read"] = (time.perf_counter() - t) / n
else:
    signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 1 / rate, 1 / rate)
    done = interrupted = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.mkdir("k")
            os.rmdir("k")
            done += 1
        except InterruptedError:
            interrupted += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    out["interrupted"] = interrupted / max(1, done + interrupted)
print(json.dumps(out))
"""


def run(kind: str, args: list[str], where: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(dir=where) as folder:
        spec = {"none": None, "hardening": {"harden": True}}.get(
            kind, {"harden": True, "names": names_spec(Path(folder))}
        )
        command = [sys.executable, "-I", "-c", WORK, folder, *args]
        if spec is not None:
            command = [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec), "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--dir", default=None, help="where the files go (default: the temp folder; /dev/shm: no disk)")
    options = parser.parse_args()
    if not names_supervised():
        sys.exit("no name supervisor on this machine (seccomp user notification): nothing to measure")
    kinds = ("none", "hardening", "supervised")
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    for _ in range(3):  # interleaved: machine noise hits every kind alike
        for kind in kinds:
            for key, value in run(kind, [str(options.files), "0", "0"], options.dir).items():
                samples[kind].setdefault(key, []).append(value)
    print(
        f"{options.files} operations each in {options.dir or tempfile.gettempdir()}; median of 3 runs, microseconds per operation"
    )
    print(f"{'workload':<14}" + "".join(f"{k:>13}" for k in kinds) + f"{'ratio':>10}")
    for key in samples["none"]:
        medians = [statistics.median(samples[k][key]) * 1e6 for k in kinds]
        print(f"{key:<14}" + "".join(f"{m:>13.1f}" for m in medians) + f"{medians[2] / medians[0]:>9.1f}x")
    print(f"\nos.mkdir interrupted by a signal handler ({options.seconds:g} s each, supervised)")
    for rate in (10, 1000, 10000):
        share = run("supervised", ["0", str(options.seconds), str(rate)], options.dir)["interrupted"]
        print(f"  SIGALRM at {rate:>6} Hz: {share:.2%} of calls raised InterruptedError")


if __name__ == "__main__":
    main()
