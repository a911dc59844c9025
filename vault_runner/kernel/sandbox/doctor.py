"""What `vault-runner doctor` says about the sandbox: tier, isolation, limits, devices."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from vault_runner.errors import SandboxError
from vault_runner.kernel.limits import INTERRUPT_GRACE, MAX_IMAGE_BYTES, MAX_IMAGES, MAX_OUTPUT_BYTES
from vault_runner.kernel.sandbox.cgroup import cgroup_support
from vault_runner.kernel.sandbox.gpu import nvidia_device_nodes
from vault_runner.kernel.sandbox.network import coverage, hardening_works
from vault_runner.kernel.sandbox.policy import (
    MAX_TASKS_ENV,
    NO_NETWORK_ENV,
    default_max_tasks,
    default_memory,
    format_size,
)
from vault_runner.kernel.sandbox.probe import PLAIN_WARNING, probe
from vault_runner.kernel.sandbox.protected import names_supervised

__all__ = ("Report", "doctor_report")


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        self.lines.append((key, value))


_PROTECTED = ".obsidian/ and .git/ at any depth and vault-runner.toml read-only, and never made (a kernel that makes one is stopped)"
_FILESYSTEM = {
    "bubblewrap": f"root read-only; vault writable but {_PROTECTED}; homes hidden (read-only, empty); "
    "private /tmp, /run, /var/tmp, /dev/shm, /dev/pts and SysV IPC; caches per kernel",
    "landlock": f"read all but homes and /tmp; write the vault but {_PROTECTED}; a private temp folder; "
    "caches per kernel; private /dev/shm, /dev/pts and SysV IPC (own mount and IPC namespaces)",
    "landlock-no-mounts": f"read all but homes and /tmp; write the vault but {_PROTECTED}, and nothing new "
    "directly in the vault root or in a folder holding .git/.obsidian (Landlock grants whole folders; "
    "a note is told why); a private temp folder; caches per kernel; /dev/shm and /dev/pts refused: "
    "no multiprocessing locks or DataLoader workers, and `!cmd` gets its ptys from a helper; SysV shared "
    "memory, semaphores and queues are the host's (no mount or IPC namespace here: run as a user allowed "
    "user namespaces, or install bubblewrap)",
    "plain": "no isolation: kernels can read and write everything you can (only their temp and cache folders "
    "are their own)",
}


def doctor_report() -> Report:
    """What `vault-runner doctor` prints about the sandbox (the admin CLI adds Python/torch)."""
    report = Report()
    try:
        found = probe()
    except SandboxError as exc:
        report.add("sandbox tier", f"error: {exc}")
        return report
    report.add("sandbox tier", f"{found.tier} ({found.reason})")
    if found.tier == "plain":
        report.add("warning", PLAIN_WARNING.strip("[]"))
    elif found.tier == "landlock":
        report.add(
            "warning",
            "bubblewrap is not in use: the Landlock tier has no private /tmp or pid namespace, "
            "and a note's network is cut by filters, not a network namespace; install bubblewrap for the full sandbox",
        )
    version = found.bwrap_version or "not installed"
    if found.bwrap:
        version += f" at {found.bwrap}; user namespaces: {'yes' if found.bwrap_userns else 'no'}"
        version += f"; network namespaces: {'yes' if found.bwrap_netns else 'no'}"
    report.add("bubblewrap", version)
    mounts = found.tier != "landlock" or found.landlock_mounts
    report.add("filesystem", _FILESYSTEM[found.tier if mounts else "landlock-no-mounts"])
    report.add("interrupts", "SIGINT (into the pid namespace)" if found.tier == "bubblewrap" else "SIGINT")
    mount_ns = "; own mount namespace: " + ("yes" if found.landlock_mounts else "no") if found.landlock_abi else ""
    report.add("landlock", (f"ABI {found.landlock_abi}" if found.landlock_abi else "not available") + mount_ns)
    report.add("cgroups", cgroup_support())
    memory, origin = default_memory()
    report.add("memory cap", f"{format_size(memory)} for all running kernels together, and per kernel ({origin}; "
               "a note's `memory:` option sets its own kernel's)" if memory else "none")  # fmt: skip
    support = cgroup_support()
    if "memory" in support:
        version = "v2 memory.max" if support.startswith("cgroup v2") else "v1 memory.limit_in_bytes"
        how_memory = (
            f"cgroup {version} per kernel; all kernels together: a watchdog every 0.1 s stops the kernel "
            "that asked for more, and a cgroup over them all holds them a margin above the budget"
        )
    else:
        how_memory = "watchdog on resident memory per kernel; all kernels together: a watchdog every 0.1 s"
    report.add("memory enforcement", how_memory)
    tasks = default_max_tasks()
    if tasks and "pids" in support:
        report.add("process+thread cap", f"{tasks} per kernel (pids cgroup; {MAX_TASKS_ENV} overrides)")
    elif tasks and os.geteuid() != 0:
        report.add("process+thread cap", f"{tasks} per kernel (RLIMIT_NPROC)")
    else:
        report.add("process+thread cap", "none: no writable pids cgroup, and RLIMIT_NPROC does not apply to root")
    report.add("core dumps", "off (RLIMIT_CORE 0)")
    network = (
        "off for every kernel"
        if os.environ.get(NO_NETWORK_ENV, "") in {"1", "true"}
        else "on (a note's `network: false` turns it off)"
    )
    report.add("network", network)
    report.add("network: false", coverage(found.tier, found))
    if found.tier != "plain":
        hardening = (
            "seccomp: no setuid/setgid files, no user namespaces of a kernel's own, no io_uring"
            if hardening_works()
            else "none: no seccomp filter here (a note could leave a setuid file in the vault)"
        )
        report.add("hardening", hardening)
        names = (
            "refused as they are made (a seccomp supervisor makes every name a kernel makes)"
            if hardening_works() and names_supervised()
            else "the guard moves one out when it appears and stops the kernel (no seccomp user notification here)"
        )
        report.add("protected names", f".git, .obsidian, vault-runner.toml: {names}")
    report.add("output cap", f"{format_size(MAX_OUTPUT_BYTES)} per block; {MAX_IMAGES} images of at most "
               f"{format_size(MAX_IMAGE_BYTES)} each")  # fmt: skip
    report.add("timeout", f"per block (option `timeout`); interrupt, then restart after {INTERRUPT_GRACE:g} s")
    nodes = nvidia_device_nodes()
    report.add("nvidia device nodes", ", ".join(nodes) if nodes else "none")
    return report
