"""Fresh kernels forked from a warm template (contract 12).

A `KernelTemplate` is one process per `TemplateKey` (vault, sandbox policy, device class,
hash seed), started with the same launch command prefix and environment that the sandbox
gives a kernel, so it lives inside bubblewrap or Landlock exactly as a kernel would. It
imports ipykernel, IPython, numpy, torch and matplotlib, runs no user code, starts no
thread and no ZMQ context, never initialises CUDA, and waits on a control socket
(forkserver_child.py). `KernelTemplate.fork` asks it for a kernel: the child calls
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

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from jupyter_client.manager import KernelManager

CHILD_SCRIPT = Path(__file__).with_name("forkserver_child.py")

# What every kernel imports. Modules only: nothing here may start a thread, a ZMQ context
# or CUDA. matplotlib.pyplot is imported but its backend is not resolved (that happens at
# the first figure, in the kernel, after MPLBACKEND is known), and matplotlib_inline's
# backend module is left out on purpose: it wires itself into the IPython shell when it
# is imported, and there is no shell in the template.
DEFAULT_PRELOAD = (
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.comm",
    "IPython",
    "IPython.core.interactiveshell",
    "IPython.core.completer",
    "IPython.core.magics",
    "IPython.core.completerlib",
    "ipykernel.debugger",  # debugpy and pydevd: 0.2 s of every kernel start
    "tornado.gen",
    "tornado.locks",
    "tornado.queues",
    "tornado.platform.asyncio",
    "faulthandler",
    "jedi",
    "numpy",
    "torch",
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib.backends.backend_agg",
    "PIL.Image",
)
# As kernel.py's launch: no IPython history database. The parent poller is off (the
# kernel dies with its template through PR_SET_PDEATHSIG instead): a parent of 1 turns
# it off and, unlike 0, does not print ipykernel's "use --existing" banner.
DEFAULT_KERNEL_ARGS = ("--HistoryManager.enabled=False", "--IPKernelApp.parent_handle=1")
DEFAULT_MPLBACKEND = "module://matplotlib_inline.backend_inline"
STARTUP_TIMEOUT = 120.0
FORK_TIMEOUT = 30.0
_MAX_MESSAGE = 1 << 20


class ForkUnavailable(Exception):
    """This template cannot give this kernel; start one the normal way. str() says why."""


class ForkError(Exception):
    """The template failed (it died, a fork failed, the child could not set up)."""


def fork_unavailable_reason() -> str | None:
    """None when this platform can fork kernels from a template, else one line saying why not."""
    if not sys.platform.startswith("linux"):
        return f"forking kernels needs Linux (this is {sys.platform})"
    for name in ("fork", "pidfd_open"):
        if not hasattr(os, name):
            return f"this Python has no os.{name}"
    if not hasattr(socket, "SCM_CREDENTIALS") or not hasattr(signal, "pidfd_send_signal"):
        return "this Python has no SCM_CREDENTIALS or pidfd_send_signal"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return f"pidfd_open does not work here ({exc}; Linux 5.3+ is needed)"
    return None


@dataclass(frozen=True)
class TemplateKey:
    """What a template is shared by: notes whose kernels would be launched alike."""

    vault: str
    sandbox: str  # the launch policy: tier and everything fixed at launch (network ...)
    device_class: str  # cpu | cuda | mps
    hash_seed: str  # PYTHONHASHSEED, "random" when unset: fixed at interpreter start

    @classmethod
    def for_launch(
        cls,
        vault: str | os.PathLike[str] | None,
        tier: str,
        env: Mapping[str, str],
        *,
        network: bool = True,
        device: str = "auto",
        extra: Mapping[str, Any] | None = None,
    ) -> TemplateKey:
        """A key from a sandbox tier and a note's launch options (sandbox.Policy's fields).

        Per-note limits (memory, processes, timeout) are not in it: they are applied per
        forked kernel. `network` is: `network: false` notes get a template of their own.
        """
        policy = {"tier": tier, "network": bool(network), **dict(extra or {})}
        return cls(
            vault=str(Path(vault).resolve()) if vault else "",
            sandbox=json.dumps(policy, sort_keys=True),
            device_class=device_class(device),
            hash_seed=env.get("PYTHONHASHSEED") or "random",
        )


def device_class(device: str) -> str:
    """cuda:1 and cuda share a template (CUDA_VISIBLE_DEVICES is set per kernel)."""
    kind = (device or "auto").split(":")[0]
    return kind if kind in {"cpu", "cuda", "mps"} else "auto"


# -- one forked kernel ------------------------------------------------------------------------
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
        self.connection_file = connection_file
        self.cwd = cwd
        self._owned_dir = owned_dir
        self.returncode: int | None = None

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
        client = BlockingKernelClient(connection_file=str(self.connection_file))
        client.load_connection_file()
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
        if self.pidfd is not None:
            if self.is_alive():
                self.kill()
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None
        self.template._forget(self)
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
class KernelTemplate:
    """A warm process that forks fresh kernels. Thread-safe; use as a context manager.

    `launch_prefix` is the sandbox's launch command without the kernel's own argv
    (`Sandbox.wrap([])`); `env` the full environment a kernel of this key is launched with
    (what KernelSession._env() gives); `runtime_dir` a folder the sandbox lets the kernel
    write (the sandbox's runtime folder): every forked kernel gets a folder in it for its
    connection file and ipc sockets.
    """

    def __init__(
        self,
        key: TemplateKey | None = None,
        *,
        launch_prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        runtime_dir: str | os.PathLike[str] | None = None,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        kernel_args: Sequence[str] = DEFAULT_KERNEL_ARGS,
        preinitialize: bool = True,
        python: str = sys.executable,
        stdout: Any = None,
        stderr: Any = None,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("MPLBACKEND", DEFAULT_MPLBACKEND)
        self.env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # as kernel.py's launch env
        self.key = key or TemplateKey(
            "", json.dumps({"tier": "none"}), "auto", self.env.get("PYTHONHASHSEED") or "random"
        )
        self.launch_prefix = list(launch_prefix)
        self.cwd = Path(cwd) if cwd is not None else None
        self._own_runtime = runtime_dir is None
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="vr-fork-")) if runtime_dir is None else Path(runtime_dir)
        self.preload = list(preload)
        self.kernel_args = list(kernel_args)
        self.preinitialize = preinitialize
        self.python = python
        self.stdout, self.stderr = stdout, stderr
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self._control: socket.socket | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._statuses: dict[int, int] = {}
        self._kernels: dict[int, ForkedKernel] = {}
        self._ids = itertools.count(1)
        self._reader: threading.Thread | None = None
        self._closed = False
        self.died: str | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> KernelTemplate:
        reason = fork_unavailable_reason()
        if reason is not None:
            raise ForkUnavailable(reason)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = {
            "preload": self.preload,
            "cwd": str(self.cwd) if self.cwd else None,
            "kernel_args": self.kernel_args,
            "preinitialize": self.preinitialize,
        }
        argv = [*self.launch_prefix, self.python, str(CHILD_SCRIPT), str(theirs.fileno()), json.dumps(spec)]
        try:
            self.process = subprocess.Popen(
                argv,
                env=self.env,
                cwd=str(self.cwd) if self.cwd else None,
                stdin=subprocess.DEVNULL,
                stdout=self.stdout,
                stderr=self.stderr,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise ForkError(f"the kernel template could not be started: {exc}") from None
        finally:
            theirs.close()
        self._control = ours
        ours.settimeout(self.startup_timeout)
        try:
            data = ours.recv(_MAX_MESSAGE)
        except TimeoutError:
            self.close()
            raise ForkError(f"the kernel template did not start within {self.startup_timeout:g} s") from None
        if not data:
            code = self.process.wait(5)
            self.close()
            raise ForkError(f"the kernel template exited while starting (status {code})")
        self.info = json.loads(data)
        ours.settimeout(None)
        if self.info.get("cuda_initialized") or self.info.get("zmq_context"):
            self.close()
            raise ForkError(f"the kernel template is not safe to fork: {self.info}")
        self._reader = threading.Thread(target=self._read, name="vault-runner-template-reader", daemon=True)
        self._reader.start()
        return self

    def __enter__(self) -> KernelTemplate:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.died is None and not self._closed

    def close(self, timeout: float = 10.0) -> None:
        """Kill every kernel forked from it, then end the template. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            control, self._control = self._control, None
        for kernel in list(self._kernels.values()):
            kernel.kill()
        if control is not None:
            with contextlib.suppress(OSError):
                control.send(json.dumps({"op": "close"}).encode())
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(self.process.pid)
                self.process.kill()
                self.process.wait(timeout)
        if control is not None:
            control.close()
        if self._reader is not None:
            self._reader.join(timeout)
        for kernel in list(self._kernels.values()):
            kernel.close()
        if self._own_runtime:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # -- serving ----------------------------------------------------------------------------
    def refusal(self, key: TemplateKey | None = None, env: Mapping[str, str] | None = None) -> str | None:
        """None when this template can give a kernel for `key` and `env`, else why not."""
        if not self.is_alive():
            return self.died or "the kernel template is not running"
        if key is not None and key != self.key:
            return "the note's launch options differ from the template's"
        if env is not None:
            wanted = env.get("PYTHONHASHSEED") or "random"
            have = self.env.get("PYTHONHASHSEED") or "random"
            if wanted != have:
                return f"PYTHONHASHSEED={wanted} differs from the template's ({have})"
        return None

    def connection_file(self) -> Path:
        """A fresh folder in the runtime folder with an ipc connection file in it."""
        folder = Path(tempfile.mkdtemp(prefix="k", dir=self.runtime_dir))
        path = folder / "kernel.json"
        write_connection_file(
            str(path), ip=str(folder / "k"), transport="ipc", key=secrets.token_hex(16).encode(), kernel_name="python3"
        )
        return path

    def fork(
        self,
        cwd: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        *,
        connection_file: str | os.PathLike[str] | None = None,
        replace_env: bool = False,
        rlimits: Mapping[str, int] | None = None,
        cgroup: str | os.PathLike[str] | None = None,
        timeout: float = FORK_TIMEOUT,
    ) -> ForkedKernel:
        """A new kernel in `cwd` with `env` applied (a value None removes a variable; with
        `replace_env` it is the whole environment). `rlimits` ({"nproc": n, "core": 0})
        are set in the child; with `cgroup` (a cgroup folder) the child is moved into it
        before it runs anything. Without `connection_file` one is made in the runtime
        folder (and removed with the kernel). Raises ForkUnavailable or ForkError."""
        full_env = {**(self.env if not replace_env else {}), **{k: v for k, v in (env or {}).items() if v is not None}}
        refusal = self.refusal(env=full_env)
        if refusal is not None:
            raise ForkUnavailable(refusal)
        owned = None
        if connection_file is None:
            connection_file = self.connection_file()
            owned = Path(connection_file).parent
        request_id = next(self._ids)
        request = {
            "op": "fork",
            "id": request_id,
            "cwd": str(cwd),
            "env": dict(env or {}),
            "replace_env": replace_env,
            "rlimits": dict(rlimits or {}),
            "connection_file": str(connection_file),
            "kernel_args": self.kernel_args,
        }
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            with self._lock:
                control = self._control
                if control is None:
                    raise ForkUnavailable("the kernel template is closed")
                try:
                    control.sendmsg(
                        [json.dumps(request).encode()],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", theirs.fileno()))],
                    )
                except OSError as exc:
                    raise ForkError(f"the kernel template is gone ({exc})") from None
            theirs.close()
            ours.settimeout(timeout)
            try:
                data, ancillary, _, _ = ours.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(12))
            except TimeoutError:
                raise ForkError(f"the kernel template did not fork within {timeout:g} s") from None
            if not data:
                raise ForkError(self.died or "the kernel template did not fork (it closed the request)")
            answer = json.loads(data)
            if "error" in answer:
                raise ForkError(f"the forked kernel could not be set up: {answer['error']}")
            pid = _credential_pid(ancillary)
            if pid is None:
                raise ForkError("the forked kernel did not say who it is")
            # The child waits for "go": its pid is certainly its own while we open the pidfd.
            pidfd = os.pidfd_open(pid)
            if cgroup is not None:
                try:
                    Path(cgroup, "cgroup.procs").write_text(str(pid))
                except OSError as exc:
                    os.close(pidfd)
                    raise ForkError(f"the forked kernel could not join its cgroup: {exc}") from None
            kernel = ForkedKernel(
                self, request_id, pid, int(answer["pid"]), pidfd, Path(connection_file), Path(cwd), owned
            )
            with self._cond:
                self._kernels[request_id] = kernel
            ours.send(b'{"go": true}')
            try:
                data = ours.recv(_MAX_MESSAGE)
            except TimeoutError:
                kernel.close()
                raise ForkError(f"the forked kernel did not start within {timeout:g} s") from None
            if not data or not json.loads(data).get("bound"):
                status = kernel.wait(1.0)
                kernel.close()
                raise ForkError(f"the forked kernel exited while starting (status {status})")
            return kernel
        except BaseException:
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        finally:
            theirs.close()
            ours.close()

    # -- bookkeeping ------------------------------------------------------------------------
    def _read(self) -> None:
        control = self._control
        while control is not None:
            try:
                data = control.recv(_MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    if not self._closed:
                        self.died = "the kernel template died"
                    self._cond.notify_all()
                return
            message = json.loads(data)
            if message.get("op") == "exited" and message.get("id") is not None:
                with self._cond:
                    self._statuses[int(message["id"])] = int(message["status"])
                    kernel = self._kernels.get(int(message["id"]))
                    if kernel is not None and kernel.returncode is None:
                        kernel.returncode = int(message["status"])
                    self._cond.notify_all()

    def _exit_status(self, request_id: int, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while request_id not in self._statuses:
                left = deadline - time.monotonic()
                if left <= 0 or self.died is not None or self._control is None:
                    break
                self._cond.wait(left)
            return self._statuses.get(request_id)

    def _forget(self, kernel: ForkedKernel) -> None:
        with self._cond:
            self._kernels.pop(kernel.request_id, None)
            self._statuses.pop(kernel.request_id, None)

    def kernels(self) -> list[ForkedKernel]:
        with self._cond:
            return list(self._kernels.values())


def _credential_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            return int(struct.unpack("iII", data[:12])[0])
    return None


def _kill_tree(root: int) -> None:
    """The template and its descendants (a template that ignored "close")."""
    found, index = [root], 0
    while index < len(found):
        pid = found[index]
        index += 1
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    found.extend(int(c) for c in handle.read().split())
        except OSError:
            continue
    for pid in reversed(found):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- a KernelManager for kernel.KernelSession ---------------------------------------------------
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

    Covers what kernel.KernelSession uses: start_kernel (cwd, env), client(), is_alive(),
    interrupt_kernel(), signal_kernel(), shutdown_kernel(now, restart), restart_kernel(),
    cleanup_resources(), has_kernel, provisioner.process.pid. The connection file, ports
    and key are KernelManager's own (`transport="ipc"`, `ip=` a path in the template's
    runtime folder), so clients made by `client()` skip the heartbeat wait.
    """

    def __init__(
        self,
        template: KernelTemplate,
        *,
        rlimits: Mapping[str, int] | None = None,
        cgroup: str | os.PathLike[str] | None = None,
        replace_env: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("kernel_name", "python3")
        super().__init__(**kwargs)
        self.template = template
        self.rlimits = dict(rlimits or {})
        self.cgroup = cgroup
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
        if self.transport == "ipc":
            # Ports are numbered files next to `ip`; remove any a dead kernel left behind.
            for port in (self.shell_port, self.iopub_port, self.stdin_port, self.hb_port, self.control_port):
                if port:
                    with contextlib.suppress(OSError):
                        os.unlink(f"{self.ip}-{port}")
        self.write_connection_file()
        self.forked = self.template.fork(
            cwd,
            env,
            connection_file=self.connection_file,
            replace_env=self.replace_env and env is not None,
            rlimits=self.rlimits,
            cgroup=self.cgroup,
        )
        self.provisioner = _ForkedProvisioner(self.forked)  # type: ignore[assignment]
        self._connect_control_socket()

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
