"""The engine: load a note, run it in a fresh kernel, write its outputs back, clean it.

load.py decides whether and how a note runs; run.py executes it; writeback.py is the one
place a byte of a note changes on the engine's behalf; clean.py removes regions.

The names below are imported on first use, so that a command that starts no kernel
(`check`) never imports jupyter_client by importing this package.
"""

from __future__ import annotations

from vault_runner.lazy import exports

__all__ = (
    "BlockReport",
    "BlockResult",
    "Engine",
    "Event",
    "EventSink",
    "Kernel",
    "KernelFactory",
    "Loaded",
    "NoteReport",
    "PlannedBlock",
    "Run",
    "Selection",
    "block_report",
    "clean_note",
    "close_default_kernels",
    "could_have_blocks",
    "default_kernel_factory",
    "kernel_env",
    "load",
    "may_be_opted_in",
    "needs_torch",
    "select",
    "setup_code",
)

_WHERE = {
    "BlockReport": "vault_runner.model",
    "BlockResult": "vault_runner.engine.run",
    "Engine": "vault_runner.engine.run",
    "Event": "vault_runner.model",
    "EventSink": "vault_runner.model",
    "Kernel": "vault_runner.kernel.factory",
    "KernelFactory": "vault_runner.kernel.factory",
    "Loaded": "vault_runner.engine.loading",
    "NoteReport": "vault_runner.model",
    "PlannedBlock": "vault_runner.core.plan",
    "Run": "vault_runner.engine.run",
    "Selection": "vault_runner.engine.loading",
    "block_report": "vault_runner.engine.loading",
    "clean_note": "vault_runner.engine.clean",
    "close_default_kernels": "vault_runner.kernel.factory",
    "could_have_blocks": "vault_runner.engine.loading",
    "default_kernel_factory": "vault_runner.kernel.factory",
    "kernel_env": "vault_runner.kernel.setup",
    "load": "vault_runner.engine.loading",
    "may_be_opted_in": "vault_runner.engine.loading",
    "needs_torch": "vault_runner.engine.loading",
    "select": "vault_runner.engine.loading",
    "setup_code": "vault_runner.kernel.setup",
}


__getattr__ = exports(__name__, _WHERE)
