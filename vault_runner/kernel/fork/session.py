"""A KernelSession whose kernel is forked from a template, or started where it cannot be.

`ForkedSession` is what the fork factory (kernel/fork/factory.py) gives for a note. Its
`start` takes the template the note's launch options call for (waiting for it if it is
still starting) and forks a kernel from it; the note's own sandbox object keeps the
per-note part of the sandbox: the cgroup or the memory watchdog, the process cap, the
private temp folder (Landlock), the GPU it was given, the death reasons. Where the
template cannot serve (it failed to start, it died, the fork or the cgroup move failed),
the kernel is started the normal way, in the same sandbox object, and `fallback` says why.
`origin` is "forked" or "started": what the note's report says.

Everything after the start is KernelSession's: execute, timeout and interrupt, restart
(a restart forks again), death reporting, shutdown.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vault_runner.errors import ForkError, ForkUnavailable, KernelDied
from vault_runner.kernel.fork.forked import ForkedKernelManager, wait_for_ready
from vault_runner.kernel.limits import STARTUP_TIMEOUT
from vault_runner.kernel.session import KernelSession
from vault_runner.kernel.setup import prelude_code

if TYPE_CHECKING:
    from vault_runner.kernel.fork.template import KernelTemplate
    from vault_runner.kernel.sandbox import Sandbox

__all__ = ("ForkedSession", "Origin", "finish_shutdowns")

Origin = Literal["forked", "started"]

# Waits for the template the note needs, bounded: (template, None) or (None, why not).
TemplateSource = Callable[[], "tuple[KernelTemplate | None, str | None]"]


class ForkedSession(KernelSession):
    """One note's kernel: forked from `template()` when it can be, else started."""

    def __init__(
        self,
        cwd: Path,
        env: dict[str, str] | None,
        *,
        sandbox: Sandbox | None,
        template: TemplateSource | None,
        runtime_dir: Path | None = None,
        refusal: str | None = None,
    ) -> None:
        # The runtime folder lies inside the template's, which its sandbox lets kernels write.
        super().__init__(cwd, env, runtime_dir=runtime_dir, sandbox=sandbox)
        self.template_source = template
        self.origin: Origin | None = None
        self.fallback: str | None = refusal  # why the kernel was started, not forked

    def start(self) -> None:
        template, why = (None, self.fallback) if self.template_source is None else self.template_source()
        if template is None:
            self.fallback = why or self.fallback
            self.origin = "started"
            super().start()
            return
        launched = self.manager
        forked = ForkedKernelManager(
            template,
            sandbox=self.sandbox,
            transport="ipc",
            ip=str(self.runtime_dir / "k"),
            connection_file=str(self.runtime_dir / "kernel.json"),
            replace_env=True,
        )
        self.manager = forked
        try:
            if self.sandbox is not None:
                self.sandbox.setup(self.runtime_dir, self.kernel_pid)
            forked.start_kernel(cwd=str(self.cwd), env=self._env())
            self._connect()
        except (ForkUnavailable, ForkError, KernelDied) as exc:
            self.fallback = str(exc)
            with contextlib.suppress(Exception):
                forked.shutdown_kernel(now=True)
            self.manager = launched
            if self.sandbox is not None:
                self.sandbox.reset()
            self.origin = "started"
            super().start()
            return
        except BaseException:
            self._cleanup_failed_start()
            raise
        self.origin = "forked"
        self.started = True

    def shutdown(self) -> None:
        """Shut the kernel down. A forked one finishes on a thread (`finish_shutdowns` waits
        for those): asking it to exit and waiting for it takes ~0.1 s that the next note
        need not wait for. Its sandbox (cgroup, watchdog, GPU) is released once it is gone."""
        if self.origin != "forked" or not self.started:
            super().shutdown()
            return
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        self.started = False
        thread = threading.Thread(target=self._finish_shutdown, name="vault-runner-kernel-shutdown", daemon=True)
        with _pending_lock:
            _pending.add(thread)
        thread.start()

    def _finish_shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            with _pending_lock:
                _pending.discard(threading.current_thread())

    def _connect(self) -> None:
        if not isinstance(self.manager, ForkedKernelManager):
            super()._connect()
            return
        # A spare's client was connected while it waited (ForkedKernel.connect_ahead): its
        # iopub works, and what is sent now is served once the kernel runs. Else:
        # jupyter_client's wait_for_ready ends with 0.2 s of listening on iopub, longer
        # than a forked kernel takes to start; this one returns once both channels work.
        kernel = self.manager.forked
        client = kernel.take_client() if kernel is not None else None
        if client is not None and not self.manager.is_alive():
            client.stop_channels()
            raise KernelDied("the kernel died before it served")
        if client is None:
            client = self.manager.client()
            client.start_channels()
            try:
                wait_for_ready(client, STARTUP_TIMEOUT, self.manager.is_alive)
            except ForkError as exc:
                client.stop_channels()
                raise KernelDied(f"the kernel did not start: {exc}") from None
        self.client = client
        if self.manager.template.startup_code != prelude_code():
            self._run_prelude()  # else the kernel ran it before it served (a spare: ahead)
        self.notices_due = bool(self.notices)


_pending: set[threading.Thread] = set()
_pending_lock = threading.Lock()


def finish_shutdowns(timeout: float = 30.0) -> None:
    """Wait for the forked kernels whose shutdown is still under way."""
    with _pending_lock:
        threads = list(_pending)
    for thread in threads:
        thread.join(timeout)
