"""What `network: false` refuses in each tier on this machine, and what it leaves open.

One place decides it for the launch command (whether to ask the launcher for the seccomp
filter of seccomp.py), the warning written into a note, and `doctor`.
"""

from __future__ import annotations

import functools

from vault_runner.kernel.sandbox import seccomp
from vault_runner.kernel.sandbox.probe import Probe
from vault_runner.kernel.sandbox.processes import launcher_runs

__all__ = ("coverage", "hardening_works", "not_covered", "seccomp_works")


@functools.cache
def seccomp_works() -> bool:
    """Whether the launcher can apply the filter here, tried once with a child process."""
    return seccomp.supported() and launcher_runs({"no_network": True})


@functools.cache
def hardening_works() -> bool:
    """Whether the launcher can apply seccomp.py's hardening filter here (tried once)."""
    return seccomp.supported() and launcher_runs({"harden": True})


def _refused(tier: str, probe: Probe) -> list[str]:
    out = []
    if tier == "bubblewrap":
        out.append("own network namespace (no route out; the host's 127.0.0.1 and abstract unix sockets unreachable)")
    if tier == "landlock" and probe.landlock_abi >= 4:
        out.append(f"Landlock ABI {probe.landlock_abi} refuses TCP connect and bind")
    if tier == "landlock" and probe.landlock_abi >= 6:
        out.append("Landlock's scope keeps the host's abstract unix sockets out of reach")
    if seccomp_works():
        out.append("seccomp refuses every connect(), UDP and other datagram sockets, TCP Fast Open and io_uring")
    return out


def not_covered(tier: str, probe: Probe) -> str | None:
    """The ways out `network: false` leaves open in `tier` here, in words; None when none."""
    if seccomp_works():
        return None  # nothing connects, nothing sends without connecting
    if tier == "bubblewrap":
        return "unix sockets in files the sandbox can see (the vault, /var) still reach host services"
    if tier == "landlock" and probe.landlock_abi >= 4:
        return "only TCP is refused: UDP and unix sockets still reach the host"
    return f"it is not enforced in the {tier} sandbox tier"


def coverage(tier: str, probe: Probe) -> str:
    """One line for `doctor`: what cuts the kernel off, then what is left open."""
    refused = _refused(tier, probe)
    gap = not_covered(tier, probe)
    if gap is None and tier == "landlock":
        gap = "a note can still listen on a random TCP port of the host (incoming connections)"
    text = "; ".join(refused) if refused else "nothing is refused"
    return f"{text}; not covered: {gap}" if gap else f"{text}; nothing else is left open"
