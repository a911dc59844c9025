"""A kernel forked from a template: its pidfd, signals, readiness, and a KernelManager for it."""

from __future__ import annotations

import contextlib
import os
import queue
import select
import shutil
import signal
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager

if TYPE_CHECKING:
    from vault_runner.kernel.fork.template import KernelTemplate
    from vault_runner.kernel.sandbox import Sandbox
    from vault_runner.kernel.sandbox.cgroup import Cgroup

from vault_runner.errors import ForkError


class ForkedKernel:
    """A kernel process forked from a template; driven with a BlockingKernelClient."""

    def __init__(
        self,
        template: KernelTemplate,
        request_id: int,
        pid: int,
        ns_pid: int,
        pidfd: int,
        connection_file: Path,
        cwd: Path,
        owned_dir: Path | None,
    ) -> None:
        self.template = template
        self.request_id = request_id
        self.pid = pid  # in our pid namespace
        self.ns_pid = ns_pid  # in the template's (bubblewrap's) pid namespace
        self.pidfd: int | None = pidfd
        self.connection_file = connection_file  # a name only: the file is never written
        self.private_env: dict[str, str] = {}  # its own temp, cache and config folders
        self.connection_info: dict[str, Any] = {}  # ports, ipc path, key: known here and to the kernel alone
        self.cwd = cwd
        self._owned_dir = owned_dir
        self.returncode: int | None = None
        self.waiting: socket.socket | None = None  # a spare's line to its child, until a note takes it
        # A spare's own cgroup, joined when it was made, until a note's sandbox adopts it;
        # a spare's client, connected while it waits (`connect_ahead`).
        self.cgroup: Cgroup | None = None
        self.connected: BlockingKernelClient | None = None

    def __repr__(self) -> str:
        return f"ForkedKernel(pid={self.pid}, connection_file={str(self.connection_file)!r})"

    # -- process ----------------------------------------------------------------------------
    def is_alive(self) -> bool:
        if self.pidfd is None:
            return False
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        return not ready

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to end; its exit status (negative: a signal), None on timeout.

        The status comes from the template, which reaps it; when the template is gone
        and never said, a process known to have ended reads as -SIGKILL.
        """
        if self.pidfd is not None:
            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if not ready:
                return None
        if self.returncode is None:
            self.returncode = self.template._exit_status(self.request_id, 1.0 if timeout is None else min(timeout, 1.0))
        return self.returncode if self.returncode is not None else -signal.SIGKILL

    def send_signal(self, signum: int, group: bool = True) -> None:
        """Signal the kernel (and, with `group`, its process group: what the note started)."""
        if self.pidfd is None or not self.is_alive():
            return
        if group:
            # The pid is the group's id while the leader lives (it has not been reaped:
            # the pidfd says so), so this cannot hit a stranger's group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            signal.pidfd_send_signal(self.pidfd, signum)

    def interrupt(self) -> None:
        self.send_signal(signal.SIGINT)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    # -- Jupyter ----------------------------------------------------------------------------
    def client(self) -> BlockingKernelClient:
        client = BlockingKernelClient()
        client.load_connection_info(self.connection_info)  # type: ignore[arg-type]
        return client

    def connect_ahead(self, timeout: float = 5.0) -> None:
        """Connect a client to a spare while it waits for its note, until its iopub says
        welcome (ipykernel 7 sends one per subscription from its iopub thread, which runs
        already): the note's session then takes it (`take_client`) and needs no readiness
        wait, its first request queued until the kernel serves. Without a welcome (an
        older ipykernel) nothing is kept and the session connects as usual."""
        client = self.client()
        try:
            client.start_channels()
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    if client.get_iopub_msg(timeout=left)["msg_type"] == "iopub_welcome":
                        self.connected = client
                        return
                except queue.Empty:
                    break
                except ValueError:
                    continue  # a message that fails its signature check
        except Exception:
            pass  # (e.g. out of file descriptors) only the head start is lost
        with contextlib.suppress(Exception):
            client.stop_channels()

    def take_client(self) -> BlockingKernelClient | None:
        """The client connected ahead, once (None: connect and wait for readiness)."""
        client, self.connected = self.connected, None
        return client

    def shutdown(self, now: bool = False, timeout: float = 5.0, wait: bool = True) -> None:
        """Ask the kernel to shut down (unless `now`), kill it if it has not ended after
        `timeout`, clean up. With `wait=False` this returns once the request is sent and
        the rest happens on a thread (a batch goes on to the next note)."""
        if not wait:
            threading.Thread(
                target=self.shutdown, args=(now, timeout), name="vault-runner-kernel-shutdown", daemon=True
            ).start()
            return
        if not now and self.is_alive():
            client = self.client()
            try:
                client.start_channels(shell=False, iopub=False, stdin=False, hb=False, control=True)
                client.shutdown()
                self.wait(timeout)
            except Exception:
                pass
            finally:
                client.stop_channels()
        if self.is_alive():
            self.kill()
            self.wait(timeout)
        self.close()

    def close(self) -> None:
        """Release the pidfd and the kernel's own folder (connection file, sockets)."""
        if self.waiting is not None:
            self.waiting.close()
            self.waiting = None
        if self.connected is not None:
            self.connected.stop_channels()
            self.connected = None
        if self.pidfd is not None:
            if self.is_alive():
                self.kill()
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None
        self.template._forget(self)
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None


