"""The kernel factory (forkserver.py): forked kernels are fresh processes to the note's code.

Real kernels, no mocks. One template serves the module (it takes seconds to import torch);
every kernel is shut down by a fixture's finalizer, and the template's close is checked
against /proc.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vault_runner.kernel.fork import (
    ForkedKernel,
    ForkedKernelManager,
    ForkUnavailable,
    KernelTemplate,
    TemplateKey,
    fork_unavailable_reason,
    wait_for_ready,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(fork_unavailable_reason() is not None, reason=str(fork_unavailable_reason())),
]

TIMEOUT = 60.0


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


class Driven:
    """A forked kernel with a started client: run code, read back a JSON value."""

    def __init__(self, kernel: ForkedKernel) -> None:
        self.kernel = kernel
        self.client = kernel.client()
        self.client.start_channels()
        wait_for_ready(self.client, TIMEOUT, kernel.is_alive)

    def run(self, code: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        outputs: list[dict[str, Any]] = []
        reply = self.client.execute_interactive(
            code, timeout=timeout, output_hook=lambda m: outputs.append(m), allow_stdin=False
        )
        return {"reply": reply["content"], "outputs": outputs}

    def value(self, expression: str) -> Any:
        result = self.run(f"import json as __j; print(__j.dumps({expression})); del __j")
        assert result["reply"]["status"] == "ok", result
        text = "".join(m["content"]["text"] for m in result["outputs"] if m["msg_type"] == "stream")
        return json.loads(text.strip().splitlines()[-1])

    def close(self) -> None:
        try:
            self.client.stop_channels()
        finally:
            self.kernel.shutdown(now=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelTemplate]:
    folder = tmp_path_factory.mktemp("template")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    tpl = KernelTemplate(
        TemplateKey.for_launch(folder, "plain", env), env=env, cwd=folder, runtime_dir=folder, startup_timeout=180
    )
    try:
        tpl.start()
        yield tpl
    finally:
        tpl.close()


@pytest.fixture
def fork(template: KernelTemplate, tmp_path: Path) -> Iterator[Callable[..., Driven]]:
    """Fork and drive kernels; every one is shut down afterwards, passed or failed."""
    made: list[Driven] = []
    raw: list[ForkedKernel] = []

    def make(cwd: Path | None = None, env: dict[str, str | None] | None = None, drive: bool = True) -> Any:
        kernel = template.fork(cwd or tmp_path, env)
        raw.append(kernel)
        if not drive:
            return kernel
        driven = Driven(kernel)
        made.append(driven)
        return driven

    yield make
    for driven in made:
        try:
            driven.close()
        except Exception:
            pass
    for kernel in raw:
        kernel.shutdown(now=True)


def test_template_is_safe_to_fork(template: KernelTemplate) -> None:
    info = template.info
    assert info["cuda_initialized"] is False
    assert info["zmq_context"] is False
    assert info["python_threads"] == 1
    assert "torch" in info["loaded"] and "numpy" in info["loaded"]
    assert template.refusal() is None


def test_names_do_not_leak_between_kernels(fork: Callable[..., Driven]) -> None:
    first = fork()
    assert first.run("leaked_name = 42")["reply"]["status"] == "ok"
    assert first.value("leaked_name") == 42
    second = fork()
    assert second.value("'leaked_name' in globals()") is False


def test_modules_imported_by_a_note_are_not_imported_in_the_next(fork: Callable[..., Driven]) -> None:
    candidates = ["wave", "mailbox", "sched", "tabnanny", "netrc", "plistlib", "colorsys"]
    first = fork()
    fresh = first.value(f"[m for m in {candidates!r} if m not in __import__('sys').modules]")
    assert len(fresh) >= 2, "the template imports nearly everything; pick other modules"
    first.run("import " + ", ".join(fresh))
    assert first.value(f"[m in __import__('sys').modules for m in {fresh!r}]") == [True] * len(fresh)
    second = fork()
    assert second.value(f"[m in __import__('sys').modules for m in {fresh!r}]") == [False] * len(fresh)


RANDOMS = (
    "[__import__('random').random(), float(__import__('numpy').random.rand()), float(__import__('torch').rand(1))]"
)


def test_unseeded_random_numbers_differ_between_kernels(fork: Callable[..., Driven]) -> None:
    first, second = fork().value(RANDOMS), fork().value(RANDOMS)
    assert all(a != b for a, b in zip(first, second, strict=True)), (first, second)


SEEDED = (
    "(__import__('random').seed(7), __import__('numpy').random.seed(7), __import__('torch').manual_seed(7), "
    f"{RANDOMS})[-1]"
)


def test_seeded_random_numbers_match_a_separate_process(fork: Callable[..., Driven]) -> None:
    import subprocess

    forked = fork().value(SEEDED)
    code = f"import json; print(json.dumps({SEEDED}))"
    separate = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    assert forked == separate


def test_a_forked_kernel_is_its_own_process(fork: Callable[..., Driven], tmp_path: Path) -> None:
    folder = tmp_path / "note folder"
    folder.mkdir()
    first = fork(cwd=folder, env={"VAULT_RUNNER_NOTE": str(folder / "a.md"), "DEVICE_HINT": "cpu"})
    second = fork()
    pid = first.value("__import__('os').getpid()")
    assert pid == first.kernel.pid and pid != second.value("__import__('os').getpid()")
    assert first.value("__import__('os').getcwd()") == str(folder)
    assert first.value("__import__('os').environ['VAULT_RUNNER_NOTE']") == str(folder / "a.md")
    assert first.value("__import__('os').environ.get('DEVICE_HINT')") == "cpu"
    assert second.value("__import__('os').environ.get('DEVICE_HINT')") is None
    # The note's folder comes first on sys.path, as in `python -m ipykernel_launcher` there.
    assert first.value("__import__('sys').path[0]") == str(folder)
    assert first.value("__import__('os').getpgid(0) == __import__('os').getpid()") is True


def test_matplotlib_uses_the_kernels_own_config_folder(fork: Callable[..., Driven], tmp_path: Path) -> None:
    """MPLCONFIGDIR is per kernel (the sandbox gives each its own): not the template's."""
    own = tmp_path / "mpl"
    own.mkdir()
    kernel = fork(env={"MPLCONFIGDIR": str(own)})
    assert kernel.value("__import__('matplotlib').get_configdir()") == str(own)
    assert kernel.value("__import__('matplotlib').get_cachedir()") == str(own)


