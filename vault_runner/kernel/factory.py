"""How a kernel is made: the `Kernel` protocol the engine and the pool drive, and the
default factory: a kernel in the sandbox the note's options ask for, forked from a warm
template (kernel/fork/factory.py) unless `VAULT_RUNNER_FORK=0` or the platform cannot,
else a `KernelSession` started the normal way."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from vault_runner.errors import KernelDied, SandboxError
from vault_runner.kernel.session import Execution, KernelSession

__all__ = (
    "Kernel",
    "KernelFactory",
    "close_default_kernels",
    "default_kernel_factory",
    "prewarm",
    "started_kernel_factory",
)


class Kernel(Protocol):
    """What the engine and the pool need of a kernel (KernelSession, or a test double)."""

    def start(self) -> None: ...
    def shutdown(self) -> None: ...
    def execute(
        self,
        code: str,
        timeout: float,
        on_output: Any = None,
        silent: bool = False,
        user_expressions: dict[str, str] | None = None,
    ) -> Execution: ...


KernelFactory = Callable[[Path, dict[str, str], Mapping[str, Any]], Kernel]


def default_kernel_factory(cwd: Path, env: dict[str, str], note_options: Mapping[str, Any]) -> Kernel:
    """A kernel in the sandbox (kernel/sandbox/) that the note's options ask for: network,
    memory, device (GPU placement and device nodes); forked from a template where it can be."""
    from vault_runner.kernel.fork.common import fork_disabled_reason

    if fork_disabled_reason() is None:
        from vault_runner.kernel.fork.factory import shared_fork_factory

        return shared_fork_factory()(cwd, env, note_options)
    return started_kernel_factory(cwd, env, note_options)


def started_kernel_factory(cwd: Path, env: dict[str, str], note_options: Mapping[str, Any]) -> Kernel:
    """A kernel started the normal way (a new interpreter) in the note's sandbox."""
    from vault_runner.kernel.sandbox import Sandbox, policy_from_options  # the sandbox costs an import

    try:
        sandbox = Sandbox(policy_from_options(cwd, env, note_options))
    except (SandboxError, ValueError) as exc:
        raise KernelDied(f"the kernel's sandbox could not be set up: {exc}") from None
    return KernelSession(cwd, env, sandbox=sandbox)


def prewarm(factory: KernelFactory, vault_root: Path, note_options: Mapping[str, Any]) -> None:
    """Let `factory` get ready for a note of these options (the fork factory starts its
    template on a thread); nothing for a factory that has nothing to prepare."""
    if factory is default_kernel_factory:
        from vault_runner.kernel.fork.common import fork_disabled_reason

        if fork_disabled_reason() is not None:
            return
        from vault_runner.kernel.fork.factory import shared_fork_factory

        factory = shared_fork_factory()
    ready = getattr(factory, "prewarm", None)
    if ready is not None:
        ready(vault_root, note_options)


def close_default_kernels() -> None:
    """End what the default factory keeps warm (its kernel templates), once a command that
    runs notes is done; nothing for a factory that was never used."""
    import sys

    fork = sys.modules.get("vault_runner.kernel.fork.factory")
    if fork is not None:
        fork.close_shared_fork_factory()
