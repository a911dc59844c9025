"""Fresh kernels forked from a warm template (contract 12).

A `KernelTemplate` is one process per `TemplateKey` (vault, sandbox policy, device class,
hash seed), started with the same launch command prefix and environment that the sandbox
gives a kernel, so it lives inside bubblewrap or Landlock exactly as a kernel would. It
imports ipykernel, IPython, numpy, torch and matplotlib, runs no user code, starts no
thread and no ZMQ context, never initialises CUDA, and waits on a control socket
(kernel/fork/child.py). `KernelTemplate.fork` asks it for a kernel: the child calls
setsid (its own process group), changes into the note's folder, takes the note's
environment, reseeds `random`, NumPy's and torch's global generators from the OS, and
becomes an IPKernelApp on a connection file of its own. To the note's code it is a new
process: its own pid, sockets, folder, environment and random numbers, and none of the
names or modules an earlier note left behind (only the preloaded modules are imported,
as in a warm pool kernel).

The forked kernel is the template's child, not ours: `ForkedKernel` holds a pidfd
(os.pidfd_open) for liveness and race-free signals, the template reaps it and reports
its exit status. Its pid is the host's pid even when the template is in bubblewrap's pid
namespace (the child reports it with SCM_CREDENTIALS, which the kernel translates).

`ForkedKernelManager` is a jupyter_client KernelManager whose start forks from a
template, so `kernel.KernelSession` can drive a forked kernel unchanged.

Where fork cannot serve (not Linux, no pidfd, a note whose launch options differ from
the template's, a different PYTHONHASHSEED) the caller starts a kernel the normal way:
`fork_unavailable_reason()` and `KernelTemplate.refusal()` say why, in one line for
`--json` and `doctor`.
"""

from vault_runner.errors import ForkError, ForkUnavailable
from vault_runner.kernel.fork.common import (
    DEFAULT_KERNEL_ARGS,
    DEFAULT_PRELOAD,
    TemplateKey,
    device_class,
    fork_unavailable_reason,
)
from vault_runner.kernel.fork.forked import ForkedKernel, ForkedKernelManager, wait_for_ready
from vault_runner.kernel.fork.template import KernelTemplate

__all__ = (
    "DEFAULT_KERNEL_ARGS",
    "DEFAULT_PRELOAD",
    "ForkError",
    "ForkUnavailable",
    "ForkedKernel",
    "ForkedKernelManager",
    "KernelTemplate",
    "TemplateKey",
    "device_class",
    "fork_unavailable_reason",
    "wait_for_ready",
)
