"""Runaway and hostile blocks (issue 4): each runs in a real sandboxed kernel, then a normal
note must still run in the same session, and the note file must be intact apart from an
output region that says what happened.

The tier is whatever this machine offers, or VAULT_RUNNER_SANDBOX=bubblewrap|landlock|plain.
One kernel session is shared by the whole module, the way the watcher's warm pool keeps one:
a block that kills its kernel must leave a session that restarts and runs the next note.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import copy_sample_vault
from vault_runner import engine as engine_mod
from vault_runner.core import note as notes
from vault_runner.disk.vault import load_vault
from vault_runner.kernel.sandbox import Policy, Sandbox
from vault_runner.kernel.sandbox.cgroup import cgroup_support
from vault_runner.kernel.sandbox.probe import probe
from vault_runner.kernel.session import KernelSession

pytestmark = pytest.mark.kernel

TIER = probe().tier
ISOLATED = TIER in {"bubblewrap", "landlock"}
needs_isolation = pytest.mark.skipif(not ISOLATED, reason=f"the {TIER} tier does not isolate the filesystem")
MEMORY_CAP = 2**30
TASK_CAP = 64
FOLDER = "Malos"


def note_text(*blocks: str, timeout: float = 3) -> str:
    fences = "\n\nTexto entre bloques.\n\n".join(f"```python\n{textwrap.dedent(b).strip()}\n```" for b in blocks)
    return (
        "---\nvault-runner: true\nexecute:\n"
        f"  timeout: {timeout}\n"
        "  network: false\n  memory: 1G\n---\n"
        "# Bloque malo\n\nTexto antes.\n\n"
        f"{fences}\n\nTexto después.\n"
    )


@pytest.fixture(scope="module")
def vault_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_sample_vault(tmp_path_factory.mktemp("bad") / "vault")
    (root / FOLDER).mkdir()
    (root / FOLDER / "Normal.md").write_text(note_text("print(6 * 7)"), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def session(vault_root: Path) -> Iterator[KernelSession]:
    policy = Policy(
        vault=vault_root.resolve(),
        cwd=(vault_root / FOLDER).resolve(),
        network=False,
        memory=MEMORY_CAP,
        max_tasks=TASK_CAP,
        device="cpu",
    )
    kernel = KernelSession(policy.cwd, {"VAULT_RUNNER_VAULT": str(policy.vault)}, sandbox=Sandbox(policy))
    kernel.start()
    try:
        yield kernel
    finally:
        kernel.shutdown()


class Ran:
    def __init__(self, path: Path, original: str, report: engine_mod.NoteReport) -> None:
        self.path = path
        self.original = original
        self.report = report
        self.text = path.read_text(encoding="utf-8")

    @property
    def regions(self) -> str:
        note = notes.parse_note(self.text)
        return "\n".join(b.region.body for b in note.blocks if b.region is not None)

    def statuses(self) -> list[str]:
        return [b.status for b in self.report.blocks]


def run_note(vault_root: Path, session: KernelSession, name: str, text: str) -> Ran:
    path = vault_root / FOLDER / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    vault = load_vault(vault_root)
    engine = engine_mod.Engine(vault)
    loaded = engine_mod.load(vault, path)
    device = engine.prepare(session, loaded)
    run = engine.execute(loaded, session, device=device)
    engine.write_back(run)
    ran = Ran(path, text, run.report)
    # Intact: the note minus its output regions is exactly what was written.
    assert notes.strip_regions(notes.parse_note(ran.text)) == text
    return ran


def assert_next_note_runs(vault_root: Path, session: KernelSession) -> None:
    ran = run_note(vault_root, session, "Normal", note_text("print(6 * 7)"))
    assert ran.statuses() == ["ok"], ran.report
    assert "42" in ran.regions


def test_endless_python_loop_is_interrupted(vault_root: Path, session: KernelSession) -> None:
    ran = run_note(vault_root, session, "Bucle", note_text("while True:\n    pass"))
    assert ran.statuses() == ["timeout"]
    assert "> [!failure] TimeoutError: the block ran longer than its timeout of 3 s" in ran.regions
    assert "raise its `#| timeout:` option" in ran.regions  # interrupted, not restarted
    assert_next_note_runs(vault_root, session)


def test_loop_that_ignores_sigint_is_killed_and_the_kernel_restarted(vault_root: Path, session: KernelSession) -> None:
    # The regex engine backtracks for ages in C holding the GIL, and SIGINT is ignored: no
    # interrupt lands (a SIGINT alone would: test_sandbox_limits.py), so the kernel is restarted.
    code = """
    import re, signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    re.match(r"(a*)*b", "a" * 40)
    """
    ran = run_note(vault_root, session, "BucleC", note_text(code, "print('never')"))
    assert ran.statuses() == ["timeout", "skipped"]
    assert "TimeoutError" in ran.regions
    assert "It ignored the interrupt, so the kernel was restarted" in ran.regions
    assert session.is_alive()
    assert_next_note_runs(vault_root, session)


def test_os_exit_kills_the_kernel_and_says_so(vault_root: Path, session: KernelSession) -> None:
    ran = run_note(vault_root, session, "Salida", note_text("import os\nos._exit(3)", "print('never')"))
    assert ran.statuses() == ["dead", "skipped"]
    assert "> [!failure] KernelDied" in ran.regions
    assert_next_note_runs(vault_root, session)


def test_segfault_kills_the_kernel_without_a_core_file(vault_root: Path, session: KernelSession) -> None:
    before = set((vault_root / FOLDER).iterdir())
    ran = run_note(vault_root, session, "Segfault", note_text("import ctypes\nctypes.string_at(0)"))
    assert ran.statuses() == ["dead"]
    assert "KernelDied" in ran.regions
    assert not [p for p in set((vault_root / FOLDER).iterdir()) - before if p.name.startswith("core")]
    assert_next_note_runs(vault_root, session)


def _refused_for_memory(ran: Ran) -> bool:
    region = ran.regions
    if ran.statuses() == ["dead"]:
        return "more than its limit" in region or "memory limit" in region
    return ran.statuses() == ["error"] and ("MemoryError" in region or "alloc" in region)


def test_huge_bytearray_is_refused(vault_root: Path, session: KernelSession) -> None:
    # Refused at once by the allocator, or (with memory overcommit) killed at the 1 GiB cap.
    ran = run_note(vault_root, session, "Bytearray", note_text("x = bytearray(64 * 2**30)", timeout=60))
    assert _refused_for_memory(ran), ran.regions
    assert_next_note_runs(vault_root, session)


def test_huge_torch_tensor_is_refused(vault_root: Path, session: KernelSession) -> None:
    ran = run_note(vault_root, session, "Tensor", note_text("import torch\nx = torch.empty(2**40)", timeout=60))
    assert _refused_for_memory(ran), ran.regions
    assert_next_note_runs(vault_root, session)


def test_growing_memory_is_stopped_at_the_cap(vault_root: Path, session: KernelSession) -> None:
    # Bounded: even with no cap at all this stops at 3 GiB.
    code = """
    import time
    hoard = []
    for _ in range(150):
        hoard.append(bytearray(20 * 2**20))
        time.sleep(0.01)
    print("the cap did not hold")
    """
    ran = run_note(vault_root, session, "Memoria", note_text(code, timeout=60))
    assert ran.statuses() == ["dead"], ran.regions
    assert "limit of 1.0 GiB" in ran.regions  # the cgroup's words or the watchdog's
    assert "the cap did not hold" not in ran.regions
    assert_next_note_runs(vault_root, session)


FORK_PROBE = """
import os, time
children, refused = [], None
for _ in range(200):
    try:
        pid = os.fork()
    except OSError as exc:
        refused = exc
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(len(children), type(refused).__name__)
"""


@pytest.fixture(scope="module")
def process_cap(session: KernelSession) -> int | None:
    """How many forks the cap allowed, or None when nothing refused 200 (no cap here)."""
    done = session.execute(FORK_PROBE, 60)
    text = "".join(o.get("text", "") for o in done.outputs if o.get("output_type") == "stream")
    count, refused = text.split()
    return int(count) if refused != "NoneType" else None


def test_process_cap_refuses_forks_past_the_limit(process_cap: int | None) -> None:
    if process_cap is None:
        # Only acceptable where nothing can cap processes: no pids cgroup, and root.
        assert "pids" not in cgroup_support() and os.geteuid() == 0
        pytest.skip(f"no process cap in the {TIER} tier here (no pids cgroup, and running as root)")
    assert process_cap < TASK_CAP


def test_fork_bomb_is_bounded_by_the_process_cap(
    vault_root: Path, session: KernelSession, process_cap: int | None
) -> None:
    if process_cap is None:
        pytest.skip("the process cap is not in force, so the fork bomb is not run")
    # Every process forks until the cap says no; children then quit. Bounded twice: at most
    # 10,000 tries per process and 3 s in all; the block waits for the churn to end.
    code = """
    import os, time
    root, deadline, refused = os.getpid(), time.monotonic() + 3, None
    for _ in range(10_000):
        if time.monotonic() > deadline:
            break
        try:
            pid = os.fork()
        except OSError as exc:
            if os.getpid() != root:
                os._exit(0)
            refused = exc
            continue
        if pid == 0:
            continue
    if os.getpid() != root:
        os._exit(0)
    time.sleep(1)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    raise refused
    """
    ran = run_note(vault_root, session, "Bomba", note_text(code, timeout=60))
    assert ran.statuses() == ["error"], ran.regions
    assert "BlockingIOError" in ran.regions or "Resource temporarily unavailable" in ran.regions
    assert_next_note_runs(vault_root, session)


def test_printing_200_mb_is_truncated_without_bloating_note_or_daemon(vault_root: Path, session: KernelSession) -> None:
    tracemalloc.start()
    try:
        ran = run_note(vault_root, session, "Salida grande", note_text("print('x' * 200_000_000)", timeout=120))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ran.statuses() == ["ok"]
    assert "more bytes of output were dropped" in ran.regions
    assert "line cut by vault-runner" in ran.regions
    assert len(ran.text.encode()) < 100_000
    assert peak < 64 * 2**20, f"the daemon held {peak / 2**20:.0f} MiB for a 200 MB print"
    assert_next_note_runs(vault_root, session)


def test_500_figures_keep_50_images(vault_root: Path, session: KernelSession) -> None:
    code = """
    import matplotlib.pyplot as plt
    for i in range(500):
        plt.figure(figsize=(1, 1), dpi=20)
        plt.plot([0, 1], color=(i % 50 / 49, 0.5, 0.2))
    """
    ran = run_note(vault_root, session, "Figuras", note_text(code, timeout=300))
    assert ran.statuses() == ["ok"]
    block = ran.report.blocks[0]
    images = [o for o in block.outputs if "image/png" in o.get("mime", [])]
    assert len(images) == 50
    assert len(block.attachments) == 50
    assert "450 more images were dropped" in ran.regions
    assert_next_note_runs(vault_root, session)


@needs_isolation
def test_writing_bashrc_and_etc_hosts_is_denied(vault_root: Path, session: KernelSession) -> None:
    targets = [Path.home() / ".bashrc", Path("/etc/hosts")]
    before = {p: p.read_bytes() if p.exists() else None for p in targets}
    try:
        ran = run_note(
            vault_root,
            session,
            "Escribir fuera",
            note_text(
                "import os\nopen(os.path.expanduser('~/.bashrc'), 'a').write('echo pwned\\n')",
                "open('/etc/hosts', 'a').write('127.0.0.1 pwned\\n')",
            ),
        )
        after = {p: p.read_bytes() if p.exists() else None for p in targets}
    finally:
        for path, data in before.items():  # should the sandbox fail, leave the machine as it was
            if (path.read_bytes() if path.exists() else None) != data:
                path.write_bytes(data) if data is not None else path.unlink()
    assert after == before
    assert ran.statuses() == ["error", "error"]
    assert ran.regions.count("> [!failure]") == 2
    assert "Read-only file system" in ran.regions or "Permission denied" in ran.regions
    assert_next_note_runs(vault_root, session)


@needs_isolation
def test_network_off_cannot_reach_a_server_on_the_host_loopback(vault_root: Path, session: KernelSession) -> None:
    server = socket.socket()
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        server.setblocking(False)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)"
        ran = run_note(vault_root, session, "Red", note_text(code, timeout=30))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever connected
    finally:
        server.close()
    assert ran.statuses() == ["error"]
    assert "ConnectionRefusedError" in ran.regions or "PermissionError" in ran.regions
    assert_next_note_runs(vault_root, session)


@needs_isolation
def test_symlink_out_of_the_vault_leads_nowhere(
    vault_root: Path, session: KernelSession, tmp_path_factory: pytest.TempPathFactory
) -> None:
    secret = tmp_path_factory.mktemp("outside") / "secret.txt"
    secret.write_text("SECRETO-123\n", encoding="utf-8")
    link = vault_root / FOLDER / "enlace.txt"
    link.symlink_to(secret)
    try:
        ran = run_note(vault_root, session, "Enlace", note_text("print(open('enlace.txt').read())"))
    finally:
        link.unlink()
    assert ran.statuses() == ["error"]
    assert "SECRETO-123" not in ran.text
    assert "FileNotFoundError" in ran.regions or "PermissionError" in ran.regions
    assert_next_note_runs(vault_root, session)


# -- the same through `vault-runner run`, as a user would ---------------------------------------
def cli_run(note: Path) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "vault_runner", "run", "--json", str(note)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VAULT_RUNNER_MAX_TASKS": str(TASK_CAP)},
    )
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize(
    ("name", "code", "statuses", "callout"),
    [
        # Interrupted: the kernel lives on, so the next block runs.
        ("Bucle CLI", "while True:\n    pass", ["timeout", "ok"], "TimeoutError"),
        # Dead: restarted, so the next block (which needed its state) is skipped.
        ("Salida CLI", "import os\nos._exit(3)", ["dead", "skipped"], "KernelDied"),
    ],
)
def test_bad_block_through_the_cli(tmp_path: Path, name: str, code: str, statuses: list[str], callout: str) -> None:
    root = copy_sample_vault(tmp_path / "vault")
    note = root / f"{name}.md"
    text = note_text(code, "print('after')")
    note.write_text(text, encoding="utf-8")
    code_rc, report = cli_run(note)
    assert code_rc == 1
    blocks = report["notes"][0]["blocks"]
    assert [b["status"] for b in blocks] == statuses
    written = note.read_text(encoding="utf-8")
    assert notes.strip_regions(notes.parse_note(written)) == text
    assert f"> [!failure] {callout}" in written
    # The next run of a normal note works.
    normal = root / "Normal.md"
    normal.write_text(note_text("print(6 * 7)"), encoding="utf-8")
    code_rc, report = cli_run(normal)
    assert code_rc == 0
    assert "42" in normal.read_text(encoding="utf-8")
