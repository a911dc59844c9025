"""What the fork factory's two halves share: settings, the template key, availability."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHILD_SCRIPT = Path(__file__).with_name("child.py")

# What every kernel imports. Modules only: nothing here may start a thread, a ZMQ context
# or CUDA. matplotlib.pyplot is imported but its backend is not resolved (that happens at
# the first figure, in the kernel, after MPLBACKEND is known), and matplotlib_inline's
# backend module is left out on purpose: it wires itself into the IPython shell when it
# is imported, and there is no shell in the template.
DEFAULT_PRELOAD = (
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.comm",
    "IPython",
    "IPython.core.interactiveshell",
    "IPython.core.completer",
    "IPython.core.magics",
    "IPython.core.completerlib",
    "ipykernel.debugger",  # debugpy and pydevd: 0.2 s of every kernel start
    "tornado.gen",
    "tornado.locks",
    "tornado.queues",
    "tornado.platform.asyncio",
    "faulthandler",
    "jedi",
    "numpy",
    "torch",
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib.backends.backend_agg",
    "PIL.Image",
)
# As kernel.py's launch: no IPython history database. The parent poller is off (the
# kernel dies with its template through PR_SET_PDEATHSIG instead): a parent of 1 turns
# it off and, unlike 0, does not print ipykernel's "use --existing" banner.
DEFAULT_KERNEL_ARGS = ("--HistoryManager.enabled=False", "--IPKernelApp.parent_handle=1")
DEFAULT_MPLBACKEND = "module://matplotlib_inline.backend_inline"
STARTUP_TIMEOUT = 120.0
FORK_TIMEOUT = 30.0
MAX_MESSAGE = 1 << 20


FORK_ENV = "VAULT_RUNNER_FORK"  # 0: start every kernel the normal way


def fork_disabled_reason() -> str | None:
    """None when kernels are forked, else one line saying why they are started."""
    if os.environ.get(FORK_ENV, "").strip().lower() in {"0", "false", "no", "off"}:
        return f"{FORK_ENV}=0"
    return fork_unavailable_reason()


def fork_unavailable_reason() -> str | None:
    """None when this platform can fork kernels from a template, else one line saying why not."""
    if not sys.platform.startswith("linux"):
        return f"forking kernels needs Linux (this is {sys.platform})"
    for name in ("fork", "pidfd_open"):
        if not hasattr(os, name):
            return f"this Python has no os.{name}"
    if not hasattr(socket, "SCM_CREDENTIALS") or not hasattr(signal, "pidfd_send_signal"):
        return "this Python has no SCM_CREDENTIALS or pidfd_send_signal"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return f"pidfd_open does not work here ({exc}; Linux 5.3+ is needed)"
    return None


def shared_shm_reason(tier: str, bwrap_userns: bool, landlock_mounts: bool = False) -> str | None:
    """Why kernels forked in this sandbox tier share their template's /dev/shm, ptys and
    IPC namespace; None where each makes its own (mounts.py `enter_own_devices`) or where nothing
    is isolated (plain). `doctor`'s forecast from the rules child.py meets there: a template
    finds out by trying (its facts' "private_shm"). Landlock with mounts: the template runs
    outside Landlock and each fork applies the ruleset after its mounts (factory.py)."""
    if tier == "landlock" and not landlock_mounts:
        return "no mount namespace here, and Landlock refuses mounts"
    if tier == "bubblewrap" and not bwrap_userns:
        return "no user namespaces here"
    return None


@dataclass(frozen=True)
class TemplateKey:
    """What a template is shared by: notes whose kernels would be launched alike."""

    vault: str
    sandbox: str  # the launch policy: tier and everything fixed at launch (network ...)
    device_class: str  # cpu | cuda | mps
    hash_seed: str  # PYTHONHASHSEED, "random" when unset: fixed at interpreter start

    @classmethod
    def for_launch(
        cls,
        vault: str | os.PathLike[str] | None,
        tier: str,
        env: Mapping[str, str],
        *,
        network: bool = True,
        device: str = "auto",
        extra: Mapping[str, Any] | None = None,
    ) -> TemplateKey:
        """A key from a sandbox tier and a note's launch options (sandbox.Policy's fields).

        Per-note limits (memory, processes, timeout) are not in it: they are applied per
        forked kernel. `network` is: `network: false` notes get a template of their own.
        """
        policy = {"tier": tier, "network": bool(network), **dict(extra or {})}
        return cls(
            vault=str(Path(vault).resolve()) if vault else "",
            sandbox=json.dumps(policy, sort_keys=True),
            device_class=device_class(device),
            hash_seed=env.get("PYTHONHASHSEED") or "random",
        )


def device_class(device: str) -> str:
    """cuda:1 and cuda share a template (CUDA_VISIBLE_DEVICES is set per kernel)."""
    kind = (device or "auto").split(":")[0]
    return kind if kind in {"cpu", "cuda", "mps"} else "auto"


# -- one forked kernel ------------------------------------------------------------------------
