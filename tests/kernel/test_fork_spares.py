"""A note that takes a spare kernel gets what a kernel forked for it on demand gets.

Spares are made before any note is known: each joins a cgroup of its own while it waits
(the note's sandbox adopts it and puts the note's caps on it, instead of paying ~10 ms to
move the kernel), and has a client connected ahead (the note's first request is queued,
no readiness wait). These tests hold that to the note's limits and outputs, in every
sandbox tier this machine has, with a real template, real cgroups, no mocks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import available_tiers
from vault_runner.kernel.fork.common import fork_disabled_reason
from vault_runner.kernel.fork.factory import ForkFactory
from vault_runner.kernel.fork.forked import ForkedKernelManager
from vault_runner.kernel.fork.session import ForkedSession
from vault_runner.kernel.sandbox import Policy, Sandbox
from vault_runner.kernel.sandbox.cgroup import Cgroup
from vault_runner.kernel.sandbox.policy import default_memory

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        fork_disabled_reason() is not None, reason=f"kernels are not forked here: {fork_disabled_reason()}"
    ),
]

CAP = 40  # processes + threads of the note's kernel

# Starts threads until the cap refuses one; prints how many it started.
THREADS = """
import threading, time
started = 0
try:
    for _ in range(200):
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        started += 1
except RuntimeError:
    pass
print(started)
"""


def _cgroups_here(root: Path) -> bool:
    made = Cgroup.create(Policy(vault=root, cwd=root, max_tasks=CAP))
    if made is None:
        return False
    made.remove()
    return True


@pytest.fixture(params=available_tiers())
def factory_and_policy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ForkFactory, Policy, str]]:
    root = tmp_path.resolve()
    (root / "N").mkdir()
    if not _cgroups_here(root):
        pytest.skip("this process cannot create a cgroup a kernel can join here")
    factory = ForkFactory(spares=1)
    try:
        # As a note's policy is (policy_from_options): its memory cap and the budget of all
        # kernels are the default budget's size, unless it sets its own cap.
        budget = default_memory()[0]
        policy = Policy(
            vault=root, cwd=root / "N", network=True, device="cpu", max_tasks=CAP, memory=budget, budget=budget
        )
        yield factory, policy, request.param
    finally:
        factory.close()


def _session(factory: ForkFactory, policy: Policy, tier: str) -> ForkedSession:
    sandbox = Sandbox(policy, tier)
    session = factory.session(sandbox, policy.cwd, {"VAULT_RUNNER_VAULT": str(policy.vault)})
    session.start()
    assert session.origin == "forked", session.fallback
    return session


def _spare_ready(session: ForkedSession) -> None:
    assert isinstance(session.manager, ForkedKernelManager)
    template = session.manager.template
    deadline = time.monotonic() + 120
    while template.spares_ready() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert template.spares_ready() >= 1, "the template made no spare"


def _session_from_a_spare(factory: ForkFactory, policy: Policy, tier: str) -> ForkedSession:
    """A note's session that took a spare: a first note starts the template, then a spare is made."""
    first = _session(factory, policy, tier)
    try:
        _spare_ready(first)
    finally:
        first.shutdown()
    return _session(factory, policy, tier)


def _threads_started(session: ForkedSession) -> int:
    done = session.execute(THREADS, timeout=120)
    assert done.status == "ok", done.outputs
    return int("".join(o.get("text", "") for o in done.outputs if o.get("name") == "stdout").split()[-1])


def test_a_note_that_takes_a_spare_is_held_by_its_own_process_cap(
    factory_and_policy: tuple[ForkFactory, Policy, str],
) -> None:
    session = _session_from_a_spare(*factory_and_policy)
    try:
        sandbox = session.sandbox
        assert sandbox is not None and sandbox.cgroup is not None
        forked = session.manager.forked if isinstance(session.manager, ForkedKernelManager) else None
        assert forked is not None and forked.cgroup is None, "the note's sandbox did not take the spare's cgroup"
        assert forked.pid in sandbox.cgroup.procs()
        assert (sandbox.cgroup.path / "pids.max").read_text().strip() == str(CAP)
        assert _threads_started(session) < CAP
        # A restart's kernel (a spare again, or forked on demand) is held by the cap too.
        _spare_ready(session)
        session.restart()
        assert session.manager.forked is not None
        assert session.manager.forked.pid in sandbox.cgroup.procs()
        assert _threads_started(session) < CAP
    finally:
        session.shutdown()


def test_a_spare_connected_ahead_loses_no_output_of_the_first_block(
    factory_and_policy: tuple[ForkFactory, Policy, str],
) -> None:
    session = _session_from_a_spare(*factory_and_policy)
    try:
        assert isinstance(session.manager, ForkedKernelManager) and session.manager.forked is not None
        assert session.manager.forked.connected is None, "the client connected ahead was not taken"
        done = session.execute("import sys\nfor i in range(50): print(i)\nprint('err', file=sys.stderr)\n6 * 7", 60)
        text = "".join(o.get("text", "") for o in done.outputs if o.get("name") == "stdout")
        assert text.split() == [str(i) for i in range(50)]
        assert any(o.get("name") == "stderr" and "err" in o.get("text", "") for o in done.outputs)
        assert any(o.get("output_type") == "execute_result" for o in done.outputs)
    finally:
        session.shutdown()
