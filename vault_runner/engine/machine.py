"""What this machine offers kernels (sandbox tier, GPUs, limits, how kernels are made), for
`doctor` and the API status.

Front ends ask here rather than probing the sandbox themselves: the kernel layer stays below
the engine, and this is the engine's view of it.
"""

from __future__ import annotations

from typing import Any

from vault_runner.kernel.fork.common import FORK_ENV, fork_disabled_reason, shared_shm_reason
from vault_runner.kernel.sandbox.doctor import doctor_report
from vault_runner.kernel.sandbox.gpu import nvidia_device_nodes, visible_gpus
from vault_runner.kernel.sandbox.probe import probe

__all__ = ("doctor_report", "gpus", "kernel_start", "nvidia_device_nodes", "sandbox_tier")


def sandbox_tier() -> dict[str, Any]:
    """The sandbox tier kernels get here and why (probed once, cached by the sandbox)."""
    found = probe()
    return {"tier": found.tier, "reason": found.reason}


def gpus() -> list[str]:
    """The GPUs kernels may be placed on."""
    return visible_gpus()


def kernel_start() -> str:
    """How a note's kernel is made here: forked from a warm template, or started, and why."""
    why = fork_disabled_reason()
    if why is not None:
        return f"started for each note ({why})"
    text = f"forked from a warm template per vault and sandbox policy ({FORK_ENV}=0: start each)"
    found = probe()
    if found.tier == "plain":
        return text
    shared = shared_shm_reason(found.tier, found.bwrap_userns, found.landlock_mounts)
    if shared is None:
        return f"{text}; each with its own /dev/shm, ptys and IPC namespace"
    return f"{text}; kernels of one template share its /dev/shm, ptys and IPC namespace ({shared})"
