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
from tests.kernel.test_bad_blocks import FOLDER, MEMORY_CAP, TASK_CAP
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
