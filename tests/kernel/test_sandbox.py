"""The sandbox itself (kernel/sandbox/, its launch.py), `doctor`, `trust`, and GPU placement.

Real bwrap, real Landlock, real cgroups and real processes; tests that need what this machine
lacks skip with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import copy_sample_vault
from vault_runner.disk import trust
from vault_runner.errors import SandboxError
from vault_runner.frontends.cli.admin import doctor_lines
from vault_runner.kernel.sandbox import Policy, Sandbox
from vault_runner.kernel.sandbox import launch as launch_script
from vault_runner.kernel.sandbox.cgroup import Cgroup, cgroup_support
from vault_runner.kernel.sandbox.filesystem import python_paths
from vault_runner.kernel.sandbox.gpu import claim_gpu, release_gpu
from vault_runner.kernel.sandbox.policy import NO_NETWORK_ENV, default_memory, parse_size, policy_from_options
from vault_runner.kernel.sandbox.probe import SANDBOX_ENV, probe
from vault_runner.kernel.sandbox.processes import MemoryWatchdog, kill_pid, process_tree, resident_memory

LAUNCHER = [sys.executable, "-I", "-S", launch_script.__file__]
PROBE = probe()
has_bwrap = pytest.mark.skipif(PROBE.bwrap is None, reason="bubblewrap does not work on this machine")
has_landlock = pytest.mark.skipif(PROBE.landlock_abi == 0, reason="this Linux kernel has no Landlock")


def cli(*args: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop}
    return subprocess.run(
        [sys.executable, "-m", "vault_runner", *args], capture_output=True, text=True, timeout=600, env=merged
    )


def launch(spec: dict, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAUNCHER, json.dumps(spec), "--", *command], capture_output=True, text=True, timeout=120)


# -- options and policy --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "size"),
    [("1G", 2**30), ("512M", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("100KB", 100 * 1024), ("1000", 1000)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_policy_from_note_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NO_NETWORK_ENV, raising=False)
    options = {"network": False, "memory": "2G", "device": "cpu"}
    policy = policy_from_options(tmp_path, {"VAULT_RUNNER_VAULT": str(tmp_path)}, options)
    assert (policy.network, policy.memory, policy.device, policy.vault) == (False, 2 * 2**30, "cpu", tmp_path)
    # No cap in the note: the default share of physical memory, and the network stays on.
    policy = policy_from_options(tmp_path, {}, {"network": True, "memory": None})
    assert policy.network and policy.memory == default_memory()[0]
    monkeypatch.setenv(NO_NETWORK_ENV, "1")  # what `--no-network` sets
    assert not policy_from_options(tmp_path, {}, {"network": True}).network


def test_forcing_an_unknown_tier_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SANDBOX_ENV, "docker")
    with pytest.raises(SandboxError, match="not a sandbox tier"):
        probe()


# -- bubblewrap -------------------------------------------------------------------------------
@pytest.fixture
def vault(tmp_path: Path) -> Path:
    root = copy_sample_vault(tmp_path / "vault")
    (root / ".git").mkdir()
    return root.resolve()


def bwrap_sandbox(vault: Path, tmp_path: Path, network: bool) -> Sandbox:
    policy = Policy(vault=vault, cwd=vault / "PyTorch", network=network, memory=None, max_tasks=None)
    box = Sandbox(policy, tier="bubblewrap")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    box.setup(runtime, lambda: None)
    return box


@has_bwrap
@pytest.mark.parametrize("network", [True, False])
def test_bwrap_command_follows_the_policy(vault: Path, tmp_path: Path, network: bool) -> None:
    box = bwrap_sandbox(vault, tmp_path, network)
    try:
        args = box.bwrap_args()
        assert ("--unshare-net" in args) is not network
        pairs = list(zip(args, args[1:], args[2:], strict=False))
        assert ("--bind", str(vault), str(vault)) in pairs
        assert ("--ro-bind", str(vault / ".obsidian"), str(vault / ".obsidian")) in pairs
        assert ("--ro-bind", str(vault / ".git"), str(vault / ".git")) in pairs
        assert ("--tmpfs", "/tmp") in list(zip(args, args[1:], strict=False))
        assert "--die-with-parent" in args and "--unshare-pid" in args
        assert box.interrupt_mode == "message"
    finally:
        box.close()


@has_bwrap
def test_bwrap_sandbox_really_isolates(vault: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret", encoding="utf-8")
    box = bwrap_sandbox(vault, tmp_path, network=False)
    script = f"""