def test_plots_and_magics_work_as_in_a_started_kernel(fork: Callable[..., Driven]) -> None:
    kernel = fork()
    result = kernel.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert result["reply"]["status"] == "ok"
    assert any("image/png" in m["content"].get("data", {}) for m in result["outputs"]), result["outputs"]
    timed = kernel.run("%time x = sum(range(10))")
    assert timed["reply"]["status"] == "ok"


def test_interrupt_stops_a_busy_loop(fork: Callable[..., Driven]) -> None:
    kernel = fork()
    # stop_on_error=False: else ipykernel aborts a request that comes in before its abort
    # window closes (a race of its own, seen under load), and the check below reads "aborted".
    msg_id = kernel.client.execute("while True: pass", stop_on_error=False)
    time.sleep(0.5)
    kernel.kernel.interrupt()
    deadline = time.monotonic() + 20
    reply = None
    while time.monotonic() < deadline:
        try:
            message = kernel.client.get_shell_msg(timeout=1)
        except queue.Empty:
            continue
        if message["parent_header"].get("msg_id") == msg_id:
            reply = message["content"]
            break
    assert reply is not None and reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert kernel.value("1 + 1") == 2  # the kernel lives on


def test_a_killed_kernel_is_detected(fork: Callable[..., Driven]) -> None:
    kernel = fork()
    assert kernel.kernel.is_alive()
    os.kill(kernel.kernel.pid, signal.SIGKILL)  # from outside, as the OOM killer would
    assert kernel.kernel.wait(10) == -signal.SIGKILL
    assert not kernel.kernel.is_alive()


def test_a_kernel_that_exits_reports_its_status(fork: Callable[..., Driven]) -> None:
    kernel = fork()
    kernel.client.execute("import os; os._exit(3)")
    assert kernel.kernel.wait(10) == 3


def test_a_spare_is_initialised_ahead_and_then_placed_for_its_note(
    template: KernelTemplate, fork: Callable[..., Driven], tmp_path: Path
) -> None:
    """A spare kernel binds its sockets before any note is known; the note that takes it
    gets its own folder, environment, sys.path and random numbers, as a fork on demand does."""
    template.keep_spares(2)
    try:
        deadline = time.monotonic() + TIMEOUT
        while template.spares_ready() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert template.spares_ready() == 2
        ready = {k.pid for k in template.kernels()}
        folder = tmp_path / "nota"
        folder.mkdir()
        first = fork(cwd=folder, env={"VAULT_RUNNER_NOTE": str(folder / "a.md"), "SOLO_ESTA": "1"})
        second = fork()
        assert {first.kernel.pid, second.kernel.pid} <= ready  # both were spares
        assert first.value("__import__('os').getcwd()") == str(folder)
        assert first.value("__import__('sys').path[0]") == str(folder)
        assert first.value("str(get_ipython().history_manager.dir_hist[0])") == str(folder)
        assert first.value("__import__('os').environ.get('SOLO_ESTA')") == "1"
        assert second.value("__import__('os').environ.get('SOLO_ESTA')") is None
        assert first.value("__import__('os').environ.get('PAGER')") == "cat"  # the shell's own, kept
        assert first.value(RANDOMS) != second.value(RANDOMS)
        first.run("dejado = 1")
        assert second.value("'dejado' in globals()") is False
    finally:
        template.keep_spares(0)


def test_hash_seed_must_match_the_template(template: KernelTemplate, tmp_path: Path) -> None:
    with pytest.raises(ForkUnavailable, match="PYTHONHASHSEED"):
        template.fork(tmp_path, {"PYTHONHASHSEED": "0"})
    other = TemplateKey.for_launch(tmp_path, "plain", {}, network=False)
    assert template.refusal(other) is not None


