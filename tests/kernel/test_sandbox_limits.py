"""The sandbox's limits hold the same in every isolating tier this machine has (issue 9.7,
9.8, 9.12): `network: false` cuts unix sockets and UDP too, not only TCP; the memory of all
running kernels together stays within one budget; a block that never lets go of the GIL is
interrupted, not restarted.

Each test runs real kernels in bubblewrap and in Landlock (those that work here).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import available_tiers, copy_sample_vault
from vault_runner import engine as engine_mod
from vault_runner.core import note as notes
from vault_runner.disk.vault import load_vault
from vault_runner.kernel.sandbox import Policy, Sandbox, network, processes
from vault_runner.kernel.sandbox.cgroup import cgroup_support
from vault_runner.kernel.sandbox.policy import MEMORY_ENV
from vault_runner.kernel.sandbox.probe import SANDBOX_ENV
from vault_runner.kernel.sandbox.processes import MemoryBudget, MemoryWatchdog, kill_pid, process_memory
from vault_runner.kernel.session import KernelSession

pytestmark = pytest.mark.kernel

TIERS = [t for t in available_tiers() if t != "plain"]  # containment is the point
if not TIERS:
    pytest.skip("neither bubblewrap nor Landlock works here", allow_module_level=True)
FOLDER = "Notas"


def note_text(*blocks: str, timeout: float = 10, network_on: bool = False) -> str:
    fences = "\n\nEntre bloques.\n\n".join(f"```python\n{textwrap.dedent(b).strip()}\n```" for b in blocks)
    return (
        f"---\nvault-runner: true\nexecute:\n  timeout: {timeout}\n  network: {str(network_on).lower()}\n---\n"
        f"# Nota\n\n{fences}\n\nFin.\n"
    )


@pytest.fixture(scope="module", params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def vault_root(tier: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_sample_vault(tmp_path_factory.mktemp(f"limits-{tier}") / "vault")
    (root / FOLDER).mkdir()
    return root


@contextmanager
def started_kernel(vault_root: Path, tier: str, network_on: bool) -> Iterator[KernelSession]:
    policy = Policy(vault=vault_root.resolve(), cwd=(vault_root / FOLDER).resolve(), network=network_on, device="cpu")
    kernel = KernelSession(policy.cwd, {"VAULT_RUNNER_VAULT": str(policy.vault)}, sandbox=Sandbox(policy, tier=tier))
    kernel.start()
    try:
        yield kernel
    finally:
        kernel.shutdown()


@pytest.fixture(scope="module")
def offline(vault_root: Path, tier: str) -> Iterator[KernelSession]:
    with started_kernel(vault_root, tier, network_on=False) as kernel:
        yield kernel


@pytest.fixture(scope="module")
def online(vault_root: Path, tier: str) -> Iterator[KernelSession]:
    with started_kernel(vault_root, tier, network_on=True) as kernel:
        yield kernel


def run_block(kernel: KernelSession, code: str, timeout: float = 30) -> tuple[str, str]:
    """(status, everything the block printed or raised)."""
    done = kernel.execute(textwrap.dedent(code), timeout)
    text = "".join(o.get("text", "") for o in done.outputs if o.get("output_type") == "stream")
    text += "".join(f"{o.get('ename')}: {o.get('evalue')}" for o in done.outputs if o.get("output_type") == "error")
    return done.status, text


@pytest.fixture
def unix_server(vault_root: Path) -> Iterator[socket.socket]:
    """A host service listening on a unix socket in the vault, which every kernel sees."""
    path = vault_root / FOLDER / f"servicio-{secrets.token_hex(3)}.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(5)
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()
        path.unlink(missing_ok=True)


@pytest.fixture
def abstract_server() -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"\0vault-runner-test-{secrets.token_hex(4)}")
    server.listen(5)
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def udp_listener() -> Iterator[socket.socket]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(1.0)
    try:
        yield listener
    finally:
        listener.close()


def connected(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except BlockingIOError:
        return False


def arrived(listener: socket.socket) -> bytes | None:
    try:
        return listener.recv(100)
    except TimeoutError:
        return None


def test_offline_note_cannot_reach_a_host_unix_socket(offline: KernelSession, unix_server: socket.socket) -> None:
    status, text = run_block(
        offline, f"import socket\nsocket.socket(socket.AF_UNIX).connect({unix_server.getsockname()!r})"
    )
    assert not connected(unix_server)
    assert status == "error" and "PermissionError" in text, text


def test_offline_note_cannot_reach_an_abstract_unix_socket(
    offline: KernelSession, abstract_server: socket.socket
) -> None:
    status, text = run_block(
        offline, f"import socket\nsocket.socket(socket.AF_UNIX).connect({abstract_server.getsockname()!r})"
    )
    assert not connected(abstract_server)
    assert status == "error" and ("PermissionError" in text or "ConnectionRefusedError" in text), text


def test_offline_note_cannot_send_udp_to_the_host(offline: KernelSession, udp_listener: socket.socket) -> None:
    port = udp_listener.getsockname()[1]
    status, text = run_block(
        offline,
        f"import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'fuga', ('127.0.0.1', {port}))",
    )
    assert arrived(udp_listener) is None
    assert status == "error" and "PermissionError" in text, text


@pytest.mark.parametrize(
    "sender",
    [
        # journald and syslog (/dev/log) listen on unix datagram sockets: no connect() needed.
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)",
        # A datagram pair is unconnected for sendto(): without the check on socketpair it reaches any path.
        "socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0]",
    ],
    ids=["socket", "socketpair"],
)
def test_offline_note_cannot_send_to_a_unix_datagram_socket(
    offline: KernelSession, vault_root: Path, sender: str
) -> None:
    path = vault_root / FOLDER / f"log-{secrets.token_hex(3)}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(1.0)
    try:
        status, text = run_block(offline, f"import socket\n{sender}.sendto(b'fuga', {str(path)!r})")
        assert arrived(listener) is None
    finally:
        listener.close()
        path.unlink(missing_ok=True)
    assert status == "error" and "PermissionError" in text, text


def test_offline_note_keeps_pipes_socketpairs_and_worker_processes(offline: KernelSession) -> None:
    code = """
    import multiprocessing, os, socket
    a, b = socket.socketpair()
    a.sendall(b"par")
    r, w = os.pipe()
    os.write(w, b"tubo")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        squares = pool.map(abs, [-1, -2, -3])
    print(b.recv(3).decode(), os.read(r, 4).decode(), squares)
    """
    status, text = run_block(offline, code)
    assert status == "ok", text
    assert "par tubo [1, 2, 3]" in text


def test_online_note_still_reaches_host_services(
    online: KernelSession, unix_server: socket.socket, udp_listener: socket.socket
) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(5)
    tcp.setblocking(False)
    try:
        code = f"""
        import socket
        socket.socket(socket.AF_UNIX).connect({unix_server.getsockname()!r})
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hola', ('127.0.0.1', {udp_listener.getsockname()[1]}))
        socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=5).close()
        print("conectado")
        """
        status, text = run_block(online, code)
        assert status == "ok", text
        assert connected(unix_server)
        assert arrived(udp_listener) == b"hola"
        assert connected(tcp)
    finally:
        tcp.close()


def test_what_network_false_leaves_open_is_said_in_the_note(
    vault_root: Path, tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the seccomp filter cannot be applied, the note says what is still reachable.
    policy = Policy(vault=vault_root, cwd=vault_root / FOLDER, network=False, device="cpu")
    assert not Sandbox(policy, tier=tier).warnings  # here, nothing is left open
    monkeypatch.setattr(network, "seccomp_works", lambda: False)
    (warning,) = Sandbox(policy, tier=tier).warnings
    assert "network: false is not fully enforced here" in warning
    assert "unix sockets" in warning


# -- interrupts --------------------------------------------------------------------------------
def run_note(vault_root: Path, kernel: KernelSession, name: str, text: str) -> tuple[engine_mod.NoteReport, str]:
    path = vault_root / FOLDER / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    vault = load_vault(vault_root)
    engine = engine_mod.Engine(vault)
    loaded = engine_mod.load(vault, path)
    run = engine.execute(loaded, kernel, device=engine.prepare(kernel, loaded))
    engine.write_back(run)
    written = path.read_text(encoding="utf-8")
    assert notes.strip_regions(notes.parse_note(written)) == text
    return run.report, "\n".join(b.region.body for b in notes.parse_note(written).blocks if b.region is not None)


def test_a_block_that_holds_the_gil_is_interrupted_and_the_kernel_lives_on(
    vault_root: Path, offline: KernelSession
) -> None:
    # The regex engine never releases the GIL, so a message on the control channel is never
    # read; a SIGINT is (sre checks for signals as it backtracks).
    code = "import re\nre.match(r'(a+)+$', 'a' * 40 + 'b')"
    report, regions = run_note(vault_root, offline, "Regex", note_text(code, "print('sigue vivo')", timeout=2))
    assert [b.status for b in report.blocks] == ["timeout", "ok"], regions
    assert "> [!failure] TimeoutError: the block ran longer than its timeout of 2 s" in regions
    assert "It ignored the interrupt" not in regions
    assert "sigue vivo" in regions


# -- one memory budget for all kernels ----------------------------------------------------------
BUDGET = 640 * 2**20
HOLDER = """
import os, time
hoard = [bytearray(16 * 2**20) for _ in range(24)]  # 384 MiB: 60% of the budget
open("a-tiene", "w").close()
deadline = time.monotonic() + 120
while not os.path.exists("b-acabo") and time.monotonic() < deadline:
    time.sleep(0.05)
