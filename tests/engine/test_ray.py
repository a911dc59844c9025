"""`render` and `test` with `--executor ray`, on a real local Ray instance (one for this module:
starting Ray costs seconds), against the same commands run locally."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_sample_vault, make_note_vault
from vault_runner.engine.ray_worker import SCRATCH_PREFIX
from vault_runner.frontends.cli.main import main

ray = pytest.importorskip("ray", reason="needs Ray: pip install -e '.[ray]'")

pytestmark = pytest.mark.kernel

# %%time prints how long the block took: the one thing of sample_vault that differs run to run.
TIMING = re.compile(r"^(CPU times|Wall time):.*$|sum=[0-9a-f]+", re.M)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray instance of two CPUs; the commands under test find it connected and use it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _without_timings(files: dict[str, bytes]) -> dict[str, str]:
    return {name: TIMING.sub("", data.decode("utf-8", "replace")) for name, data in files.items()}


def test_a_vault_rendered_on_ray_is_the_same_bytes_as_a_local_render(
    cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    here, there = copy_sample_vault(tmp_path / "here"), copy_sample_vault(tmp_path / "there")
    assert main(["render", str(here), "--force"]) == 0
    assert main(["render", str(there), "--force", "--executor", "ray", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    local, remote = _files(here), _files(there)
    timed = {name for name, data in local.items() if b"Wall time:" in data}
    assert timed == {"PyTorch/02 Operaciones con tensores.md"}
    assert {n: d for n, d in remote.items() if n not in timed} == {n: d for n, d in local.items() if n not in timed}
    assert _without_timings(remote) == _without_timings(local)
    ran = [n for n in report["notes"] if n["status"] == "ran"]
    assert ran and all(n["node"] for n in ran)  # the node each note ran on
    assert all("node" not in n for n in report["notes"] if n["status"] != "ran")


FAILING = {
    "Curso/ok.md": """
        ---
        vault-runner: true
        ---
        ```python
        print(open("datos.csv").read())
        ```
        ```python
        #| raises: KeyError
        {}["x"]
        ```
        """,
    "Curso/falla.md": """
        ---
        vault-runner: true
        ---
        ```python
        x = 1
        ```
        ```python
        def f():
            raise ValueError("no converge")
        f()
        ```
        """,
    "Curso/datos.csv": "x,y\n1,2\n",
}


def _junit(path: Path) -> str:
    return re.sub(r'(time|timestamp|hostname)="[^"]*"', "", path.read_text(encoding="utf-8"))


def test_test_on_ray_reports_the_same_findings_and_junit_xml_as_locally(
    cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vault = copy_sample_vault(tmp_path / "v")
    for slow in ("02 Operaciones con tensores", "03 Manipulación de tensores", "04 Regresión lineal"):
        (vault / "PyTorch" / f"{slow}.md").unlink()  # the rest of the sample vault is enough here
    for relative, text in FAILING.items():  # next to the sample notes, with its settings
        (vault / relative).parent.mkdir(exist_ok=True)
        (vault / relative).write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    before = _files(vault)
    assert main(["test", str(vault), "--junit-xml", str(tmp_path / "here.xml")]) == 1
    here = capsys.readouterr().out
    assert main(["test", str(vault), "--executor", "ray", "--junit-xml", str(tmp_path / "there.xml")]) == 1
    there = capsys.readouterr().out
    assert "Curso/falla.md:" in here and "ValueError: no converge" in here
    assert there == here  # the findings, line for line
    assert _junit(tmp_path / "there.xml") == _junit(tmp_path / "here.xml")
    assert _files(vault) == before  # test writes nothing, wherever it runs


def test_a_note_writing_beside_itself_on_a_worker_leaves_the_vault_alone(
    cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vault = make_note_vault(
        tmp_path / "v",
        {
            "Curso/escribe.md": """
                ---
                vault-runner: true
                ---
                ```python
                open("modelo.pt", "w").write("pesos")
                print(open("modelo.pt").read())
                ```
                """
        },
    )
    assert main(["render", str(vault), "--executor", "ray"]) == 0
    assert "pesos" in (vault / "Curso" / "escribe.md").read_text(encoding="utf-8")
    assert not (vault / "Curso" / "modelo.pt").exists()  # it was written in the worker's scratch copy


SLOW = """
---
vault-runner: true
---
```python
import time
time.sleep(300)
```
"""
QUICK = """
---
vault-runner: true
---
```python
print("hecho")
```
"""


def _ray_task_pid(title: str, timeout: float = 120.0) -> int:
    """The worker process running the task named `title` (Ray puts the name in its title)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            pid, _, args = line.strip().partition(" ")
            if args.strip() == f"ray::{title}":
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no Ray worker ran {title!r} within {timeout} s")


def _driver(cluster: str, *args: str) -> subprocess.Popen[bytes]:
    """`vault-runner ARGS --executor ray` in a process of its own, on this module's Ray instance:
    as a user runs it, connecting, printing and disconnecting by itself."""
    command = [sys.executable, "-m", "vault_runner", *args, "--executor", "ray", "--ray-address", cluster]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_killed_worker_fails_its_note_and_the_other_notes_finish(cluster: str, tmp_path: Path) -> None:
    vault = make_note_vault(tmp_path / "v", {"lenta.md": SLOW, "a.md": QUICK, "b.md": QUICK})
    driver = _driver(cluster, "render", str(vault), "--json")
    try:
        worker = _ray_task_pid("vault-runner: lenta.md")
        _wait_for(lambda: _kernels_of(worker), "the note's kernel to start")
        os.kill(worker, signal.SIGKILL)
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 1, err.decode()
    notes = {n["note"]: n for n in json.loads(out)["notes"]}  # stdout is the report alone
    assert notes["lenta.md"]["status"] == "failed"
    assert "lenta.md: the Ray worker running this note was lost mid-note" in notes["lenta.md"]["message"]
    assert [notes[n]["status"] for n in ("a.md", "b.md")] == ["ran", "ran"]
    assert "hecho" in (vault / "a.md").read_text() and "hecho" in (vault / "b.md").read_text()
    assert (vault / "lenta.md").read_text(encoding="utf-8") == SLOW.lstrip("\n")
    _wait_for(lambda: not _kernels_of(worker), "the killed worker's kernel to end")
    assert main(["render", str(make_note_vault(tmp_path / "w", {"c.md": QUICK})), "--executor", "ray"]) == 0
    assert not list(Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}{worker}-*"))  # its copy, removed


def _kernels_of(worker: int) -> list[int]:
    """The processes (kernels, a kernel template) working in the scratch copy of the Ray worker `worker`."""
    mark = f"{tempfile.gettempdir()}/{SCRATCH_PREFIX}{worker}-"
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd").startswith(mark) and _alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.2)


def test_ctrl_c_cancels_the_notes_still_running_on_the_cluster(cluster: str, tmp_path: Path) -> None:
    vault = make_note_vault(tmp_path / "v", {"lenta.md": SLOW, "otra.md": SLOW})
    driver = _driver(cluster, "render", str(vault))
    try:
        pids = [_ray_task_pid("vault-runner: lenta.md"), _ray_task_pid("vault-runner: otra.md")]
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 130, err.decode()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)  # the tasks were cancelled, their workers are gone
    assert (vault / "lenta.md").read_text(encoding="utf-8") == SLOW.lstrip("\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"