import os, socket
results = {{}}
def attempt(name, action):
    try:
        action()
        results[name] = "allowed"
    except OSError as exc:
        results[name] = type(exc).__name__
attempt("write vault", lambda: open({str(vault / "PyTorch" / "new.txt")!r}, "w").write("ok"))
attempt("write obsidian", lambda: open({str(vault / ".obsidian" / "plugin.js")!r}, "w").write("x"))
attempt("write git hook", lambda: open({str(vault / ".git" / "post-commit")!r}, "w").write("x"))
attempt("write home", lambda: open(os.path.expanduser("~/.vault-runner-test"), "w").write("x"))
attempt("read outside", lambda: open({str(outside)!r}).read())
attempt("connect", lambda: socket.create_connection(("127.0.0.1", 9), timeout=2))
print(json.dumps(results))
"""
    try:
        command = box.wrap([sys.executable, "-c", "import json\n" + script])
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        box.close()
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["write vault"] == "allowed"
    assert (vault / "PyTorch" / "new.txt").read_text() == "ok"
    assert results["write obsidian"] == "OSError" or results["write obsidian"].endswith("Error")
    assert not (vault / ".obsidian" / "plugin.js").exists()
    assert not (vault / ".git" / "post-commit").exists()
    assert results["write home"] != "allowed" and not (Path.home() / ".vault-runner-test").exists()
    assert results["read outside"] == "FileNotFoundError"
    assert results["connect"] in {"ConnectionRefusedError", "OSError", "PermissionError"}  # seccomp: PermissionError


# -- Landlock ---------------------------------------------------------------------------------
@has_landlock
def test_landlock_launcher_confines_writes_and_reads(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    hidden = tmp_path / "hidden"
    allowed.mkdir()
    hidden.mkdir()
    (hidden / "secret.txt").write_text("secret", encoding="utf-8")
    reads = [str(p) for p in python_paths()] + ["/usr", "/lib", "/lib64", "/etc", "/proc", "/dev"]
    spec = {"landlock": {"read": reads, "write": [str(allowed)], "files": ["/dev/null"], "network": False}}
    script = f"""
import socket
def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as exc:
        return type(exc).__name__
