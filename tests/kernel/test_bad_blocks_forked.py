"""The bad-block tests of test_bad_blocks.py, unchanged, in a kernel forked from a template.

The module's kernel comes from the fork factory (kernel/fork/factory.py) instead of a
started KernelSession, with the same sandbox policy: every runaway and hostile block must
be contained exactly as in a started kernel, in whatever tier this machine (or
VAULT_RUNNER_SANDBOX) gives. The kernel must really be forked, or this proves nothing.
The CLI cases are left to test_bad_blocks.py: the CLI forks its kernels by default.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel import test_bad_blocks
from tests.kernel.test_bad_blocks import *  # noqa: F403  (the tests themselves)
from tests.kernel.test_bad_blocks import FOLDER, MEMORY_CAP, TASK_CAP, assert_next_note_runs, note_text, run_note
from vault_runner.kernel.fork.common import fork_disabled_reason
from vault_runner.kernel.fork.factory import ForkFactory
from vault_runner.kernel.fork.session import ForkedSession
from vault_runner.kernel.sandbox import Policy, Sandbox

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        fork_disabled_reason() is not None, reason=f"kernels are not forked here: {fork_disabled_reason()}"
    ),
]

del test_bad_block_through_the_cli  # noqa: F821  (a CLI run: test_bad_blocks.py has it)


@pytest.fixture(scope="module")
def session(vault_root: Path) -> Iterator[ForkedSession]:
    policy = Policy(
        vault=vault_root.resolve(),
        cwd=(vault_root / FOLDER).resolve(),
        network=False,
        memory=MEMORY_CAP,
        max_tasks=TASK_CAP,
        device="cpu",
    )
    factory = ForkFactory()
    kernel = factory.session(Sandbox(policy), policy.cwd, {"VAULT_RUNNER_VAULT": str(policy.vault)})
    try:
        kernel.start()
        assert kernel.origin == "forked", kernel.fallback
        assert test_bad_blocks.TIER == kernel.sandbox.tier if kernel.sandbox else False
        yield kernel
    finally:
        kernel.shutdown()
        factory.close()


def test_fork_bomb_is_bounded_by_the_process_cap(  # replaces test_bad_blocks.py's (no time window)
    vault_root: Path, session: ForkedSession, process_cap: int | None
) -> None:
    """A bomb that must outgrow the cap, however slowly forks go: a binary tree 9 levels
    deep (511 processes, each alive until its children end, against a cap of TASK_CAP)
    with no deadline. A fork of a torch-loaded kernel takes ~0.2 s under load, so a bomb
    bounded by seconds may end before it reaches the cap and prove nothing; this one can
    only end without a refusal by holding more than TASK_CAP processes at once. The kernel
    reports the refusal, nothing of the bomb is left running, the next note runs."""
    if process_cap is None:
        pytest.skip("the process cap is not in force, so the fork bomb is not run")
    assert 2**9 - 1 > TASK_CAP
    code = """
    import errno, os
    read, write = os.pipe()
    root, depth = os.getpid(), 0
    children = []
    while depth < 8 and len(children) < 2:
        try:
            pid = os.fork()
        except OSError as exc:
            os.write(write, errno.errorcode[exc.errno].encode() + b" ")
            break
        if pid == 0:
            depth, children = depth + 1, []
        else:
            children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    if os.getpid() != root:
        os._exit(0)
    os.close(write)
    refusals = os.read(read, 1 << 20).split()
    print(len(refusals), "forks refused")
    if refusals:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
    """
    before = len(session.sandbox.pids()) if session.sandbox else 0
    ran = run_note(vault_root, session, "Bomba", note_text(code, timeout=120))
    assert ran.statuses() == ["error"], ran.regions
    assert "BlockingIOError" in ran.regions and "forks refused" in ran.regions
    if session.sandbox is not None:
        assert len(session.sandbox.pids()) <= before  # every process of the bomb has ended
    assert_next_note_runs(vault_root, session)