def wait_for_ready(client: BlockingKernelClient, timeout: float = 60.0, alive: Any = None) -> dict[str, Any]:
    """Wait until the kernel answers kernel_info on shell and publishes on iopub; the reply.

    jupyter_client's `wait_for_ready` ends with 0.2 s of listening on iopub, more than a
    forked kernel takes to start. This returns as soon as both channels are known to work:
    the kernel's `iopub_welcome` (ipykernel 7 sends one per subscription) or its status
    for one of our requests arrived on iopub. The channels must be started.
    """
    deadline = time.monotonic() + timeout
    sent = {client.kernel_info()}
    last_sent = time.monotonic()
    reply: dict[str, Any] | None = None
    iopub_ok = False
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise ForkError(f"the kernel did not answer within {timeout:g} s")
        if reply is None:
            with contextlib.suppress(queue.Empty):
                message = client.get_shell_msg(timeout=0.005 if not iopub_ok else 0.05)
                if message["parent_header"].get("msg_id") in sent and message["msg_type"] == "kernel_info_reply":
                    reply = message["content"]
        if not iopub_ok:
            with contextlib.suppress(queue.Empty):
                message = client.get_iopub_msg(timeout=0.005 if reply is None else 0.05)
                kind = message["msg_type"]
                if kind == "iopub_welcome" or (kind == "status" and message["parent_header"].get("msg_id") in sent):
                    iopub_ok = True
        if reply is not None and iopub_ok:
            return reply
        if time.monotonic() - last_sent > 0.5:
            if alive is not None and not alive():
                raise ForkError("the kernel died before it answered")
            sent.add(client.kernel_info())  # its status shows that iopub works
            last_sent = time.monotonic()


# -- the template -----------------------------------------------------------------------------
class _ForkedProcess:
    """What KernelSession and the pool read of a provisioner: `.process.pid`."""

    def __init__(self, kernel: ForkedKernel) -> None:
        self.kernel = kernel
        self.pid = kernel.pid

    def poll(self) -> int | None:
        return None if self.kernel.is_alive() else self.kernel.wait(0)


class _ForkedProvisioner:
    def __init__(self, kernel: ForkedKernel) -> None:
        self.process = _ForkedProcess(kernel)

    @property
    def has_process(self) -> bool:
        return True


