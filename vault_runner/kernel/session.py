"""Jupyter kernel sessions: start, execute with a timeout, interrupt, restart, shut down.

Driven the way nbclient drives a kernel (jupyter_client + ipykernel), but synchronous
and per block, with our own timeout policy: interrupt first; if the kernel ignores the
interrupt, restart it. A kernel that dies is reported and restarted.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client.manager import KernelManager

from vault_runner.errors import KernelDied
from vault_runner.kernel.limits import INTERRUPT_GRACE, LOST_REPLY_GRACE, STARTUP_TIMEOUT
from vault_runner.kernel.outputs import OutputCallback, OutputCollector, reply_from_outputs, to_output
from vault_runner.kernel.setup import prelude_code

if TYPE_CHECKING:
    from vault_runner.kernel.sandbox import Sandbox

__all__ = ("Execution", "KernelSession")


@dataclass
class Execution:
    status: str  # ok | error | timeout | dead
    outputs: list[dict[str, Any]]
    execution_count: int | None
    duration: float
    kernel_restarted: bool = False
    dropped_bytes: int = 0
    dropped_images: int = 0
    user_expressions: dict[str, Any] = field(default_factory=dict)


class _KernelManager(KernelManager):
    """A KernelManager whose launch command can be wrapped (the sandbox)."""

    command_wrapper: Callable[[list[str]], list[str]] | None = None

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        # No IPython history database: notes do not need it, it costs several ms per
        # block, and it would write every note's code into ~/.ipython.
        command = super().format_kernel_cmd([*(extra_arguments or []), "--HistoryManager.enabled=False"])
        if self.command_wrapper is not None:
            command = self.command_wrapper(command)
        return command


class KernelSession:
    """One IPython kernel over ipc sockets with an explicit connection file.

    With a `sandbox` (kernel/sandbox/) the kernel is launched inside it, with its limits; the
    session then also kills what the sandbox holds when it restarts or shuts down.
    """

    def __init__(
        self,
        cwd: Path,
        env: dict[str, str] | None = None,
        command_wrapper: Callable[[list[str]], list[str]] | None = None,
        runtime_dir: Path | None = None,
        *,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.cwd = cwd
        self.extra_env = dict(env or {})
        self.sandbox = sandbox
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="vr-", dir=runtime_dir))
        manager = _KernelManager(
            kernel_name="python3",
            transport="ipc",
            ip=str(self.runtime_dir / "k"),
            connection_file=str(self.runtime_dir / "kernel.json"),
        )
        if sandbox is not None:
            wrap = sandbox.wrap
            manager.command_wrapper = wrap if command_wrapper is None else (lambda argv: wrap(command_wrapper(argv)))
        else:
            manager.command_wrapper = command_wrapper
        self.manager = manager
        self.client = None
        self.started = False
        # Lines the user must see (e.g. "no sandbox"): the first run in this kernel takes them
        # for its report (take_notices), never into a block's outputs, which stay Jupyter's.
        self.notices: list[str] = list(sandbox.warnings) if sandbox is not None else []
        self.notices_due = False
        self._interrupt_target: tuple[Any, int, int] | None = None  # (manager, pid, start)

    def take_notices(self) -> list[str]:
        """The notices once per started kernel (a restart makes them due again)."""
        if not self.notices_due:
            return []
        self.notices_due = False
        return list(self.notices)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.sandbox is not None:
            self.sandbox.setup(self.runtime_dir, self.kernel_pid)
            spec = self.manager.kernel_spec
            if spec is not None:
                spec.interrupt_mode = self.sandbox.interrupt_mode
        try:
            self.manager.start_kernel(cwd=str(self.cwd), env=self._env(), independent=False)
            self._connect()
        except Exception:
            self._cleanup_failed_start()
            raise
        self.started = True

    def _cleanup_failed_start(self) -> None:
        try:
            if self.manager.has_kernel:
                self.manager.shutdown_kernel(now=True)
        except Exception:
            pass
        if self.sandbox is not None:
            self.sandbox.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def kernel_pid(self) -> int | None:
        """The pid of the launched process (the launcher/bwrap when sandboxed)."""
        process = getattr(getattr(self.manager, "provisioner", None), "process", None)
        return getattr(process, "pid", None)

    def _connect(self) -> None:
        client = self.manager.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=STARTUP_TIMEOUT)
        except RuntimeError as exc:
            client.stop_channels()
            raise KernelDied(f"the kernel did not start: {exc}") from None
        self.client = client
        self._note_interrupt_target()
        self._run_prelude()
        self.notices_due = bool(self.notices)

    def _run_prelude(self) -> None:
        assert self.client is not None
        msg_id = self.client.execute(prelude_code(), silent=True, store_history=False)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                message = self.client.get_shell_msg(timeout=0.5)
            except queue.Empty:
                if not self.manager.is_alive():
                    raise KernelDied("the kernel died while starting") from None
                continue
            if message["parent_header"].get("msg_id") == msg_id:
                return
        raise KernelDied("the kernel did not answer after starting")

    def restart(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        try:
            # restart=True keeps the zmq context and connection file for the next kernel.
            self.manager.shutdown_kernel(now=True, restart=True)
        except Exception:
            pass
        self._kill_leftovers()
        self.manager.start_kernel(cwd=str(self.cwd), env=self._env(), independent=False)
        self._connect()

    def _kill_leftovers(self) -> None:
        # What the kernel forked into other sessions survives a kill of its process group.
        if self.sandbox is not None:
            self.sandbox.kill_all()

    def is_alive(self) -> bool:
        return bool(self.started and self.manager.is_alive())

    def shutdown(self) -> None:
        try:
            if self.client is not None:
                self.client.stop_channels()
            if self.manager.has_kernel:
                self.manager.shutdown_kernel(now=False)
        except Exception:
            try:
                self.manager.shutdown_kernel(now=True)
            except Exception:
                pass
        finally:
            self.client = None
            self.started = False
            if self.sandbox is not None:
                self.sandbox.close()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> KernelSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def interrupt(self) -> None:
        # SIGINT in every tier: where jupyter_client cannot signal the kernel (bubblewrap),
        # the process found at start; its message interrupt only where none was found.
        target = self._interrupt_target
        if target is not None and target[0] is self.manager and self.sandbox is not None:
            if self.sandbox.interrupt(target[1], target[2]):
                return
        self.manager.interrupt_kernel()

    def _note_interrupt_target(self) -> None:
        """Find the kernel process now, before any of the note's code runs (a note could fork
        look-alikes later), for this manager's kernel only."""
        found = self.sandbox.interrupt_target() if self.sandbox is not None else None
        self._interrupt_target = (self.manager, *found) if found is not None else None

    # -- execution -------------------------------------------------------------------
    def _receive(self, get: Callable[..., dict[str, Any]], wait: float) -> tuple[bool, dict[str, Any] | None]:
        """(whether the kernel lives, the channel's next message or None if none came in `wait`)."""
        try:
            return True, get(timeout=wait)
        except ValueError:
            return True, None  # a message that fails its signature check (a forked child's?)
        except queue.Empty:
            return self.manager.is_alive(), None

    def execute(
        self,
        code: str,
        timeout: float,
        on_output: OutputCallback | None = None,
        silent: bool = False,
        user_expressions: dict[str, str] | None = None,
    ) -> Execution:
        assert self.client is not None, "start() the session first"
        started = time.monotonic()
        deadline = started + timeout
        self._drain_iopub()
        msg_id = self.client.execute(
            code,
            silent=silent,
            store_history=not silent,
            allow_stdin=False,
            stop_on_error=False,
            user_expressions=user_expressions or {},
        )
        collector = OutputCollector(on_output)
        reply: dict[str, Any] | None = None
        status = "ok"
        restarted = False
        interrupted_at: float | None = None
        idle_at: float | None = None
        while reply is None or not collector.idle:
            now = time.monotonic()
            if interrupted_at is None and now >= deadline:
                status = "timeout"
                interrupted_at = now
                self._try_interrupt()
            elif interrupted_at is not None and now >= interrupted_at + INTERRUPT_GRACE:
                # The interrupt was ignored (a C loop, a blocked signal): start over.
                self.restart()
                restarted = True
                break
            wait_until = deadline if interrupted_at is None else interrupted_at + INTERRUPT_GRACE
            wait = max(0.0, min(wait_until - time.monotonic(), 0.5))
            if not collector.idle:
                alive, message = self._receive(self.client.get_iopub_msg, wait)
                if not alive:
                    status = "dead"
                    break
                if message is not None and message["parent_header"].get("msg_id") == msg_id:
                    collector.handle(message)
            else:
                if idle_at is None:
                    idle_at = time.monotonic()
                elif time.monotonic() - idle_at > LOST_REPLY_GRACE:
                    # The kernel went idle for our request but its reply never came: ipykernel
                    # drops it when an interrupt lands just as the block ends. The iopub side
                    # already holds everything the block did; do not wait out the timeout.
                    reply = reply_from_outputs(collector.outputs)
                    break
                alive, message = self._receive(self.client.get_shell_msg, min(wait, LOST_REPLY_GRACE))
                if not alive:
                    status = "dead"
                    break
                if message is not None and message["parent_header"].get("msg_id") == msg_id:
                    reply = message["content"]
        if status == "dead":
            reason = self.sandbox.death_reason() if self.sandbox is not None else None
            if reason:
                collector.outputs.append({"output_type": "stream", "name": "stderr", "text": reason + "\n"})
            self._restart_after_death()
            restarted = True
        if status == "ok" and reply is not None and reply.get("status") == "error":
            status = "error"
            if not any(o["output_type"] == "error" for o in collector.outputs):
                collector.outputs.append(to_output("error", reply))
        if status == "ok" and reply is not None and reply.get("status") == "aborted":
            status = "error"
        count = (reply or {}).get("execution_count") or collector.execution_count
        return Execution(
            status=status,
            outputs=collector.outputs,
            execution_count=count,
            duration=time.monotonic() - started,
            kernel_restarted=restarted,
            dropped_bytes=collector.dropped_bytes,
            dropped_images=collector.dropped_images,
            user_expressions=(reply or {}).get("user_expressions", {}),
        )

    def _try_interrupt(self) -> None:
        try:
            self.interrupt()
        except Exception:
            pass

    def _restart_after_death(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        try:
            self.manager.cleanup_resources(restart=True)  # keep the zmq context for the new kernel
        except Exception:
            pass
        self._kill_leftovers()
        self.manager.start_kernel(cwd=str(self.cwd), env=self._env(), independent=False)
        self._connect()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.sandbox is not None:
            env.update(self.sandbox.env())
        env.update(self.extra_env)
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        env.pop("JPY_PARENT_PID", None)
        return env

    def _drain_iopub(self) -> None:
        assert self.client is not None
        while True:
            try:
                self.client.get_iopub_msg(timeout=0)
            except ValueError:
                continue
            except queue.Empty:
                return