print(attempt(lambda: open({str(allowed / "ok.txt")!r}, "w").write("ok")))
print(attempt(lambda: open({str(hidden / "secret.txt")!r}).read()))
print(attempt(lambda: open({str(hidden / "new.txt")!r}, "w")))
print(attempt(lambda: socket.create_connection(("127.0.0.1", 9), timeout=2)))
"""
    done = launch(spec, sys.executable, "-I", "-c", script)
    assert done.returncode == 0, done.stderr
    write_ok, read_hidden, write_hidden, connect = done.stdout.split()
    assert write_ok == "allowed" and (allowed / "ok.txt").read_text() == "ok"
    assert read_hidden == "PermissionError"
    assert write_hidden == "PermissionError" and not (hidden / "new.txt").exists()
    assert connect == "PermissionError" if PROBE.landlock_abi >= 4 else True


def test_launcher_turns_core_dumps_off() -> None:
    done = launch({"core": 0}, sys.executable, "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_CORE))")
    assert done.stdout.strip() == "(0, 0)"


def test_launcher_reports_a_setup_failure_in_one_line() -> None:
    done = launch({"cgroup": "/nonexistent/cgroup"}, sys.executable, "-c", "print('ran')")
    assert done.returncode == 126
    assert "ran" not in done.stdout
    assert done.stderr.startswith("vault-runner: the kernel sandbox could not be set up")


# -- limits -----------------------------------------------------------------------------------
@pytest.fixture
def pids_cgroup(tmp_path: Path) -> Iterator[Cgroup]:
    policy = Policy(vault=None, cwd=tmp_path, memory=None, max_tasks=20)
    cgroup = Cgroup.create(policy)
    if cgroup is None:
        pytest.skip("no writable pids cgroup here: " + cgroup_support())
    try:
        yield cgroup
    finally:
        cgroup.remove()


BOUNDED_FORKS = """
import os, time
children = []
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(len(children))
"""


def test_pids_cgroup_refuses_processes_past_the_cap(pids_cgroup: Cgroup) -> None:
    done = launch({"cgroup": str(pids_cgroup.path)}, sys.executable, "-c", BOUNDED_FORKS)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 20  # the python process itself holds a slot


def test_cgroup_kill_all_leaves_nothing(pids_cgroup: Cgroup) -> None:
    process = subprocess.Popen([*LAUNCHER, json.dumps({"cgroup": str(pids_cgroup.path)}), "--", "sleep", "60"])
    try:
        for _ in range(100):
            if pids_cgroup.procs():
                break
            time.sleep(0.05)
        assert pids_cgroup.procs() == [process.pid]
        pids_cgroup.kill_all()
        assert process.wait(timeout=30) == -9
        assert pids_cgroup.procs() == []
    finally:
        process.kill()
        process.wait()


def test_memory_watchdog_kills_a_growing_process() -> None:
    # Bounded: without the watchdog the child stops at 2 GiB and exits 0.
    grow = "import time\nx=[]\nfor _ in range(100):\n    x.append(bytearray(20 * 2**20)); time.sleep(0.02)\n"
    child = subprocess.Popen([sys.executable, "-c", grow])
    watchdog = MemoryWatchdog(300 * 2**20, lambda: process_tree(child.pid), lambda: kill_pid(child.pid))
    watchdog.start()
    try:
        assert child.wait(timeout=120) == -9
        assert watchdog.tripped is not None and watchdog.tripped > 300 * 2**20
    finally:
        watchdog.stop()
        child.kill()
        child.wait()


def test_forked_children_sharing_pages_are_not_counted_many_times() -> None:
    # 10 forks of a process holding 200 MiB share it copy-on-write: about 200 MiB, not 2 GiB.
    code = (
        "import os, time\nx = bytearray(200 * 2**20)\nkids = []\n"
        "for _ in range(10):\n    pid = os.fork()\n    if pid == 0:\n        time.sleep(60); os._exit(0)\n"
        "    kids.append(pid)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        tree = process_tree(parent.pid)
        assert len(tree) == 11
        used = resident_memory(tree)
        assert 150 * 2**20 < used < 600 * 2**20
    finally:
        for pid in process_tree(parent.pid):
            kill_pid(pid)
        parent.wait()


# -- GPU placement ------------------------------------------------------------------------------
def test_kernels_spread_across_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    first = claim_gpu("auto")
    second = claim_gpu("cuda")
    try:
        assert {first, second} == {"2", "5"}
        assert claim_gpu("cuda:1") is None  # the note chose its GPU itself
        assert claim_gpu("cpu") is None
    finally:
        release_gpu(first)
        release_gpu(second)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert claim_gpu("auto") is None  # one GPU: nothing to spread


# -- doctor and trust ---------------------------------------------------------------------------
def test_doctor_reports_tier_and_limits() -> None:
    done = cli("doctor")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for key in ("python", "torch", "devices", "sandbox tier", "bubblewrap", "memory cap", "process+thread cap"):
        assert f"\n{key} " in "\n" + text
    assert f"sandbox tier         {PROBE.tier}" in text
    if PROBE.bwrap_version:
        assert PROBE.bwrap_version in text


def test_doctor_and_notes_warn_in_the_plain_tier(tmp_path: Path) -> None:
    done = cli("doctor", env={SANDBOX_ENV: "plain"})
    assert "sandbox tier         plain" in done.stdout
    assert "warning" in done.stdout and "no sandbox" in done.stdout
    root = copy_sample_vault(tmp_path / "vault")
    note = root / "Plano.md"
    note.write_text("---\nvault-runner: true\n---\n```python\nprint(1)\n```\n", encoding="utf-8")
    done = cli("run", str(note), env={SANDBOX_ENV: "plain"})
    assert done.returncode == 0, done.stderr
    # Said with the run's report, never written into a block's outputs (issue 10.15).
    assert "[vault-runner: warning: no sandbox" in done.stderr
    assert "no sandbox" not in note.read_text(encoding="utf-8")


@pytest.mark.kernel
def test_without_bubblewrap_the_fallback_tier_runs_notes(tmp_path: Path) -> None:
    # A PATH with only python on it: `bwrap` is not found, as on a machine without it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {"PATH": str(bin_dir)}
    drop = (SANDBOX_ENV,)  # probe, do not force
    done = cli("doctor", env=env, drop=drop)
    expected = "landlock" if PROBE.landlock_abi else "plain"
    assert f"sandbox tier         {expected}" in done.stdout
    assert "warning" in done.stdout
    root = copy_sample_vault(tmp_path / "vault")
    note = root / "Sin bwrap.md"
    note.write_text("---\nvault-runner: true\n---\n```python\nprint(6 * 7)\n```\n", encoding="utf-8")
    done = cli("run", "--json", str(note), env=env, drop=drop)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["notes"][0]["blocks"][0]["status"] == "ok"
    assert "42" in note.read_text(encoding="utf-8")


def test_trust_and_untrust_store_the_vault_outside_it(tmp_path: Path) -> None:
    root = copy_sample_vault(tmp_path / "vault")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert not trust.is_trusted(root)
    done = cli("trust", str(root / "PyTorch"))  # a folder inside the vault trusts the vault
    assert done.returncode == 0, done.stderr
    assert trust.is_trusted(root)
    assert trust.config_dir() not in root.parents and (trust.config_dir() / "trusted-vaults.json").is_file()
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    done = cli("untrust", str(root))
    assert done.returncode == 0 and not trust.is_trusted(root)
    assert "untrusted" in done.stdout


def test_trust_of_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    done = cli("trust", str(tmp_path / "nope"))
    assert done.returncode == 2
    assert "does not exist; give the vault's folder" in " ".join(done.stderr.split())
    assert not trust.trusted_vaults()


def test_doctor_lines_in_process() -> None:
    keys = [key for key, _ in doctor_lines()]
    assert "sandbox tier" in keys and "trusted vaults" in keys


# -- the engine's kernel factory ------------------------------------------------------------------
@pytest.mark.kernel
def test_deterministic_option_sets_launch_environment(tmp_path: Path) -> None:
    from vault_runner.disk.vault import load_vault
    from vault_runner.engine import Engine

    root = copy_sample_vault(tmp_path / "vault")
    note = root / "Determinista.md"
    note.write_text(
        "---\nvault-runner: true\nexecute:\n  deterministic: true\n  network: false\n---\n"
        "```python\nimport os\nprint(os.environ['CUBLAS_WORKSPACE_CONFIG'], os.environ['PYTHONHASHSEED'])\n"
        "print(hash('vault'))\n```\n",
        encoding="utf-8",
    )
    report = Engine(load_vault(root)).run_note(note)
    assert [b.status for b in report.blocks] == ["ok"], report
    text = next(o["text"] for o in report.blocks[0].outputs if o.get("name") == "stdout")
    assert text.startswith(":4096:8 0\n")
    assert text.split("\n")[1] == str(_hash_with_seed_zero("vault"))


def _hash_with_seed_zero(value: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", f"print(hash({value!r}))"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return int(done.stdout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_note_runs_on_the_gpu_and_reports_peak_memory(tmp_path: Path) -> None:
    from vault_runner.disk.vault import load_vault
    from vault_runner.engine import Engine

    root = copy_sample_vault(tmp_path / "vault")
    note = root / "GPU.md"
    note.write_text(
        "---\nvault-runner: true\nexecute:\n  device: cuda\n---\n"
        "```python\nimport torch\nassert DEVICE.type == 'cuda'\nx = torch.ones(2**20, device=DEVICE)\n"
        "print(x.is_cuda)\n```\n",
        encoding="utf-8",
    )
    report = Engine(load_vault(root)).run_note(note)
    block = report.blocks[0]
    assert block.status == "ok", report
    assert block.device and block.device.startswith("cuda")
    assert block.gpu_peak_bytes is not None and block.gpu_peak_bytes >= 4 * 2**20


def test_reset_undoes_what_setup_made_to_hold_a_kernel_so_setup_can_run_again(tmp_path: Path) -> None:
    """A forked try that falls back to a normal start: its cgroup and watchdog go, new ones come."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    sandbox = Sandbox(Policy(vault=tmp_path, cwd=tmp_path, max_tasks=40, memory=2 << 30), "plain")
    try:
        sandbox.setup(runtime, lambda: None)
        first_cgroup, first_watchdog = sandbox.cgroup, sandbox.watchdog
        assert first_cgroup is not None or first_watchdog is not None
        sandbox.reset()
        assert sandbox.cgroup is None and sandbox.watchdog is None and sandbox.nproc is None
        assert first_cgroup is None or not first_cgroup.path.exists()
        sandbox.setup(runtime, lambda: None)
        assert (sandbox.cgroup, sandbox.watchdog) != (first_cgroup, first_watchdog)
        assert sandbox.cgroup is not None or sandbox.watchdog is not None
    finally:
        sandbox.close()
    assert sandbox.cgroup is None and sandbox.watchdog is None