class ForkedKernelManager(KernelManager):
    """A KernelManager whose kernels are forked from a KernelTemplate.

    With `sandbox`, each kernel gets the note's process cap and cgroup (re-read at every
    start: a restart's kernel joins the cgroup the sandbox holds then). Covers what
    kernel.KernelSession uses: start_kernel (cwd, env), client(), is_alive(),
    interrupt_kernel(), signal_kernel(), shutdown_kernel(now, restart), restart_kernel(),
    cleanup_resources(), has_kernel, provisioner.process.pid. The connection file, ports
    and key are KernelManager's own (`transport="ipc"`, `ip=` a path in the template's
    runtime folder), so clients made by `client()` skip the heartbeat wait.
    """

    def __init__(
        self,
        template: KernelTemplate,
        *,
        sandbox: Sandbox | None = None,
        replace_env: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("kernel_name", "python3")
        super().__init__(**kwargs)
        self.template = template
        self.sandbox = sandbox  # the note's own part of the sandbox: its cgroup, its process cap
        self.replace_env = replace_env
        self.forked: ForkedKernel | None = None
        self._last_env: dict[str, str] | None = None
        self._last_cwd: str | None = None

    @property
    def has_kernel(self) -> bool:  # type: ignore[override]
        return self.forked is not None

    def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
        cwd = kw.get("cwd") or self._last_cwd or os.getcwd()
        env = kw.get("env") or self._last_env
        self._last_cwd, self._last_env = cwd, env
        self._release()  # the kernel before a restart (after a death, the session only cleans up)
        sandbox = self.sandbox
        cgroup = sandbox.cgroup if sandbox is not None else None
        self.forked = self.template.fork(
            cwd,
            env,
            replace_env=self.replace_env and env is not None,
            rlimits={"nproc": sandbox.nproc} if sandbox is not None and sandbox.nproc else {},
            cgroup=cgroup,
            adopt_cgroup=sandbox.adopt_cgroup if cgroup is not None else None,
        )
        # Ports, key and ipc path are the forked kernel's own (a spare was bound before
        # its note was known): this manager and its clients take them from its file.
        self._adopt(self.forked.connection_info)
        self.provisioner = _ForkedProvisioner(self.forked)  # type: ignore[assignment]
        self._connect_control_socket()

    def _adopt(self, info: Mapping[str, Any]) -> None:
        self.transport, self.ip = info["transport"], info["ip"]
        for name in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"):
            setattr(self, name, int(info[name]))
        self.session.key = info["key"].encode()
        self.session.signature_scheme = info.get("signature_scheme", self.session.signature_scheme)
        self.connection_file = ""  # none is written: the key stays in memory
        self._connection_file_written = False  # the forked kernel's folder goes with it

    def _release(self) -> None:
        forked, self.forked = self.forked, None
        if forked is not None:
            forked.kill()
            forked.wait(5.0)
            forked.close()
        self._close_control_socket()

    def is_alive(self) -> bool:  # type: ignore[override]
        return self.forked is not None and self.forked.is_alive()

    def interrupt_kernel(self) -> None:  # type: ignore[override]
        if self.forked is not None:
            self.forked.interrupt()

    def signal_kernel(self, signum: int) -> None:  # type: ignore[override]
        if self.forked is not None:
            self.forked.send_signal(signum)

    def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:  # type: ignore[override]
        forked = self.forked
        if forked is not None:
            if not now and forked.is_alive():
                self._send_shutdown(restart)
                forked.wait(self.shutdown_wait_time)
            forked.kill()
            forked.wait(5.0)
            forked.close()
        self.forked = None
        self.provisioner = None
        self.cleanup_resources(restart=restart)

    def _send_shutdown(self, restart: bool) -> None:
        with contextlib.suppress(Exception):
            if self._control_socket is None:
                self._connect_control_socket()
            message = self.session.msg("shutdown_request", content={"restart": restart})
            self.session.send(self._control_socket, message)

    def restart_kernel(self, now: bool = False, newports: bool = False, **kw: Any) -> None:  # type: ignore[override]
        self.shutdown_kernel(now=now, restart=True)
        self.start_kernel(**kw)

    def cleanup_resources(self, restart: bool = False) -> None:  # type: ignore[override]
        if not restart:
            self.cleanup_connection_file()
        self.cleanup_ipc_files()
        self._close_control_socket()
        if self._created_context and not restart:
            self.context.destroy(linger=100)
