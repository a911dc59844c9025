"""How the engine gets a kernel: the Kernel protocol, the default factory, launch env, setup code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vault_runner.kernel.factory import Kernel, KernelFactory, default_kernel_factory
from vault_runner.kernel.setup import kernel_env, setup_code

if TYPE_CHECKING:
    from vault_runner.engine.load import Loaded

__all__ = ("Kernel", "KernelFactory", "default_kernel_factory", "kernel_env", "needs_torch", "setup_code")


def needs_torch(loaded: Loaded) -> bool:
    return any("torch" in p.block.code or "DEVICE" in p.block.code for p in loaded.runnable)