def test_a_spare_cgroup_is_adopted_only_inside_the_notes_memory_budget(tmp_path: Path) -> None:
    """With a memory cgroup, a kernel's cgroup sits under the budget's: a spare's cgroup made
    for the same budget takes the note's memory cap; one outside it (a template's policy
    with no budget) would let the kernel escape the budget, and is refused."""
    if "memory" not in cgroup_support():
        pytest.skip(f"no writable memory cgroup here ({cgroup_support()})")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    budget = 3 * 2**30
    sandbox = Sandbox(Policy(vault=tmp_path, cwd=tmp_path, memory=2**30, max_tasks=40, budget=budget), "plain")
    inside = Cgroup.create(Policy(vault=tmp_path, cwd=tmp_path, memory=budget, budget=budget))
    outside = Cgroup.create(Policy(vault=tmp_path, cwd=tmp_path, memory=budget))
    try:
        sandbox.setup(runtime, lambda: None)
        ours = sandbox.cgroup
        assert ours is not None and ours.memory and ours.budget is not None
        assert inside is not None and inside.budget is ours.budget
        assert outside is not None and outside.budget is None
        assert not sandbox.adopt_cgroup(outside)
        assert sandbox.adopt_cgroup(inside)
        assert sandbox.cgroup is inside and all(not folder.exists() for folder in ours.folders)
        memory_folder = inside.folders[-1]
        limit = "memory.max" if inside.version == 2 else "memory.limit_in_bytes"
        assert int((memory_folder / limit).read_text()) == 2**30
        assert memory_folder.parent == inside.budget.path
    finally:
        sandbox.close()
        for cgroup in (inside, outside):
            if cgroup is not None:
                cgroup.remove()


