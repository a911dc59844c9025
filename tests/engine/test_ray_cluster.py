"""`--executor ray` on a cluster of two nodes (ray.cluster_utils.Cluster, one for this module):
notes spread over the nodes, a vault on a shared filesystem under another path, GPUs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.frontends.cli.main import main

ray = pytest.importorskip("ray", reason="needs Ray: pip install -e '.[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = pytest.mark.kernel


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


GPUS = _cuda_devices()


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[object]:
    """A head and a second node, one CPU each (and this machine's GPUs on the second)."""
    cluster = cluster_utils.Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=2 if GPUS else 1, num_gpus=GPUS)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


SLEEPY = """
---
vault-runner: true
---
```python
import time
time.sleep(3)
print(open("datos.csv").read().strip())
```
"""


def test_notes_spread_over_the_nodes_and_each_report_names_its_node(
    two_nodes: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    notes = {f"Curso/{i}.md": SLEEPY for i in range(4)}
    vault = make_note_vault(tmp_path / "v", {**notes, "Curso/datos.csv": "x,y\n1,2\n"})
    assert main(["render", str(vault), "--executor", "ray", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["notes"]
    assert [n["status"] for n in report] == ["ran"] * 4
    assert len({n["node"] for n in report}) == 2
    assert all("x,y\n1,2" in (vault / name).read_text() for name in notes)


WRITER = """
---
vault-runner: true
---
```python
open("salida.txt", "w").write("escrito")
print(open("../datos/entrada.csv").read().strip())
```
"""


def test_a_vault_on_a_shared_filesystem_is_read_where_the_path_map_says(
    two_nodes: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vault = make_note_vault(
        tmp_path / "aqui" / "v", {"Curso/nota.md": WRITER, "datos/entrada.csv": "a,b\n3,4\n"}, app={}
    )
    (tmp_path / "alla").symlink_to(tmp_path / "aqui")  # the same files, under the workers' path
    shipped = make_note_vault(tmp_path / "ship" / "v", {"Curso/nota.md": WRITER, "datos/entrada.csv": "a,b\n3,4\n"})
    path_map = f"{tmp_path / 'aqui'}={tmp_path / 'alla'}"
    assert main(["render", str(vault), "--executor", "ray", "--ray-path-map", path_map]) == 0
    assert main(["render", str(shipped), "--executor", "ray"]) == 0
    written = (vault / "Curso" / "nota.md").read_bytes()
    assert b"a,b\n3,4" in written
    assert written == (shipped / "Curso" / "nota.md").read_bytes()  # both modes, the same note
    assert not (vault / "Curso" / "salida.txt").exists()  # the kernel wrote in its scratch copy
    assert sorted(p.name for p in vault.rglob("*") if p.is_file()) == ["app.json", "entrada.csv", "nota.md"]


def test_a_shared_vault_the_workers_cannot_see_fails_its_notes_saying_what_to_fix(
    two_nodes: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vault = make_note_vault(tmp_path / "v", {"nota.md": WRITER})
    assert main(["render", str(vault), "--executor", "ray", "--ray-path-map", f"{tmp_path}=/no/such/place"]) == 1
    err = capsys.readouterr().err
    assert "nota.md: could not run on its Ray worker: /no/such/place/v: is not a folder on this Ray worker" in err
    assert "--ray-path-map" in err
    assert "vault-runner:output" not in (vault / "nota.md").read_text()


ON_GPU = """
---
vault-runner: true
execute:
  device: cuda
---
```python
import time, torch
print(torch.cuda.get_device_properties(DEVICE).uuid)
time.sleep(5)  # hold the GPU while the other note starts
```
"""
ANYWHERE = """
---
vault-runner: true
---
```python
import torch
print("cuda" if torch.cuda.is_available() else "no gpu")
```
"""


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason=f"needs a node with 2 CUDA GPUs; this machine has {GPUS}")
def test_two_cuda_notes_on_a_two_gpu_node_get_different_gpus(
    two_nodes: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vault = make_note_vault(tmp_path / "v", {"a.md": ON_GPU, "b.md": ON_GPU})
    assert main(["render", str(vault), "--executor", "ray", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["notes"]
    assert [n["device"] for n in report] == ["cuda", "cuda"]
    uuids = {re.search(r"GPU-[0-9a-f-]+|[0-9a-f-]{36}", (vault / n).read_text()).group(0) for n in ("a.md", "b.md")}
    assert len(uuids) == 2


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_a_cuda_note_gets_a_gpu_and_a_note_that_reserved_none_sees_none(
    two_nodes: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vault = make_note_vault(tmp_path / "v", {"gpu.md": ON_GPU, "cpu.md": ANYWHERE})
    assert main(["render", str(vault), "--executor", "ray", "--json"]) == 0
    report = {n["note"]: n for n in json.loads(capsys.readouterr().out)["notes"]}
    assert report["gpu.md"]["device"] == "cuda"
    assert report["cpu.md"]["device"] == "cpu"
    assert "no gpu" in (vault / "cpu.md").read_text()
