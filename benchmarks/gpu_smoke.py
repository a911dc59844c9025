"""GPU smoke test: render sample_vault on CUDA and check the GPU limits hold.

    python benchmarks/gpu_smoke.py

Needs only the repository (`pip install -e .`). On a machine without CUDA it prints
"no CUDA device: skipped" and exits 0. Otherwise it runs, each through `vault-runner` in a
subprocess (the sandbox included, as a user would):

  1. `doctor` (device, sandbox tier, limits);
  2. a render of a copy of sample_vault with `device: cuda`: every block ok, on cuda;
  3. a note that asserts DEVICE is cuda and a tensor lands there; the JSON report must carry
     the device and the block's peak GPU memory;
  4. `gpu-memory-fraction: 0.1`: 5% of the GPU fits, 30% gets an OutOfMemoryError callout;
  5. `timeout: 3` while the GPU is busy: a loop of large matmuls (interrupted), and a CUDA
     kernel spinning behind torch.cuda.synchronize() (the interrupt cannot land: killed and
     restarted); both end within the timeout plus a few seconds;

and prints one plain line per check, the device name, timings and peak memory. It exits 1
when a check fails. `--cpu` runs the same machinery on the CPU (CUDA-only checks skipped),
to try the script itself on a machine without a GPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_VAULT = REPO / "sample_vault"
TIMEOUT_SLACK = 15.0  # seconds past a block's timeout that still count as "held" (restart included)
failures: list[str] = []
DEVICE = "cuda"  # "cpu" with --cpu: a dry run of the script itself


def say(line: str) -> None:
    print(line, flush=True)


def check(ok: bool, what: str, detail: str = "") -> bool:
    say(f"{'PASS' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
    if not ok:
        failures.append(what)
    return ok


def vault_runner(*args: str, timeout: float = 900) -> tuple[int, str, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vault_runner", *args], capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def run_json(*args: str) -> tuple[int, dict, float, str]:
    code, out, err, seconds = vault_runner(*args, "--json")
    try:
        report = json.loads(out)
    except ValueError:
        report = {"notes": []}
    return code, report, seconds, err


def blocks_of(report: dict) -> list[dict]:
    return [b for n in report.get("notes", []) for b in n.get("blocks", [])]


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def write_note(folder: Path, name: str, options: str, *blocks: str) -> Path:
    body = "\n\n".join(f"```python\n{textwrap.dedent(b).strip()}\n```" for b in blocks)
    path = folder / f"{name}.md"
    path.write_text(f"---\nvault-runner: true\nexecute:\n{textwrap.indent(options.strip(), '  ')}\n---\n\n{body}\n")
    return path


def main(argv: list[str]) -> int:
    global DEVICE
    try:
        import torch
    except ImportError as exc:
        say(f"torch is not importable ({exc}): skipped")
        return 0
    if "--cpu" in argv:
        DEVICE = "cpu"
        say("device: cpu (--cpu dry run: CUDA-only checks are skipped)")
    elif not torch.cuda.is_available():
        say("no CUDA device: skipped")
        return 0
    else:
        props = torch.cuda.get_device_properties(0)
        say(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} GPU(s)")
    say(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")

    code, out, err, seconds = vault_runner("doctor")
    for line in out.splitlines():
        if line.split("  ")[0].strip() in {"sandbox tier", "devices", "memory cap", "process+thread cap", "warning"}:
            say(f"doctor: {' '.join(line.split())}")
    check(code == 0, "doctor runs", f"{seconds:.1f} s")

    work = Path(tempfile.mkdtemp(prefix="vr-gpu-smoke-"))
    try:
        vault = work / "vault"
        shutil.copytree(SAMPLE_VAULT, vault)
        config = vault / "vault-runner.toml"
        text = config.read_text(encoding="utf-8")
        config.write_text(re.sub(r"(?m)^device\s*=.*$", f'device = "{DEVICE}"', text), encoding="utf-8")
        folder = vault / "GPU"
        folder.mkdir()
        if "--only-fraction" in argv:  # a rerun of that one check, to spare device time
            memory_fraction(folder)
            return 1 if failures else 0
        render(vault)
        tensors_on_cuda(folder)
        if DEVICE == "cuda":
            memory_fraction(folder)
        else:
            say("SKIP gpu-memory-fraction (cpu dry run)")
        timeout_while_busy(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"{'FAILED: ' + ', '.join(failures) if failures else 'all GPU checks passed'}")
    return 1 if failures else 0


def render(vault: Path) -> None:
    code, report, seconds, err = run_json("render", "--force", str(vault))
    blocks = blocks_of(report)
    ran = [b for b in blocks if b["status"] not in {"not-run", "skipped"}]
    bad = [f"{b['note']}:{b['line']} {b['status']}" for b in ran if b["status"] not in {"ok", "raised"}]
    off_gpu = [
        f"{b['note']}:{b['line']} on {b['device']}" for b in ran if not str(b.get("device", "")).startswith(DEVICE)
    ]
    for note in report.get("notes", []):
        peak = max((b.get("gpu_peak_bytes") or 0 for b in note.get("blocks", [])), default=0)
        say(
            f"  {note['note']}: {len(note.get('blocks', []))} blocks, {note.get('duration', 0):.2f} s, peak {mib(peak)}"
        )
    check(code == 0 and bool(ran) and not bad, f"render sample_vault on {DEVICE}", f"{len(ran)} blocks in {seconds:.1f} s"
          + (f"; failed: {bad}; {err.strip()[-300:]}" if bad or code else ""))  # fmt: skip
    check(not off_gpu and bool(ran), f"every sample block ran on {DEVICE}", ", ".join(off_gpu[:5]))


def tensors_on_cuda(folder: Path) -> None:
    note = write_note(
        folder,
        "Tensores en cuda",
        f"device: {DEVICE}\ntimeout: 120",
        f"""
        import torch
        assert DEVICE.type == "{DEVICE}", DEVICE
        assert torch.ones(1, device=DEVICE).is_cuda == (DEVICE.type == "cuda")
        x = torch.randn(4096, 4096, device=DEVICE)
        y = (x @ x).sum().item()
        print("on", torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu")
        """,
    )
    code, report, seconds, err = run_json("run", str(note))
    blocks = blocks_of(report)
    ok = code == 0 and [b["status"] for b in blocks] == ["ok"]
    check(ok, f"tensors land on {DEVICE}", f"{seconds:.1f} s" + ("" if ok else f"; {blocks or err.strip()[-300:]}"))
    if blocks:
        block = blocks[0]
        peak = block.get("gpu_peak_bytes")
        check(str(block.get("device", "")).startswith(DEVICE), "JSON report gives the device", str(block.get("device")))
        if DEVICE == "cuda":
            check(
                isinstance(peak, int) and peak >= 2 * 4096 * 4096 * 4,
                "JSON report gives the peak GPU memory",
                mib(peak),
            )


def memory_fraction(folder: Path) -> None:
    note = write_note(
        folder,
        "Fraccion de memoria",
        "device: cuda\ngpu-memory-fraction: 0.1\ntimeout: 120",
        """
        import torch
        total = torch.cuda.get_device_properties(DEVICE).total_memory
        small = torch.empty(int(total * 0.05), dtype=torch.uint8, device=DEVICE)
        print("5% fits")
        """,
        """
        big = torch.empty(int(total * 0.3), dtype=torch.uint8, device=DEVICE)
        print("30% fit: the fraction did not hold")
        """,
    )
    code, report, seconds, err = run_json("run", str(note))
    blocks = blocks_of(report)
    statuses = [b["status"] for b in blocks]
    errors = [o.get("ename") for b in blocks[1:] for o in b.get("outputs", []) if o.get("type") == "error"]
    text = note.read_text(encoding="utf-8")
    check(
        statuses == ["ok", "error"] and "OutOfMemoryError" in errors and "> [!failure] OutOfMemoryError" in text,
        "gpu-memory-fraction 0.1 refuses 30% of the GPU",
        f"{statuses} {errors} in {seconds:.1f} s {_messages(report)}",
    )


def _messages(report: dict) -> str:
    return "; ".join(n["message"] for n in report.get("notes", []) if n.get("message"))


def timeout_while_busy(folder: Path) -> None:
    cases = [
        (
            "Matmul sin fin",
            """
            import torch
            a = torch.randn(8192 if DEVICE.type == "cuda" else 1024, 8192 if DEVICE.type == "cuda" else 1024, device=DEVICE)
            while True:
                a = a @ a
                a = a / a.norm()
            """,
            False,
        ),
        (
            "Kernel CUDA ocupado",
            """
            import torch
            torch.cuda._sleep(100_000_000_000)  # spins the GPU for about a minute
            torch.cuda.synchronize()  # blocks in C: the interrupt cannot land
            """,
            True,
        ),
    ]
    if DEVICE != "cuda":  # the same shape on the CPU: a C call that ignores the interrupt
        cases[1] = ("Bucle C", 'import re\nre.match(r"(a*)*b", "a" * 40)', True)
    for name, code_text, restarted in cases:
        note = write_note(folder, name, f"device: {DEVICE}\ntimeout: 3", code_text, "print('after')")
        code, report, seconds, err = run_json("run", str(note))
        blocks = blocks_of(report)
        statuses = [b["status"] for b in blocks]
        first = blocks[0] if blocks else {}
        # Interrupted (the next block runs) or killed and restarted (the next block is skipped):
        # either way the block must end near its timeout. Which one happened is printed.
        expected = ["timeout", "skipped"] if restarted else ["timeout", "ok"]
        held = first.get("duration", 1e9) <= 3 + TIMEOUT_SLACK
        check(
            statuses in (["timeout", "ok"], ["timeout", "skipped"]) and held,
            f"timeout 3 s holds while the GPU is busy ({name})",
            f"statuses {statuses} (expected {expected}), block {first.get('duration', 0):.1f} s, run {seconds:.1f} s",
        )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
