"""The warm kernel pool with real kernels: warm spares, the cap, LRU, idle shutdown, death."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_note_vault
from vault_runner.core.options import DEFAULTS
from vault_runner.disk.vault import load_vault
from vault_runner.errors import KernelStartError
from vault_runner.kernel.factory import Kernel, default_kernel_factory
from vault_runner.kernel.pool import KernelPool, Slot
from vault_runner.model import Event

pytestmark = pytest.mark.kernel

WAIT = 120.0  # a guard against hanging, not a speed requirement


def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run(slot: Slot, code: str) -> str:
    execution = slot.kernel.execute(code, 60.0)
    assert execution.status == "ok", execution.outputs
    return "".join(o.get("text", "") for o in execution.outputs if o.get("output_type") == "stream")


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    notes = {f"{folder}/{name}.md": "# note\n" for folder in ("uno", "dos") for name in ("a", "b", "c")}
    return make_note_vault(tmp_path / "vault", notes)


@contextmanager
def pool_of(root: Path, **options: Any) -> Iterator[tuple[KernelPool, list[Event]]]:
    events: list[Event] = []
    pool = KernelPool(load_vault(root), on_event=events.append, check_interval=0.2, **options)
    try:
        pool.start()
        yield pool, events
    finally:
        pool.close()


def test_a_spare_is_warm_and_moves_into_the_notes_folder(vault: Path) -> None:
    note = vault / "uno" / "a.md"
    with pool_of(vault, max_kernels=2, spares=1) as (pool, events):
        assert pool.wait_for_spares(WAIT)
        slot = pool.acquire(note, DEFAULTS)
        try:
            # torch was imported before the note was known; the kernel now works in its folder.
            shown = run(
                slot,
                "import os, sys\nprint('torch' in sys.modules)\nprint(os.getcwd())\n"
                "print(os.environ['VAULT_RUNNER_NOTE'])",
            )
            assert shown.split("\n")[:3] == ["True", str(note.parent), str(note)]
            assert any(e.kind == "kernel-assigned" and e.data.get("warm") for e in events)
        finally:
            pool.release(slot)
        # A new spare is started for the next note, within the cap.
        assert pool.wait_for_spares(WAIT)
        assert pool.stats()["kernels"] == 2


def test_spares_are_forked_from_a_template_not_started(vault: Path) -> None:
    from vault_runner.kernel.fork.common import fork_disabled_reason

    if fork_disabled_reason() is not None:
        pytest.skip(f"kernels are not forked here: {fork_disabled_reason()}")
    with pool_of(vault, max_kernels=2, spares=2) as (pool, _):
        assert pool.wait_for_spares(WAIT)
        first = pool.acquire(vault / "uno" / "a.md", DEFAULTS)
        second = pool.acquire(vault / "dos" / "b.md", DEFAULTS)
        try:
            assert getattr(first.kernel, "origin", None) == "forked"
            assert getattr(second.kernel, "origin", None) == "forked"
            template = first.kernel.manager.template  # type: ignore[attr-defined]
            assert first.pid not in {None, template.pid, second.pid}
            # Two notes, two processes: a name one defines is not in the other.
            run(first, "dejado = 1")
            assert run(second, "print('dejado' in globals())").strip() == "False"
        finally:
            pool.release(first)
            pool.release(second)


def test_the_cap_holds_and_the_least_recently_used_kernel_makes_room(vault: Path) -> None:
    a, b, c = (vault / "uno" / f"{n}.md" for n in "abc")
    counts: list[int] = []
    with pool_of(vault, max_kernels=2, spares=0) as (pool, events):
        slot_a = pool.acquire(a, DEFAULTS)
        pool.release(slot_a)
        slot_b = pool.acquire(b, DEFAULTS)
        pool.release(slot_b)
        counts.append(pool.stats()["kernels"])
        assert pool.lease(slot_a)  # a is used again: b is now the least recently used
        pool.release(slot_a)
        slot_c = pool.acquire(c, DEFAULTS)
        counts.append(pool.stats()["kernels"])
        try:
            assert slot_b.closed and "make room for c.md" in (slot_b.reason or "")
            assert not slot_a.closed
            assert not pool.lease(slot_b)  # the session of b learns its kernel is gone
            assert any(e.kind == "kernel-evicted" for e in events)
        finally:
            pool.release(slot_c)
    assert max(counts) <= 2


def test_a_busy_pool_makes_a_note_wait_rather_than_exceed_the_cap(vault: Path) -> None:
    a, b = vault / "uno" / "a.md", vault / "dos" / "b.md"
    with pool_of(vault, max_kernels=1, spares=0) as (pool, _):
        slot_a = pool.acquire(a, DEFAULTS)
        got: list[Slot] = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire(b, DEFAULTS)))
        waiter.start()
        time.sleep(0.5)
        assert not got and pool.stats()["kernels"] == 1
        pool.release(slot_a)
        waiter.join(WAIT)
        assert got and got[0].owner == b and slot_a.closed
        # While b runs, a note that cannot wait is told why.
        with pytest.raises(KernelStartError, match="a.md: every kernel is busy"):
            pool.acquire(a, DEFAULTS, timeout=0.3)
        pool.release(got[0])


def test_an_idle_kernel_is_shut_down_after_the_idle_timeout(vault: Path) -> None:
    with pool_of(vault, max_kernels=2, spares=0, idle_timeout=0.5) as (pool, events):
        slot = pool.acquire(vault / "uno" / "a.md", DEFAULTS)
        pool.release(slot)
        assert eventually(lambda: slot.closed)
        assert "0.5 s idle" in (slot.reason or "")
        assert pool.stats()["kernels"] == 0


def test_a_kernel_that_dies_while_idle_is_dropped_with_the_reason(vault: Path) -> None:
    with pool_of(vault, max_kernels=2, spares=1) as (pool, events):
        assert pool.wait_for_spares(WAIT)
        slot = pool.acquire(vault / "uno" / "a.md", DEFAULTS)
        pool.release(slot)
        assert slot.pid is not None
        os.kill(slot.pid, signal.SIGKILL)
        assert eventually(lambda: slot.closed)
        assert slot.died and "stopped while the note was idle" in (slot.reason or "")
        assert eventually(lambda: any(e.kind == "kernel-stopped" and e.data.get("died") for e in events))
        # The next note gets a working kernel.
        other = pool.acquire(vault / "dos" / "a.md", DEFAULTS)
        try:
            assert run(other, "print(6 * 7)").strip() == "42"
        finally:
            pool.release(other)


def test_a_note_with_other_launch_options_gets_its_own_kernel(vault: Path) -> None:
    calls: list[tuple[Path, dict[str, str], dict[str, Any]]] = []

    def recording_factory(cwd: Path, env: dict[str, str], options: Mapping[str, Any]) -> Kernel:
        calls.append((cwd, dict(env), dict(options)))
        return default_kernel_factory(cwd, env, options)

    note = vault / "dos" / "c.md"
    offline = {**DEFAULTS, "network": False, "seed": 3}
    with pool_of(vault, max_kernels=2, spares=1, factory=recording_factory) as (pool, _):
        assert pool.wait_for_spares(WAIT)
        spare_calls = len(calls)
        slot = pool.acquire(note, offline)
        try:
            assert len(calls) == spare_calls + 1
            cwd, env, options = calls[-1]
            assert cwd == note.parent and env["VAULT_RUNNER_NOTE"] == str(note) and options["network"] is False
            assert slot.key != pool.default_key
            assert pool.stats()["spares"] == 1  # the warm spare is still there for default notes
        finally:
            pool.release(slot)
        # A seed alone does not need its own kernel: it is set when the note is prepared.
        seeded = pool.acquire(vault / "dos" / "a.md", {**DEFAULTS, "seed": 3})
        try:
            assert seeded.key == pool.default_key
        finally:
            pool.release(seeded)


def test_a_factory_that_fails_gives_a_clear_error_and_no_busy_retry(vault: Path) -> None:
    calls: list[float] = []

    def broken(cwd: Path, env: dict[str, str], options: Mapping[str, Any]) -> Kernel:
        calls.append(time.monotonic())
        raise RuntimeError("no python here")

    with pool_of(vault, max_kernels=2, spares=1, factory=broken) as (pool, events):
        with pytest.raises(KernelStartError, match="a.md: the kernel could not be started .no python here"):
            pool.acquire(vault / "uno" / "a.md", DEFAULTS)
        time.sleep(1.5)
        # The spare was tried once and then waits (START_RETRY_DELAY), instead of spinning.
        assert len(calls) <= 3
        logs = [e for e in events if e.kind == "log"]
        assert len(logs) == 1 and "retrying in" in logs[0].data["message"]


def test_a_deterministic_note_gets_the_launch_environment_render_gives_it(vault: Path) -> None:
    envs: list[dict[str, str]] = []

    def recording_factory(cwd: Path, env: dict[str, str], options: Mapping[str, Any]) -> Kernel:
        envs.append(dict(env))
        return default_kernel_factory(cwd, env, options)

    with pool_of(vault, max_kernels=1, spares=0, factory=recording_factory) as (pool, _):
        slot = pool.acquire(vault / "uno" / "a.md", {**DEFAULTS, "deterministic": True})
        try:
            assert envs[-1]["PYTHONHASHSEED"] == "0" and envs[-1]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        finally:
            pool.release(slot)
