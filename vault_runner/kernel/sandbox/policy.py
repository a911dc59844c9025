"""What a kernel may do (`Policy`), from a note's options and the environment; sizes.

The memory cap when a note sets none, the cap on processes+threads, network on or off.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = (
    "DEFAULT_MAX_TASKS",
    "DEFAULT_MEMORY_SHARE",
    "MAX_TASKS_ENV",
    "MEMORY_ENV",
    "NO_NETWORK_ENV",
    "Policy",
    "default_max_tasks",
    "default_memory",
    "format_size",
    "parse_size",
    "physical_memory",
    "policy_from_options",
)

MAX_TASKS_ENV = "VAULT_RUNNER_MAX_TASKS"  # processes + threads per kernel
MEMORY_ENV = "VAULT_RUNNER_MEMORY"  # memory of all kernels together (and each's cap by default), e.g. 8G
NO_NETWORK_ENV = "VAULT_RUNNER_NO_NETWORK"  # 1: network off for every kernel (--no-network)
DEFAULT_MAX_TASKS = 4096  # threads count too: torch starts one per core, DataLoader workers more
DEFAULT_MEMORY_SHARE = 0.8  # of physical memory, when neither the note nor the env sets a cap


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GiB', '100KB' or '1000' -> bytes (binary units: G = 2**30)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size such as 4G or 512M")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def physical_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_memory() -> tuple[int | None, str]:
    """The memory budget of all kernels together, also each kernel's cap when its note sets
    none, and where it comes from."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        return parse_size(override), MEMORY_ENV
    total = physical_memory()
    if total is None:
        return None, "unknown physical memory"
    return int(total * DEFAULT_MEMORY_SHARE), f"{int(DEFAULT_MEMORY_SHARE * 100)}% of physical memory"


def default_max_tasks() -> int | None:
    value = os.environ.get(MAX_TASKS_ENV)
    if value is None:
        return DEFAULT_MAX_TASKS
    return int(value) if int(value) > 0 else None


@dataclass(frozen=True)
class Policy:
    """What a kernel may do. Hashable, so a warm pool can key kernels by it."""

    vault: Path | None
    cwd: Path
    network: bool = True
    memory: int | None = None  # bytes of resident memory for all the kernel's processes
    max_tasks: int | None = DEFAULT_MAX_TASKS  # processes + threads
    device: str = "auto"
    # Bytes for all the kernels of this process together that have the same budget
    # (default_memory: VAULT_RUNNER_MEMORY or 80% of RAM); None: this kernel's own cap only.
    budget: int | None = None


def policy_from_options(cwd: Path, env: Mapping[str, str], note_options: Mapping[str, Any]) -> Policy:
    """The policy for a note's kernel, from its options (core/options.py) and the environment."""
    vault = env.get("VAULT_RUNNER_VAULT")
    memory_option = note_options.get("memory")
    budget = default_memory()[0]
    memory = parse_size(memory_option) if memory_option else budget
    network = bool(note_options.get("network", True)) and os.environ.get(NO_NETWORK_ENV, "") not in {"1", "true"}
    return Policy(
        vault=Path(vault).resolve() if vault else None,
        cwd=Path(cwd).resolve(),
        network=network,
        memory=memory,
        max_tasks=default_max_tasks(),
        device=str(note_options.get("device", "auto")),
        budget=budget,
    )
