"""Code and environment a fresh kernel gets before a note's first block.

`kernel_env` is the launch environment; `prelude_code` caps output inside the kernel and
defines the setup function (run by the session on every start; a forked spare runs it
before its note is known); `setup_code` calls it: the note's device and seeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vault_runner.kernel.limits import MAX_IMAGES, MAX_OUTPUT_BYTES
from vault_runner.kernel.outputs import DROPPED_MIME

__all__ = ("kernel_env", "prelude_code", "setup_code")

# The module the prelude registers in the kernel, holding the per-note setup function.
SETUP_MODULE = "__vault_runner__"

# Run silently in every new kernel. Caps stream output inside the kernel, per execution, so
# a block printing a gigabyte never sends it (the session would drop it anyway, but
# only after holding it in memory); what was cut is counted in the message for the notice.
_PRELUDE = """
def __vault_runner_cap_streams(limit):
    import sys
    used = {}
    def hook(msg):
        parent = msg.get("parent_header", {}).get("msg_id")
        content = msg.get("content", {})
        text = content.get("text", "")
        if parent not in used and len(used) > 64:
            used.clear()
        before = used.get(parent, 0)
        room = max(limit - before, 0)
        if len(text) > room:
            content["text"] = text[:room]
            content["vault_runner_dropped"] = len(text) - room
        used[parent] = before + len(text)
        return msg
    for stream in (sys.stdout, sys.stderr):
        # Hooks are per thread, and messages leave from the IO thread: register it there.
        if hasattr(stream, "register_hook") and getattr(stream, "pub_thread", None) is not None:
            stream.pub_thread.schedule(lambda stream=stream: stream.register_hook(hook))
def __vault_runner_cap_figures(limit):
    import sys
    def close_extra_figures():
        # Runs before matplotlib-inline renders the open figures: rendering 500 PNGs that
        # the session would drop anyway takes minutes.
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        numbers = pyplot.get_fignums()
        if len(numbers) > limit:
            for number in numbers[limit:]:
                pyplot.close(number)
            from IPython.display import publish_display_data
            publish_display_data({"%s": {"dropped_images": len(numbers) - limit}})
    get_ipython().events.register("post_execute", close_extra_figures)
def __vault_runner_cell_warnings():
    # A warning a block raises names the cell's temporary file (/tmp/ipykernel_7/12345.py:2:).
    # Name the cell as IPython's tracebacks do (Cell In[3]:2:): core/render.py maps both to
    # note lines with the same table. The source line is looked up under the real name first.
    import linecache, warnings
    shell = get_ipython()
    original = warnings.formatwarning
    def formatwarning(message, category, filename, lineno, line=None):
        try:
            cell = shell.compile.format_code_name(filename)
        except Exception:
            cell = None
        if cell is not None:
            if line is None:
                line = linecache.getline(filename, lineno)
            filename = " ".join(cell)
        return original(message, category, filename, lineno, line)
    warnings.formatwarning = formatwarning
def __vault_runner_setup(settings):
    # A note's device and seeds (setup_code calls it with the note's options).
    # No `%%config InlineBackend...` here: it imports matplotlib (0.6 s) in every kernel, and
    # PNG is already the inline backend's default format.
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
def __vault_runner_retry_interrupted():
    # Under the name supervisor (name_supervisor.py), a signal with a Python handler that
    # comes before the supervisor has taken a call interrupts it: mkdir and the like then
    # raise InterruptedError, which they do not on a local disk. Retried as Python retries
    # open() (PEP 475): the handler has run by then, and one that raises still ends the call.
    # In every kernel (a fork template runs this before it knows its forks' sandbox).
    import functools, os
    def retrying(call):
        @functools.wraps(call)
        def retried(*args, **kwargs):
            while True:
                try:
                    return call(*args, **kwargs)
                except InterruptedError:
                    pass
        return retried
    for name in ("mkdir", "rename", "replace", "link", "symlink", "mkfifo", "mknod"):
        setattr(os, name, retrying(getattr(os, name)))
def __vault_runner_register_setup():
    import sys, types
    module = types.ModuleType("%s", "vault_runner's per-note kernel setup")
    module.setup = __vault_runner_setup
    sys.modules[module.__name__] = module
__vault_runner_cap_streams(%d)
__vault_runner_cap_figures(%d)
__vault_runner_cell_warnings()
__vault_runner_register_setup()
__vault_runner_retry_interrupted()
del __vault_runner_cap_streams, __vault_runner_cap_figures, __vault_runner_cell_warnings, __vault_runner_retry_interrupted
del __vault_runner_setup, __vault_runner_register_setup
"""


def prelude_code() -> str:
    """The prelude with this build's limits filled in."""
    return _PRELUDE % (DROPPED_MIME, SETUP_MODULE, MAX_OUTPUT_BYTES + 1024, MAX_IMAGES)


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
    # The function is defined by the prelude, which a forked spare ran before its note was
    # known: what is left per note is one call (compiling the function cost ~6 ms a note).
    # Looked up, never imported: a note's folder is on sys.path, and may hold a file of that name.
    return f"__vault_runner_device = __import__('sys').modules[{SETUP_MODULE!r}].setup({settings!r})\n"