print("A guarda", 16 * len(hoard), "MiB")
"""
GROWER = """
import os, time
deadline = time.monotonic() + 120
while not os.path.exists("a-tiene") and time.monotonic() < deadline:
    time.sleep(0.05)
hoard = []
for _ in range(24):  # 384 MiB more, slowly: the other kernel already holds 60%
    hoard.append(bytearray(16 * 2**20))
    time.sleep(0.08)
print("B consiguio", 16 * len(hoard), "MiB")
"""


def test_the_budget_stops_the_process_that_asks_for_more() -> None:
    # Two plain processes under one budget: the one holding memory keeps it, the growing one is
    # stopped (bounded: without the budget it stops at 480 MiB and exits 0).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; x = bytearray(200 * 2**20); print('ok', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    grower = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ok\n"
        grow = "import time\nh = []\nfor _ in range(30):\n    h.append(bytearray(16 * 2**20)); time.sleep(0.05)"
        grower = subprocess.Popen([sys.executable, "-c", grow])
        budget = MemoryBudget(process_memory(holder.pid) + 160 * 2**20)
        members = [
            MemoryWatchdog(
                None, lambda p=p: [p.pid] if p.poll() is None else [], lambda p=p: kill_pid(p.pid), budget=budget
            )
            for p in (holder, grower)
        ]
        for member in members:
            member.start()
        assert grower.wait(timeout=60) == -signal.SIGKILL
        assert holder.poll() is None
        assert members[1].tripped is not None and members[1].shared and members[0].tripped is None
        for member in members:
            member.stop()
    finally:
        for process in (holder, grower):
            if process is not None:
                process.kill()
                process.wait()


def test_the_kernel_stopped_at_the_limit_is_the_one_asking_not_the_biggest(monkeypatch: pytest.MonkeyPatch) -> None:
    # The choice alone, on sizes given to it: A holds 384 of 640 MiB; B fills the rest and is
    # stopped; while B's memory is still going, C fills what B freed, then holds still. Its
    # growth is measured from before B's stop: C is the one asking, not A, the biggest.
    mib = 2**20
    sizes = {1: 384 * mib, 2: 0, 3: 0}
    at_limit = [False]
    monkeypatch.setattr(processes, "resident_size", lambda pids: sum(sizes[p] for p in pids))
    monkeypatch.setattr(processes, "resident_memory", lambda pids: sum(sizes[p] for p in pids))
    monkeypatch.setattr(processes, "RELEASE_GRACE", 0.2)
    budget = MemoryBudget(640 * mib, at_limit=lambda: at_limit[0])
    killed: list[str] = []
    members = {
        name: MemoryWatchdog(None, lambda pid=pid: [pid], lambda name=name: killed.append(name), budget=budget)
        for name, pid in (("A", 1), ("B", 2), ("C", 3))
    }
    group = list(members.values())
    budget.look(group)  # A's 384 MiB is where everyone starts
    sizes[2], at_limit[0] = 256 * mib, True
    budget.look(group)
    assert killed == ["B"]
    sizes[3] = 200 * mib  # B's memory is not all back yet; C takes what is
    budget.look(group)
    assert killed == ["B"]  # nobody else while B's memory is going
    sizes[2] = 0
    time.sleep(0.25)
    budget.look(group)
    assert killed == ["B", "C"]


def kernels_memory(folder: Path) -> int:
    """Memory held by every process working in `folder` (the two kernels and their children)."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == str(folder):
                    total += process_memory(int(entry))
            except OSError:
                continue
    return total


