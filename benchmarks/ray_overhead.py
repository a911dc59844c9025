"""What Ray adds per note: a generated vault rendered locally (-j 2) and on a two-node local Ray cluster.

    python benchmarks/ray_overhead.py [--notes 50]

Needs the extra (`pip install 'vault-runner[ray]'`). Both sides run two notes at a time (the
cluster's two nodes have one CPU each), one fresh kernel per note, and write every note; the
Ray side also ships the vault, starts a task per note and sends the outputs back. Prints the
wall time of each run, the per-note difference (Ray minus local, over the notes) and the
ratio. The cluster's start is timed apart: it is paid once per command, not per note.
Runs: local, Ray with fresh workers (they import vault_runner), Ray again (workers warm), local.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vault_runner.frontends.cli.main import main as cli  # noqa: E402

NOTE = """---
vault-runner: true
---
# Nota {i}

```python
x = {i}
print(x * 3)
```

```python
[x + k for k in range(3)]
```
"""


def make_vault(root: Path, notes: int) -> Path:
    (root / ".obsidian").mkdir(parents=True)
    (root / ".obsidian" / "app.json").write_text("{}", encoding="utf-8")
    for i in range(notes):
        folder = root / f"Capítulo {i // 10}"
        folder.mkdir(exist_ok=True)
        (folder / f"Nota {i:03d}.md").write_text(NOTE.format(i=i), encoding="utf-8")
    return root


def render(root: Path, *args: str) -> tuple[float, list[dict]]:
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = cli(["render", str(root), "--json", *args])
    elapsed = time.perf_counter() - started
    notes = json.loads(out.getvalue())["notes"]
    assert code == 0 and all(n["written"] for n in notes), notes
    return elapsed, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notes", type=int, default=50)
    args = parser.parse_args()
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        print("needs Ray: pip install 'vault-runner[ray]'", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        vaults = [make_vault(base / name, args.notes) for name in ("local1", "ray1", "ray2", "local2")]
        local1, _ = render(vaults[0], "-j", "2")
        started = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
            startup = time.perf_counter() - started
            cold, notes = render(vaults[1], "--executor", "ray")
            warm, _ = render(vaults[2], "--executor", "ray")
        finally:
            ray.shutdown()
            cluster.shutdown()
        local2, _ = render(vaults[3], "-j", "2")
        same = all(vaults[0].joinpath(p).read_bytes() == vaults[2].joinpath(p).read_bytes() for p in _notes(vaults[0]))
    local = statistics.mean([local1, local2])
    n = args.notes
    print(f"{n} notes of 2 small blocks; two at a time on each side")
    print(
        f"local -j 2:                 {local1:.2f} s, {local2:.2f} s (mean {local:.2f} s, {local / n * 1000:.0f} ms/note)"
    )
    print(f"Ray cluster start (2 nodes): {startup:.2f} s (once per command)")
    print(f"Ray, fresh workers:         {cold:.2f} s ({(cold - local) / n * 1000:+.0f} ms/note vs local)")
    print(f"Ray, warm workers:          {warm:.2f} s ({(warm - local) / n * 1000:+.0f} ms/note vs local)")
    print(f"ratio Ray (warm) / local: {warm / local:.2f}; nodes used: {len({x['node'] for x in notes})}")
    print(f"notes byte-identical to the local render: {same}")
    return 0


def _notes(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in sorted(root.rglob("*.md"))]


if __name__ == "__main__":
    sys.exit(main())
