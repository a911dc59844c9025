"""The kernel layer: one Jupyter kernel, its sandbox, how kernels are made, a warm pool.

limits.py (timeouts, output caps) · outputs.py (iopub messages to outputs) · session.py
(KernelSession: start, execute, interrupt, restart) · setup.py (launch env, prelude and
setup code) · factory.py (the Kernel protocol, the default factory) · pool.py (warm
kernels for the live runner) · sandbox/ (how a kernel is launched: tier, limits, GPUs).

Nothing here imports the engine or anything above it. Importing this package imports
nothing else: `vault_runner.kernel.sandbox` must not pull in jupyter_client.
"""

from __future__ import annotations