def test_two_hungry_notes_at_once_stay_within_one_budget(
    vault_root: Path, tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = (vault_root / f"Memoria {tier}").resolve()
    folder.mkdir()
    (folder / "A.md").write_text(note_text(HOLDER, timeout=150, network_on=True), encoding="utf-8")
    (folder / "B.md").write_text(note_text(GROWER, timeout=150, network_on=True), encoding="utf-8")
    monkeypatch.setenv(MEMORY_ENV, str(BUDGET))
    monkeypatch.setenv(SANDBOX_ENV, tier)
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], kernels_memory(folder))

    sampler = threading.Thread(target=watch)
    sampler.start()
    try:
        reports = run_two_notes(engine_mod.Engine(load_vault(vault_root)), folder)
    finally:
        stop.set()
        sampler.join()
    a, b = reports["A"], reports["B"]
    assert [x.status for x in a.blocks] == ["ok"], a
    assert [x.status for x in b.blocks] == ["dead"], b
    grower = (folder / "B.md").read_text(encoding="utf-8")
    assert "went over the memory budget of 640.0 MiB that all kernels share" in grower
    assert "B consiguio 384 MiB" not in grower
    assert "A guarda 384 MiB" in (folder / "A.md").read_text(encoding="utf-8")
    # Stopped within about one look of the watcher (0.1 s; B asks for 200 MiB/s), with room for
    # a loaded machine; without the budget the two would hold some 870 MiB.
    assert peak[0] <= BUDGET + 128 * 2**20, f"the kernels held {peak[0] / 2**20:.0f} MiB together"


