"""Jupyter kernel sessions: start, execute with a timeout, interrupt, restart, shut down.

Driven the way nbclient drives a kernel (jupyter_client + ipykernel), but synchronous
and per block, with our own timeout policy: interrupt first; if the kernel ignores the
interrupt, restart it. A kernel that dies is reported and restarted.
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

STARTUP_TIMEOUT = 60.0
INTERRUPT_GRACE = 5.0
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # per block, kept in memory; the rest is counted, not kept
MAX_IMAGES = 50  # per block

OutputCallback = Callable[[dict[str, Any]], None]


class KernelDied(Exception):
    pass


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
    """A KernelManager whose launch command can be wrapped (sandbox.py)."""

    command_wrapper: Callable[[list[str]], list[str]] | None = None

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        command = super().format_kernel_cmd(extra_arguments)
        if self.command_wrapper is not None:
            command = self.command_wrapper(command)
        return command


class KernelSession:
    """One IPython kernel over ipc sockets with an explicit connection file."""

    def __init__(
        self,
        cwd: Path,
        env: dict[str, str] | None = None,
        command_wrapper: Callable[[list[str]], list[str]] | None = None,
        runtime_dir: Path | None = None,
    ) -> None:
        self.cwd = cwd
        self.extra_env = dict(env or {})
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="vr-", dir=runtime_dir))
        manager = _KernelManager(
            kernel_name="python3",
            transport="ipc",
            ip=str(self.runtime_dir / "k"),
            connection_file=str(self.runtime_dir / "kernel.json"),
        )
        manager.command_wrapper = command_wrapper
        self.manager = manager
        self.client = None
        self.started = False

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        env.pop("JPY_PARENT_PID", None)
        self.manager.start_kernel(cwd=str(self.cwd), env=env, independent=False)
        self._connect()
        self.started = True

    def _connect(self) -> None:
        client = self.manager.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=STARTUP_TIMEOUT)
        except RuntimeError as exc:
            client.stop_channels()
            raise KernelDied(f"the kernel did not start: {exc}") from None
        self.client = client

    def restart(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
            self.client = None
        try:
            self.manager.restart_kernel(now=True)
        except RuntimeError:
            self.manager.start_kernel(cwd=str(self.cwd))
        self._connect()

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
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> KernelSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    # -- execution -------------------------------------------------------------------
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
        collector = _Collector(on_output)
        reply: dict[str, Any] | None = None
        status = "ok"
        restarted = False
        interrupted_at: float | None = None
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
                try:
                    message = self.client.get_iopub_msg(timeout=wait)
                except queue.Empty:
                    if not self.manager.is_alive():
                        status = "dead"
                        break
                    continue
                if message["parent_header"].get("msg_id") == msg_id:
                    collector.handle(message)
            else:
                try:
                    message = self.client.get_shell_msg(timeout=wait)
                except queue.Empty:
                    if not self.manager.is_alive():
                        status = "dead"
                        break
                    continue
                if message["parent_header"].get("msg_id") == msg_id:
                    reply = message["content"]
        if status == "dead":
            self._restart_after_death()
            restarted = True
        if status == "ok" and reply is not None and reply.get("status") == "error":
            status = "error"
            if not any(o["output_type"] == "error" for o in collector.outputs):
                collector.outputs.append(_to_output("error", reply))
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
            self.manager.cleanup_resources()
        except Exception:
            pass
        self.manager.start_kernel(cwd=str(self.cwd), env=self._env())
        self._connect()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        return env

    def _drain_iopub(self) -> None:
        assert self.client is not None
        while True:
            try:
                self.client.get_iopub_msg(timeout=0)
            except queue.Empty:
                return


class _Collector:
    """Turns iopub messages of one execution into nbformat-style outputs."""

    def __init__(self, on_output: OutputCallback | None) -> None:
        self.outputs: list[dict[str, Any]] = []
        self.on_output = on_output
        self.idle = False
        self.execution_count: int | None = None
        self.clear_pending = False
        self.kept_bytes = 0
        self.dropped_bytes = 0
        self.images = 0
        self.dropped_images = 0

    def handle(self, message: dict[str, Any]) -> None:
        kind = message["msg_type"]
        content = message["content"]
        if kind == "status":
            if content.get("execution_state") == "idle":
                self.idle = True
            return
        if kind == "execute_input":
            self.execution_count = content.get("execution_count")
            return
        if kind == "clear_output":
            if content.get("wait"):
                self.clear_pending = True
            else:
                self.outputs.clear()
            return
        output = _to_output(kind, content)
        if output is None:
            return
        if self.clear_pending:
            self.outputs.clear()
            self.clear_pending = False
        if not self._within_limits(output):
            return
        self.outputs.append(output)
        if self.on_output is not None:
            self.on_output(output)

    def _within_limits(self, output: dict[str, Any]) -> bool:
        data = output.get("data", {})
        if any(m.startswith("image/") for m in data):
            self.images += 1
            if self.images > MAX_IMAGES:
                self.dropped_images += 1
                return False
        size = len(str(output.get("text", ""))) + sum(len(str(v)) for v in data.values())
        if self.kept_bytes + size > MAX_OUTPUT_BYTES:
            self.dropped_bytes += size
            return False
        self.kept_bytes += size
        return True


def _to_output(kind: str, content: dict[str, Any]) -> dict[str, Any] | None:
    if kind == "stream":
        return {"output_type": "stream", "name": content.get("name", "stdout"), "text": content.get("text", "")}
    if kind in {"display_data", "update_display_data"}:
        return {"output_type": "display_data", "data": content.get("data", {}), "metadata": content.get("metadata", {})}
    if kind == "execute_result":
        return {
            "output_type": "execute_result",
            "data": content.get("data", {}),
            "metadata": content.get("metadata", {}),
            "execution_count": content.get("execution_count"),
        }
    if kind == "error":
        return {
            "output_type": "error",
            "ename": content.get("ename", "Error"),
            "evalue": content.get("evalue", ""),
            "traceback": content.get("traceback", []),
        }
    return None


def python_executable() -> str:
    return sys.executable


def kernel_argv() -> Sequence[str]:
    return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
