"""The kernel layer: one Jupyter kernel, its sandbox, how kernels are made, a warm pool.

limits.py (timeouts, output caps) · outputs.py (iopub messages to outputs) · session.py
(KernelSession: start, execute, interrupt, restart) · setup.py (launch env, prelude and
setup code) · factory.py (the Kernel protocol, the default factory) · pool.py (warm
kernels for the live runner) · sandbox/ (how a kernel is launched: tier, limits, GPUs).

Nothing here imports the engine or anything above it. Importing this package imports
nothing else: `vault_runner.kernel.sandbox` must not pull in jupyter_client.
"""

from __future__ import annotations

from typing import Any

__all__ = ()

# Names of the old vault_runner/kernel.py module, served on first use while the rest of the
# tree moves to `vault_runner.kernel.session` (a refactor shim; the lead removes it).
_MOVED = {"Execution": "vault_runner.kernel.session", "KernelSession": "vault_runner.kernel.session"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