FAST_GROWER = """
import mmap, os, time
deadline = time.monotonic() + 120
while not os.path.exists("a-tiene") and time.monotonic() < deadline:
    time.sleep(0.05)
hoard = []
for _ in range(32):  # 2 GiB, faulted in by the kernel at gigabytes a second
    hoard.append(mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE))
    with open("b-progreso.tmp", "w") as progress:
        progress.write(str(64 * len(hoard)))
    os.replace("b-progreso.tmp", "b-progreso")  # whole, even if it is stopped meanwhile
print("B consiguio", 64 * len(hoard), "MiB")
"""


def run_two_notes(engine: engine_mod.Engine, folder: Path) -> dict[str, engine_mod.NoteReport]:
    """A and B of `folder` at once, as `render -j 2` runs them; B's end lets A go."""
    reports: dict[str, engine_mod.NoteReport] = {}

    def run(name: str) -> None:
        reports[name] = engine.run_note(folder / f"{name}.md")
        if name == "B":
            (folder / "b-acabo").touch()

    runners = [threading.Thread(target=run, args=(name,)) for name in ("A", "B")]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(timeout=300)
    (folder / "b-acabo").touch()
    return reports


def test_a_note_that_fills_memory_fast_is_held_at_the_budget(
    vault_root: Path, tier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A watcher looks every 0.1 s, and memory fills at gigabytes a second: the watchdog still
    # stops the one asking (not A, the biggest), and the machine's own accounting (a memory
    # cgroup over all the kernels) never lets them past the budget and its margin meanwhile.
    if "memory" not in cgroup_support():
        pytest.skip(f"no writable memory cgroup here ({cgroup_support()}): the budget is a watcher's")
    folder = (vault_root / f"Deprisa {tier}").resolve()
    folder.mkdir()
    (folder / "A.md").write_text(note_text(HOLDER, timeout=150, network_on=True), encoding="utf-8")
    (folder / "B.md").write_text(note_text(FAST_GROWER, timeout=150, network_on=True), encoding="utf-8")
    monkeypatch.setenv(MEMORY_ENV, str(BUDGET))
    monkeypatch.setenv(SANDBOX_ENV, tier)
    reports = run_two_notes(engine_mod.Engine(load_vault(vault_root)), folder)
    a, b = reports["A"], reports["B"]
    assert [x.status for x in a.blocks] == ["ok"], a
    assert [x.status for x in b.blocks] == ["dead"], b
    assert "went over the memory budget of 640.0 MiB that all kernels share" in (folder / "B.md").read_text(
        encoding="utf-8"
    )
    assert "A guarda 384 MiB" in (folder / "A.md").read_text(encoding="utf-8")
    # A holds 384 MiB: B got no further than the cgroup's limit left it, give or take the
    # chunk it was filling (here the watchdog stopped it first, at 128 to 448 MiB).
    reached = int((folder / "b-progreso").read_text())
    limit = BUDGET + max(256 * 2**20, BUDGET // 8)
    assert reached <= (limit >> 20) - 384 + 64, f"B filled {reached} MiB"


LONE_GROWER = """
hoard = []
for _ in range(64):  # 2 GiB
    hoard.append(b"x" * (32 * 2**20))
print("sin tope", 32 * len(hoard), "MiB")
"""


@pytest.mark.parametrize("own_cap", [None, "128M"])
def test_a_lone_note_over_its_own_cap_is_told_of_its_own_cap(
    vault_root: Path, tier: str, monkeypatch: pytest.MonkeyPatch, own_cap: str | None
) -> None:
    # Its cap is the budget's size when it sets none; below the budget with `memory:`. Either
    # way it is stopped at once, at its own cap, and
    # told of its own cap, not of other kernels it did not run beside.
    folder = (vault_root / f"Sola {tier} {own_cap}").resolve()
    folder.mkdir()
    text = note_text(LONE_GROWER, timeout=120, network_on=True)
    if own_cap:
        text = text.replace("  timeout: 120\n", f"  timeout: 120\n  memory: {own_cap}\n")
    (folder / "Sola.md").write_text(text, encoding="utf-8")
    monkeypatch.setenv(MEMORY_ENV, str(BUDGET))
    monkeypatch.setenv(SANDBOX_ENV, tier)
    started = time.monotonic()
    report = engine_mod.Engine(load_vault(vault_root)).run_note(folder / "Sola.md")
    assert [b.status for b in report.blocks] == ["dead"], report
    written = (folder / "Sola.md").read_text(encoding="utf-8")
    cap = "128.0 MiB" if own_cap else "640.0 MiB"
    assert f"limit of {cap}" in written, written
    assert "memory budget" not in written and "sin tope 2048" not in written
    assert time.monotonic() - started < 100, "it waited at the limit until its timeout"


def test_a_note_run_by_the_engine_gets_the_same_interrupt_and_network_rules(
    vault_root: Path, tier: str, unix_server: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `render` runs it: the engine's own kernel (forked from a template where it can be).
    monkeypatch.setenv(SANDBOX_ENV, tier)
    regex = "import re\nre.match(r'(a+)+$', 'a' * 40 + 'b')"
    connect = f"import socket\nsocket.socket(socket.AF_UNIX).connect({unix_server.getsockname()!r})"
    path = vault_root / FOLDER / "Motor.md"
    path.write_text(note_text(regex, connect, timeout=2), encoding="utf-8")
    report = engine_mod.Engine(load_vault(vault_root)).run_note(path)
    assert [b.status for b in report.blocks] == ["timeout", "error"], report  # interrupted, not restarted
    assert not connected(unix_server)
    written = path.read_text(encoding="utf-8")
    assert "TimeoutError: the block ran longer than its timeout of 2 s" in written
    assert "PermissionError" in written
