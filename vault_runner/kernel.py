"""Jupyter kernel sessions: start, execute with a timeout, interrupt, restart, shut down.

Driven the way nbclient drives a kernel (jupyter_client + ipykernel), but synchronous
and per block, with our own timeout policy: interrupt first; if the kernel ignores the
interrupt, restart it. A kernel that dies is reported and restarted.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

from .errors import KernelDied
from .sandbox import Sandbox

STARTUP_TIMEOUT = 60.0
INTERRUPT_GRACE = 5.0
LOST_REPLY_GRACE = 3.0  # seconds to wait for the reply once the kernel went idle for a request
MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # per block, kept in memory; the rest is counted, not kept
MAX_IMAGES = 50  # per block
MAX_IMAGE_BYTES = 4 * 1024 * 1024  # per image, as sent (base64)
MAX_LINE_CHARS = 10_000  # per line of text output: one 200 MB line must not land in the note
_LINE_END_RE = re.compile(r"(?<=[\r\n])")

# Run silently in every new kernel. Caps stream output inside the kernel, per execution, so
# a block printing a gigabyte never sends it (the session below would drop it anyway, but
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
__vault_runner_cap_streams(%d)
__vault_runner_cap_figures(%d)
del __vault_runner_cap_streams, __vault_runner_cap_figures
"""
_DROPPED_MIME = "application/x-vault-runner-dropped+json"

OutputCallback = Callable[[dict[str, Any]], None]


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
        # No IPython history database: notes do not need it, it costs several ms per
        # block, and it would write every note's code into ~/.ipython.
        command = super().format_kernel_cmd([*(extra_arguments or []), "--HistoryManager.enabled=False"])
        if self.command_wrapper is not None:
            command = self.command_wrapper(command)
        return command


class KernelSession:
    """One IPython kernel over ipc sockets with an explicit connection file.

    With a `sandbox` (sandbox.py) the kernel is launched inside it, with its limits; the
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
        # Lines the user must see (e.g. "no sandbox"), put before the first block's outputs.
        self.notices: list[str] = list(sandbox.warnings) if sandbox is not None else []
        self.notices_due = False

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
        self._run_prelude()
        self.notices_due = bool(self.notices)

    def _run_prelude(self) -> None:
        assert self.client is not None
        msg_id = self.client.execute(
            _PRELUDE % (_DROPPED_MIME, MAX_OUTPUT_BYTES + 1024, MAX_IMAGES), silent=True, store_history=False
        )
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
        if not silent and self.notices_due:
            self.notices_due = False
            for notice in self.notices:
                collector.outputs.append({"output_type": "stream", "name": "stderr", "text": notice + "\n"})
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
                try:
                    message = self.client.get_iopub_msg(timeout=wait)
                except ValueError:
                    continue  # a message that fails its signature check (a forked child's?)
                except queue.Empty:
                    if not self.manager.is_alive():
                        status = "dead"
                        break
                    continue
                if message["parent_header"].get("msg_id") == msg_id:
                    collector.handle(message)
            else:
                if idle_at is None:
                    idle_at = time.monotonic()
                elif time.monotonic() - idle_at > LOST_REPLY_GRACE:
                    # The kernel went idle for our request but its reply never came: ipykernel
                    # drops it when an interrupt lands just as the block ends. The iopub side
                    # already holds everything the block did; do not wait out the timeout.
                    reply = _reply_from_outputs(collector.outputs)
                    break
                try:
                    message = self.client.get_shell_msg(timeout=min(wait, LOST_REPLY_GRACE))
                except ValueError:
                    continue
                except queue.Empty:
                    if not self.manager.is_alive():
                        status = "dead"
                        break
                    continue
                if message["parent_header"].get("msg_id") == msg_id:
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


def _reply_from_outputs(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [o for o in outputs if o.get("output_type") == "error"]
    if errors:
        return {"status": "error", **{k: errors[-1].get(k) for k in ("ename", "evalue", "traceback")}}
    return {"status": "ok"}


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
        self.line_length: dict[str, int] = {}  # per stream, the length of its unfinished line

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
        self.dropped_bytes += int(content.get("vault_runner_dropped", 0) or 0)
        output = _to_output(kind, content)
        if output is None:
            return
        if kind == "stream" and not output["text"]:
            return
        dropped = output.get("data", {}).get(_DROPPED_MIME)
        if isinstance(dropped, dict):
            self.dropped_images += int(dropped.get("dropped_images", 0) or 0)
            return
        if self.clear_pending:
            self.outputs.clear()
            self.clear_pending = False
        if not self._within_limits(output):
            return
        self.outputs.append(output)
        if self.on_output is not None:
            self.on_output(output)

    def _cut_long_lines(self, stream: str | None, text: str) -> str:
        """Cut every line at MAX_LINE_CHARS (a stream's line may span several messages)."""
        if stream is None and len(text) <= MAX_LINE_CHARS:
            return text
        length = self.line_length.get(stream, 0) if stream else 0
        pieces = _LINE_END_RE.split(text)
        if length + len(pieces[0]) <= MAX_LINE_CHARS and max(map(len, pieces)) <= MAX_LINE_CHARS:
            # The common case: no long line. Only remember where the last line stands.
            last = pieces[-1]
            if stream:
                self.line_length[stream] = len(last) + (length if len(pieces) == 1 else 0) if last else 0
            return text
        kept = []
        for piece in pieces:
            if not piece:
                continue
            ended = piece[-1] in "\r\n"
            body = piece[:-1] if ended else piece
            room = max(MAX_LINE_CHARS - length, 0)
            if len(body) > room:
                self.dropped_bytes += len(body) - room
                # The marker is written once per line; length past the limit means "cut".
                body = body[:room] + (" [… line cut by vault-runner …]" if length <= MAX_LINE_CHARS else "")
                length = MAX_LINE_CHARS + 1
            else:
                length += len(body)
            kept.append(body + (piece[-1] if ended else ""))
            if ended:
                length = 0
        if stream:
            self.line_length[stream] = length
        return "".join(kept)

    def _within_limits(self, output: dict[str, Any]) -> bool:
        data = output.get("data", {})
        images = [m for m in data if m.startswith("image/")]
        if images:
            self.images += 1
            if self.images > MAX_IMAGES:
                self.dropped_images += 1
                return False
            size = sum(len(str(data[m])) for m in images)
            if size > MAX_IMAGE_BYTES:
                # Too big to be a plot worth a note: say so instead of writing a huge file.
                output.clear()
                output.update(
                    {
                        "output_type": "stream",
                        "name": "stderr",
                        "text": f"[vault-runner: an image of {size:,} bytes was dropped: the limit is "
                        f"{MAX_IMAGE_BYTES:,} bytes per image]\n",
                    }
                )
                return True
        if output.get("output_type") == "stream":
            text = self._cut_long_lines(str(output.get("name")), str(output.get("text", "")))
            room = max(MAX_OUTPUT_BYTES - self.kept_bytes, 0)
            if len(text) > room:
                # Keep the head of a huge print: it usually says what went wrong.
                self.dropped_bytes += len(text) - room
                if room == 0:
                    return False
                text = text[:room]
            output["text"] = text
            self.kept_bytes += len(text)
            return bool(text)
        if isinstance(data.get("text/plain"), str):
            data["text/plain"] = self._cut_long_lines(None, data["text/plain"])
        size = sum(len(str(v)) for v in data.values())
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
