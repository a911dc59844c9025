"""How a kernel is made: the `Kernel` protocol the engine and the pool drive, and the
default factory, a `KernelSession` in the sandbox the note's options ask for."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from vault_runner.errors import KernelDied, SandboxError
from vault_runner.kernel.session import Execution, KernelSession

__all__ = ("Kernel", "KernelFactory", "default_kernel_factory")


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
    memory, device (GPU placement and device nodes)."""
    from vault_runner.kernel.sandbox import Sandbox, policy_from_options  # the sandbox costs an import

    try:
        sandbox = Sandbox(policy_from_options(cwd, env, note_options))
    except (SandboxError, ValueError) as exc:
        raise KernelDied(f"the kernel's sandbox could not be set up: {exc}") from None
    return KernelSession(cwd, env, sandbox=sandbox)
