"""How the engine gets a kernel: the Kernel protocol, the default factory, launch env, setup code."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vault_runner.errors import KernelDied
from vault_runner.kernel import Execution, KernelSession

if TYPE_CHECKING:
    from vault_runner.engine.load import Loaded

__all__ = ("Kernel", "KernelFactory", "default_kernel_factory", "kernel_env", "needs_torch", "setup_code")


class Kernel(Protocol):
    def start(self) -> None: ...
    def shutdown(self) -> None: ...
    def execute(
        self,
        code: str,
        timeout: float,
        on_output: Any = None,
        silent: bool = False,
        user_expressions: dict[str, str] | None = None,
    ) -> Execution: ...


KernelFactory = Callable[[Path, dict[str, str], Mapping[str, Any]], Kernel]


def default_kernel_factory(cwd: Path, env: dict[str, str], note_options: Mapping[str, Any]) -> Kernel:
    """A kernel in the sandbox (sandbox.py) that the note's options ask for: network,
    memory, device (GPU placement and device nodes)."""
    from vault_runner.sandbox import Sandbox, SandboxError, policy_from_options

    try:
        sandbox = Sandbox(policy_from_options(cwd, env, note_options))
    except (SandboxError, ValueError) as exc:
        raise KernelDied(f"the kernel's sandbox could not be set up: {exc}") from None
    return KernelSession(cwd, env, sandbox=sandbox)


def kernel_env(vault_root: Path, note: Path | None, note_options: Mapping[str, Any]) -> dict[str, str]:
    """The environment a kernel is launched with (a warm spare has no note yet)."""
    env = {"VAULT_RUNNER_NOTE": str(note or ""), "VAULT_RUNNER_VAULT": str(vault_root)}
    if note_options.get("deterministic"):
        # Read by CUDA/cuBLAS and Python only at start-up, so they go in the launch env.
        env.update(CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONHASHSEED="0")
    return env


def setup_code(note_options: Mapping[str, Any], need_torch: bool) -> str:
    """Code run silently in a fresh kernel before the note's first block."""
    settings = json.dumps(
        {
            "device": note_options["device"],
            "seed": note_options["seed"],
            "torch": need_torch,
            "deterministic": note_options["deterministic"],
            "fraction": note_options["gpu-memory-fraction"],
        }
    )
    # No `%config InlineBackend...` here: it imports matplotlib (0.6 s) in every kernel, and
    # PNG is already the inline backend's default format.
    return f"""
def __vault_runner_setup(settings):
    import json, os, random
    settings = json.loads(settings)
    shell = get_ipython()
    device = "cpu"
    if settings["torch"] or settings["device"] != "auto":
        import torch
        request = settings["device"]
        if request == "auto":
            mps = getattr(torch.backends, "mps", None)
            if torch.cuda.is_available():
                device = "cuda"
            elif mps is not None and mps.is_available():
                device = "mps"
        else:
            kind = request.split(":")[0]
            if kind == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("this note asks for device " + request + ", but CUDA is not available here")
            if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
                raise RuntimeError("this note asks for device mps, but MPS is not available here")
            device = request
        shell.user_ns["DEVICE"] = torch.device(device)
        if settings["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        if settings["fraction"] and device.startswith("cuda"):
            index = torch.device(device).index  # None for plain "cuda", which torch refuses here
            torch.cuda.set_per_process_memory_fraction(
                float(settings["fraction"]), torch.cuda.current_device() if index is None else index
            )
    os.environ["VAULT_RUNNER_DEVICE"] = device
    seed = settings["seed"]
    if seed is not None:
        random.seed(seed)
        try:
            import numpy
            numpy.random.seed(seed)
        except ImportError:
            pass
        if "torch" in __import__("sys").modules:
            import torch
            torch.manual_seed(seed)
    return device
__vault_runner_device = __vault_runner_setup({settings!r})
del __vault_runner_setup
"""


def needs_torch(loaded: Loaded) -> bool:
    return any("torch" in p.block.code or "DEVICE" in p.block.code for p in loaded.runnable)