def test_the_budget_cgroup_stops_what_outruns_the_watchdog_at_its_margin(tmp_path: Path) -> None:
    """With no watchdog at all, a process filling memory is stopped by the machine at the
    budget's cgroup limit (the budget and its margin), below its own larger cap, and the
    budget says it was its limit."""
    if "memory" not in cgroup_support():
        pytest.skip(f"no writable memory cgroup here ({cgroup_support()})")
    budget = 256 * 2**20
    cgroup = Cgroup.create(Policy(vault=tmp_path, cwd=tmp_path, memory=4 * 2**30, budget=budget))
    assert cgroup is not None and cgroup.budget is not None and cgroup.budget.limit < 4 * 2**30
    grow = "h = []\nfor _ in range(256):\n    h.append(b'x' * 2**24)\nprint('4 GiB')"
    done = launch({"cgroup": [str(f) for f in cgroup.folders]}, sys.executable, "-c", grow)
    try:
        assert done.returncode == -signal.SIGKILL, done
        assert "4 GiB" not in done.stdout
        assert cgroup.oom_killed() and cgroup.budget.killed_at_limit()
    finally:
        cgroup.remove()


# Two cgroups made at once by threads of a fresh process, the second a little after the first
# (a spare's cgroup and the first note's are made together): both are made. Each thread used
# to probe whether a kernel can join a cgroup here in one shared folder, which the first to
# finish removed while the other's child was about to join it: "not joinable", cached for good.
_TWO_CGROUPS_AT_ONCE = """
import sys, threading, time
from pathlib import Path
from vault_runner.kernel.sandbox import Policy
from vault_runner.kernel.sandbox.cgroup import Cgroup
made = {}
def make(delay):
    time.sleep(delay)
    made[delay] = Cgroup.create(Policy(vault=Path.cwd(), cwd=Path.cwd(), max_tasks=64))
threads = [threading.Thread(target=make, args=(delay,)) for delay in (0.0, float(sys.argv[1]))]
for t in threads: t.start()
for t in threads: t.join()
print(sum(c is not None for c in made.values()))
for c in made.values():
    if c is not None: c.remove()
"""


