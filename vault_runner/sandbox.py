"""Moved to vault_runner.kernel.sandbox; these names keep old imports working during the refactor."""

from vault_runner.errors import SandboxError
from vault_runner.kernel.sandbox import Sandbox
from vault_runner.kernel.sandbox.cgroup import CGROUP_ROOT, Cgroup, cgroup_support
from vault_runner.kernel.sandbox.doctor import Report, doctor_report
from vault_runner.kernel.sandbox.filesystem import PROTECTED_IN_VAULT, hidden_roots, mpl_cache_dir
from vault_runner.kernel.sandbox.gpu import claim_gpu, nvidia_device_nodes, release_gpu, visible_gpus
from vault_runner.kernel.sandbox.policy import (
    DEFAULT_MAX_TASKS,
    DEFAULT_MEMORY_SHARE,
    MAX_TASKS_ENV,
    MEMORY_ENV,
    NO_NETWORK_ENV,
    Policy,
    default_max_tasks,
    default_memory,
    format_size,
    parse_size,
    physical_memory,
    policy_from_options,
)
from vault_runner.kernel.sandbox.probe import PLAIN_WARNING, SANDBOX_ENV, TIERS, Probe, probe
from vault_runner.kernel.sandbox.processes import (
    WATCH_INTERVAL,
    MemoryWatchdog,
    process_memory,
    process_tree,
    resident_memory,
    resident_size,
)

__all__ = (
    "CGROUP_ROOT",
    "DEFAULT_MAX_TASKS",
    "DEFAULT_MEMORY_SHARE",
    "MAX_TASKS_ENV",
    "MEMORY_ENV",
    "NO_NETWORK_ENV",
    "PLAIN_WARNING",
    "PROTECTED_IN_VAULT",
    "SANDBOX_ENV",
    "TIERS",
    "WATCH_INTERVAL",
    "Cgroup",
    "MemoryWatchdog",
    "Policy",
    "Probe",
    "Report",
    "Sandbox",
    "SandboxError",
    "cgroup_support",
    "claim_gpu",
    "default_max_tasks",
    "default_memory",
    "doctor_report",
    "format_size",
    "hidden_roots",
    "mpl_cache_dir",
    "nvidia_device_nodes",
    "parse_size",
    "physical_memory",
    "policy_from_options",
    "probe",
    "process_memory",
    "process_tree",
    "release_gpu",
    "resident_memory",
    "resident_size",
    "visible_gpus",
)