def test_kernel_session_drives_a_forked_kernel(template: KernelTemplate, tmp_path: Path) -> None:
    """kernel.KernelSession unchanged, with a ForkedKernelManager: outputs, timeout, death."""
    from vault_runner.kernel.session import KernelSession

    session = KernelSession(tmp_path, {"VAULT_RUNNER_NOTE": "x.md"}, runtime_dir=template.runtime_dir)
    session.manager = ForkedKernelManager(
        template,
        transport="ipc",
        ip=str(session.runtime_dir / "k"),
        connection_file=str(session.runtime_dir / "kernel.json"),
        replace_env=False,
    )
    try:
        session.start()
        pid = session.kernel_pid()
        assert pid is not None and pid != template.pid
        done = session.execute("print('hi'); 6 * 7", timeout=30)
        assert done.status == "ok"
        assert any(o.get("text") == "hi\n" for o in done.outputs)
        assert any(o.get("data", {}).get("text/plain") == "42" for o in done.outputs)
        timed_out = session.execute("while True: pass", timeout=1.0)
        assert timed_out.status == "timeout" and not timed_out.kernel_restarted
        died = session.execute("import os; os._exit(1)", timeout=30)
        assert died.status == "dead" and died.kernel_restarted
        assert session.kernel_pid() != pid
        assert session.execute("1", timeout=30).status == "ok"
    finally:
        session.shutdown()
    assert _wait_gone(pid)


def test_closing_the_template_leaves_no_process(tmp_path: Path) -> None:
    tpl = KernelTemplate(env=dict(os.environ), cwd=tmp_path, runtime_dir=tmp_path, preload=("ipykernel.kernelapp",))
    kernels: list[ForkedKernel] = []
    try:
        tpl.start()
        template_pid = tpl.pid
        assert template_pid is not None
        kernels = [tpl.fork(tmp_path) for _ in range(2)]
        pids = [k.pid for k in kernels]
        assert all(_alive(p) for p in pids)
    finally:
        tpl.close()
    assert all(_wait_gone(p) for p in [template_pid, *pids])
    with pytest.raises(ForkUnavailable):
        tpl.fork(tmp_path)


@pytest.mark.parametrize("tier", ["bubblewrap", "landlock"])
def test_forked_kernels_stay_in_the_templates_sandbox(tier: str, tmp_path: Path) -> None:
    """The template is launched with the sandbox's own command prefix; its kernels inherit it."""
    from vault_runner.errors import SandboxError
    from vault_runner.kernel.sandbox import Policy, Sandbox
    from vault_runner.kernel.sandbox.probe import probe

    found = probe()
    if (tier == "bubblewrap" and found.bwrap is None) or (tier == "landlock" and not found.landlock_abi):
        pytest.skip(f"no {tier} here")
    vault = tmp_path / "vault"
    (vault / "notes").mkdir(parents=True)
    runtime = tmp_path / "rt"
    runtime.mkdir()
    try:
        sandbox = Sandbox(Policy(vault=vault, cwd=vault, max_tasks=None), tier=tier)
    except SandboxError as exc:
        pytest.skip(str(exc))
    tpl = KernelTemplate(
        TemplateKey.for_launch(vault, tier, os.environ),
        launch_prefix=[],
        env={},
        cwd=vault,
        runtime_dir=runtime,
        startup_timeout=180,
    )
    kernel = None
    try:
        sandbox.setup(runtime, lambda: tpl.pid)
        tpl.launch_prefix = sandbox.wrap([])
        tpl.env = {**os.environ, **sandbox.env(), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
        tpl.start()
        kernel = Driven(tpl.fork(vault / "notes", {"VAULT_RUNNER_NOTE": str(vault / "notes" / "a.md")}))
        secret = tmp_path / "secret.txt"
        secret.write_text("s")
        # The kernel cannot read what lies outside its sandbox, writes the vault and nothing else.
        assert kernel.run(f"open({str(secret)!r}).read()")["reply"]["status"] == "error"
        assert kernel.value("open('out.txt', 'w').write('x')") == 1
        assert (vault / "notes" / "out.txt").read_text() == "x"
        outside = tmp_path / "outside.txt"
        kernel.run(f"open({str(outside)!r}, 'w').write('x')")
        assert not outside.exists()  # refused (Landlock) or written into a private tmpfs (bubblewrap)
        if tier == "bubblewrap":
            assert kernel.kernel.ns_pid != kernel.kernel.pid  # in bubblewrap's pid namespace
        assert kernel.value("__import__('os').getpid()") == kernel.kernel.ns_pid
        kernel.kernel.interrupt()  # SIGINT reaches it from outside the namespace
        assert kernel.value("2 + 2") == 4
    finally:
        if kernel is not None:
            kernel.close()
        tpl.close()
        sandbox.close()
    assert _wait_gone(tpl.pid or 0)
