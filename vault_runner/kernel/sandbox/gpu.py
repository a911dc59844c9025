"""GPU placement: the NVIDIA device nodes a kernel needs, and spreading kernels over GPUs."""

from __future__ import annotations

import glob
import os
import threading

__all__ = ("claim_gpu", "nvidia_device_nodes", "release_gpu", "visible_gpus")


def nvidia_device_nodes() -> list[str]:
    return sorted(p for p in glob.glob("/dev/nvidia*") if not os.path.isdir(p)) + sorted(
        p for p in glob.glob("/dev/nvidia-caps") if os.path.isdir(p)
    )


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out, honouring an existing CUDA_VISIBLE_DEVICES."""
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current is not None:
        return [g.strip() for g in current.split(",") if g.strip() and g.strip() != "-1"]
    return sorted((p[len("/dev/nvidia") :] for p in glob.glob("/dev/nvidia[0-9]*")), key=int)


_gpu_lock = threading.Lock()
_gpu_users: dict[str, int] = {}


def claim_gpu(device: str) -> str | None:
    """With several GPUs, give a kernel the least used one (CUDA_VISIBLE_DEVICES)."""
    if device not in {"auto", "cuda"}:
        return None  # cpu, mps, or a note that named cuda:N itself
    gpus = visible_gpus()
    if len(gpus) < 2:
        return None
    with _gpu_lock:
        chosen = min(gpus, key=lambda g: (_gpu_users.get(g, 0), gpus.index(g)))
        _gpu_users[chosen] = _gpu_users.get(chosen, 0) + 1
    return chosen


def release_gpu(gpu: str | None) -> None:
    if gpu is None:
        return
    with _gpu_lock:
        _gpu_users[gpu] = max(0, _gpu_users.get(gpu, 0) - 1)