@pytest.mark.parametrize("delay", [0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.05])
def test_two_cgroups_made_at_once_both_find_the_cgroup_layer(tmp_path: Path, delay: float) -> None:
    probe = Cgroup.create(Policy(vault=tmp_path, cwd=tmp_path, max_tasks=64))
    if probe is None:
        pytest.skip("this process cannot make a cgroup a kernel can join here")
    probe.remove()
    done = subprocess.run(
        [sys.executable, "-c", _TWO_CGROUPS_AT_ONCE, str(delay)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2"], done.stdout


def test_a_kernel_adopts_only_a_cgroup_that_holds_it_as_its_own_would(tmp_path: Path) -> None:
    """A spare's cgroup replaces the one setup made only if it is of the same kind (version,
    memory cap) and takes the note's caps; else the kernel is moved into the note's own."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    sandbox = Sandbox(Policy(vault=tmp_path, cwd=tmp_path, max_tasks=40), "plain")
    spare = Cgroup.create(Policy(vault=tmp_path, cwd=tmp_path, max_tasks=None))
    try:
        sandbox.setup(runtime, lambda: None)
        ours = sandbox.cgroup
        if ours is None or spare is None:
            pytest.skip("this process cannot make a cgroup a kernel can join here")
        unlike = Cgroup(spare.path, 3 - spare.version, not spare.memory, spare.controllers)
        assert not sandbox.adopt_cgroup(unlike)
        assert sandbox.cgroup is ours and ours.path.exists()
        assert sandbox.adopt_cgroup(spare)
        assert sandbox.cgroup is spare and not ours.path.exists()
        assert (spare.path / "pids.max").read_text().strip() == "40"
    finally:
        sandbox.close()
        if spare is not None and spare.path.exists():
            spare.remove()
