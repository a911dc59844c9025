"""Which isolation tier works here, found by actually trying each one (once per process).

``VAULT_RUNNER_SANDBOX`` forces a tier: bubblewrap, landlock or plain.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from vault_runner.errors import SandboxError
from vault_runner.kernel.sandbox import launch
from vault_runner.kernel.sandbox.processes import launcher_runs, run_quiet, succeeded

__all__ = ("PLAIN_WARNING", "SANDBOX_ENV", "TIERS", "Probe", "probe")

TIERS = ("bubblewrap", "landlock", "plain")
SANDBOX_ENV = "VAULT_RUNNER_SANDBOX"  # force a tier: bubblewrap | landlock | plain
PLAIN_WARNING = (
    "[vault-runner: warning: no sandbox: neither bubblewrap nor Landlock works here, so this "
    "note's code runs with your full permissions; install bubblewrap (e.g. `apt install bubblewrap`)]"
)
_BWRAP_BASE = [
    "--ro-bind", "/", "/",
    "--dev", "/dev",
    "--proc", "/proc",
    "--tmpfs", "/tmp",
    "--unshare-pid",
    "--die-with-parent",
    "--new-session",
]  # fmt: skip


@dataclass(frozen=True)
class Probe:
    tier: str
    reason: str
    forced: bool = False
    bwrap: str | None = None  # path to bwrap, when it works
    bwrap_version: str | None = None
    bwrap_userns: bool = False
    bwrap_netns: bool = False
    landlock_abi: int = 0
    # The Landlock launcher can make a mount namespace (root, or user namespaces allowed):
    # private /dev/shm and /dev/pts, and the vault root writable (kernel/sandbox/mounts.py).
    landlock_mounts: bool = False


def _probe_bwrap() -> tuple[str | None, str | None, bool, bool, str]:
    """(path, version, user namespaces work, network namespaces work, why not)."""
    path = shutil.which("bwrap")
    if path is None:
        return None, None, False, False, "bubblewrap is not installed"
    done = run_quiet([path, "--version"])
    version = done.stdout.strip().split()[-1] if done and done.returncode == 0 and done.stdout.strip() else None
    base = run_quiet([path, *_BWRAP_BASE, "true"])
    if base is None or base.returncode != 0:
        why = (base.stderr.strip().splitlines() or ["no output"])[-1] if base else "it did not run"
        return None, version, False, False, f"bubblewrap is installed but cannot create a sandbox here ({why})"
    userns = succeeded(run_quiet([path, *_BWRAP_BASE, "--unshare-user", "--cap-drop", "ALL", "true"]))
    netns = succeeded(run_quiet([path, *_BWRAP_BASE, "--unshare-net", "true"]))
    return path, version, userns, netns, ""


def _probe_landlock() -> tuple[int, bool]:
    """Landlock's ABI, checked by restricting a child process for real; and whether the
    launcher can give it its own mounts (mounts.py), tried for real too."""
    abi = launch.landlock_abi()
    if abi < 1:
        return 0, False
    rules = {"read": ["/"], "write": [], "network": True}
    if not launcher_runs({"landlock": rules}):
        return 0, False
    return abi, launcher_runs({"namespace": {"shm_size": 2**20, "readonly": []}, "landlock": rules})


@functools.cache
def _probe(forced: str) -> Probe:
    bwrap, version, userns, netns, why_not = _probe_bwrap() if sys.platform.startswith("linux") else (
        None, None, False, False, "bubblewrap needs Linux")  # fmt: skip
    abi, mounts = _probe_landlock() if sys.platform.startswith("linux") else (0, False)
    info: dict[str, Any] = {
        "bwrap": bwrap,
        "bwrap_version": version,
        "bwrap_userns": userns,
        "bwrap_netns": netns,
        "landlock_abi": abi,
        "landlock_mounts": mounts,
    }
    if forced:
        if forced not in TIERS:
            raise SandboxError(f"{SANDBOX_ENV}={forced} is not a sandbox tier; use one of {', '.join(TIERS)}")
        if forced == "bubblewrap" and bwrap is None:
            raise SandboxError(f"{SANDBOX_ENV}=bubblewrap, but {why_not}; install bubblewrap or unset {SANDBOX_ENV}")
        if forced == "landlock" and abi == 0:
            raise SandboxError(f"{SANDBOX_ENV}=landlock, but this Linux kernel has no usable Landlock; unset it")
        return Probe(forced, f"forced by {SANDBOX_ENV}", forced=True, **info)
    if bwrap is not None:
        return Probe("bubblewrap", f"bubblewrap {version or '?'} works", **info)
    if abi:
        return Probe("landlock", f"{why_not}; Landlock ABI {abi} works", **info)
    return Probe("plain", f"{why_not}; Landlock is not available", **info)


def probe() -> Probe:
    """The tier this process uses (probed once per process and forced value)."""
    return _probe(os.environ.get(SANDBOX_ENV, "").strip().lower())
