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

`ForkFactory` (factory.py) is the KernelFactory that uses all this: a template per launch
key, spare kernels forked ahead of demand, and a `ForkedSession` (session.py) per note,
which falls back to a normal start where fork cannot serve (not Linux, no pidfd,
`VAULT_RUNNER_FORK=0`, a template that failed, a fork that failed): `fork_disabled_reason()`,
`KernelTemplate.refusal()` and `ForkedSession.fallback` say why, in one line; the note's
report says `kernel: forked` or `started`, and `doctor` says which this machine does.
"""

from __future__ import annotations

from vault_runner.lazy import exports

__all__ = (
    "DEFAULT_KERNEL_ARGS",
    "DEFAULT_PRELOAD",
    "FORK_ENV",
    "ForkError",
    "ForkFactory",
    "ForkUnavailable",
    "ForkedKernel",
    "ForkedKernelManager",
    "ForkedSession",
    "KernelTemplate",
    "TemplateKey",
    "device_class",
    "fork_disabled_reason",
    "fork_unavailable_reason",
    "wait_for_ready",
)

# Imported on first use: `doctor` asks whether kernels are forked without importing
# jupyter_client.
_WHERE = {
    "DEFAULT_KERNEL_ARGS": "vault_runner.kernel.fork.common",
    "DEFAULT_PRELOAD": "vault_runner.kernel.fork.common",
    "FORK_ENV": "vault_runner.kernel.fork.common",
    "ForkError": "vault_runner.errors",
    "ForkFactory": "vault_runner.kernel.fork.factory",
    "ForkUnavailable": "vault_runner.errors",
    "ForkedKernel": "vault_runner.kernel.fork.forked",
    "ForkedKernelManager": "vault_runner.kernel.fork.forked",
    "ForkedSession": "vault_runner.kernel.fork.session",
    "KernelTemplate": "vault_runner.kernel.fork.template",
    "TemplateKey": "vault_runner.kernel.fork.common",
    "device_class": "vault_runner.kernel.fork.common",
    "fork_disabled_reason": "vault_runner.kernel.fork.common",
    "fork_unavailable_reason": "vault_runner.kernel.fork.common",
    "wait_for_ready": "vault_runner.kernel.fork.forked",
}


__getattr__ = exports(__name__, _WHERE)
