"""The template process that imports the heavy modules once and forks fresh kernels."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vault_runner.errors import ForkError, ForkUnavailable
from vault_runner.kernel.fork.common import (
    CHILD_SCRIPT,
    DEFAULT_KERNEL_ARGS,
    DEFAULT_MPLBACKEND,
    DEFAULT_PRELOAD,
    FORK_TIMEOUT,
    MAX_MESSAGE,
    STARTUP_TIMEOUT,
    TemplateKey,
    fork_unavailable_reason,
)
from vault_runner.kernel.fork.forked import ForkedKernel
from vault_runner.kernel.sandbox.filesystem import kernel_mpl_dir

if TYPE_CHECKING:
    from vault_runner.kernel.sandbox.cgroup import Cgroup


class KernelTemplate:
    """A warm process that forks fresh kernels. Thread-safe; use as a context manager.

    `launch_prefix` is the sandbox's launch command without the kernel's own argv
    (`Sandbox.wrap([])`); `env` the full environment a kernel of this key is launched with
    (what KernelSession._env() gives); `runtime_dir` a folder the sandbox lets the kernel
    write (the sandbox's runtime folder): every forked kernel gets a folder in it for its
    ipc sockets. `isolate`: each forked kernel enters a Landlock domain of its own first
    (non-dumpable without Landlock), so it cannot touch the template or a sibling.

    No connection file is ever written: the key of each kernel goes to it alone, over
    its own socket (see _fork), and stays in this process (`kernel.connection_info`): a
    file in the runtime folder would be readable by every other kernel, which could then
    sign requests to a spare that a later note takes.
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
        startup_code: str | None = None,
        python: str = sys.executable,
        stdout: Any = None,
        stderr: Any = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        isolate: bool = True,
        writable: Sequence[str] | None = None,
        device_files: Sequence[str] = (),
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
        # Run silently in every kernel after it is initialised and before it serves (a
        # spare: before its note is known): e.g. the session's prelude, so that no note
        # waits for it. Never a note's code.
        self.startup_code = startup_code
        self.python = python
        self.stdout, self.stderr = stdout, stderr
        self.startup_timeout = startup_timeout
        self.isolate = isolate
        # With `isolate`: the folders (the vault's) and device nodes a kernel may write, on
        # top of its own folder; None: writes are left to the sandbox.
        self.writable = None if writable is None else list(writable)
        self.device_files = list(device_files)
        self.landlock: dict[str, Any] | None = None  # the tier's ruleset, applied by each fork (factory.py)
        self.harden = False  # each fork applies seccomp.py's hardening filter (factory.py)
        self.names: dict[str, object] | None = None  # and then starts its name supervisor
        # What of the runtime folder each fork may still see besides its own folder, which
        # hides the rest (its siblings' ipc sockets) where it has a mount namespace.
        self.keep_visible: list[Path] = []
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
        self._spares: list[ForkedKernel] = []
        self._spare_target = 0
        self._filler: threading.Thread | None = None
        # Makes the cgroup a spare joins when it is made (None: spares join none): joining
        # one takes ~10 ms on cgroup v1, which a note then does not wait for.
        self.spare_cgroup: Callable[[], Cgroup | None] | None = None

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
            "startup_code": self.startup_code,
            "isolate": self.isolate,
            "harden": self.harden,
            "names": self.names,
            "hide": {"folder": str(self.runtime_dir), "keep": [str(p) for p in self.keep_visible]},
            "writable": self.writable,
            "device_files": self.device_files,
            "landlock": self.landlock,
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
            data = ours.recv(MAX_MESSAGE)
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
        with self._cond:
            spares, self._spares = self._spares, []
            self._cond.notify_all()
        for kernel in spares:
            if kernel.waiting is not None:
                kernel.waiting.close()
                kernel.waiting = None
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
        if self._filler is not None:
            self._filler.join(timeout)
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

    def connection(self) -> tuple[Path, dict[str, Any]]:
        """A fresh folder in the runtime folder for a kernel's ipc sockets, and the
        connection info with a new key. Nothing is written: `path` only names the kernel."""
        folder = Path(tempfile.mkdtemp(prefix="k", dir=self.runtime_dir))
        info: dict[str, Any] = {
            "transport": "ipc",
            "ip": str(folder / "k"),
            **{name: port for port, name in enumerate(_PORT_NAMES, 1)},
            "key": secrets.token_hex(32),
            "signature_scheme": "hmac-sha256",
            "kernel_name": "python3",
        }
        return folder / "kernel.json", info

    def fork(
        self,
        cwd: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        *,
        connection_file: str | os.PathLike[str] | None = None,
        replace_env: bool = False,
        rlimits: Mapping[str, int] | None = None,
        cgroup: Cgroup | None = None,
        adopt_cgroup: Callable[[Cgroup], bool] | None = None,
        timeout: float = FORK_TIMEOUT,
    ) -> ForkedKernel:
        """A new kernel in `cwd` with `env` applied (a value None removes a variable; with
        `replace_env` it is the whole environment). `rlimits` ({"nproc": n, "core": 0})
        are set in the child; with `cgroup` the child is moved into it
        before it runs anything of the note's (a fork: before it starts; a spare: once it
        took the note), unless it is a spare in a cgroup of its own that `adopt_cgroup`
        takes (True: it put the note's caps on it and owns it now; the kernel's `cgroup`
        is then None). Without `connection_file` one is made in the runtime
        folder (and removed with the kernel), or a ready spare is taken, whose connection
        info is its own (`kernel.connection_info`); a given `connection_file` is read, and
        its info sent to the kernel. Raises ForkUnavailable or ForkError."""
        full_env = {**(self.env if not replace_env else {}), **{k: v for k, v in (env or {}).items() if v is not None}}
        refusal = self.refusal(env=full_env)
        if refusal is not None:
            raise ForkUnavailable(refusal)
        placement = {
            "cwd": str(cwd),
            "env": dict(env or {}),
            "replace_env": replace_env,
            "rlimits": dict(rlimits or {}),
        }
        if connection_file is None:
            kernel = self._take_spare(placement, cgroup, adopt_cgroup, timeout)
            if kernel is not None:
                return kernel
        return self._fork(placement, connection_file, cgroup, timeout, spare=False)

    def _fork(
        self,
        placement: Mapping[str, Any],
        connection_file: str | os.PathLike[str] | None,
        cgroup: Cgroup | None,
        timeout: float,
        spare: bool,
    ) -> ForkedKernel:
        owned = None
        private: dict[str, str] = {}
        if connection_file is None:
            connection_file, info = self.connection()
            owned = Path(connection_file).parent
            if self.isolate and self.writable is not None:  # it may write only its own folder
                private = _private_env(owned)
                placement = {**placement, "env": {**placement["env"], **private}}
        else:
            info = json.loads(Path(connection_file).read_text())
        request_id = next(self._ids)
        request = {
            "op": "fork",
            "id": request_id,
            **placement,
            "connection_file": str(connection_file),
            "folder": str(Path(connection_file).parent),  # the one folder of its own it may write
            "kernel_args": self.kernel_args,
            "spare": spare,
        }
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep = False
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
                data, ancillary, _, _ = ours.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(12))
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
                    cgroup.join(pid)
                except OSError as exc:
                    os.close(pidfd)
                    raise ForkError(f"the forked kernel could not join its cgroup: {exc}") from None
            kernel = ForkedKernel(
                self, request_id, pid, int(answer["pid"]), pidfd, Path(connection_file), Path(placement["cwd"]), owned
            )
            kernel.connection_info = info
            kernel.private_env = private
            with self._cond:
                self._kernels[request_id] = kernel
            # The key goes to the child alone (the template never sees it), in memory.
            ours.send(json.dumps({"go": True, "connection": info}).encode())
            try:
                data = ours.recv(MAX_MESSAGE)
            except TimeoutError:
                kernel.close()
                raise ForkError(f"the forked kernel did not start within {timeout:g} s") from None
            if not data or not json.loads(data).get("bound"):
                status = kernel.wait(1.0)
                kernel.close()
                raise ForkError(f"the forked kernel exited while starting (status {status})")
            if spare:
                kernel.waiting = ours  # it waits on this socket for its note
                keep = True
                if self.info.get("iopub_welcome"):
                    kernel.connect_ahead()
            return kernel
        except BaseException:
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        finally:
            theirs.close()
            if not keep:
                ours.close()

    # -- spares: kernels initialised ahead of demand ------------------------------------------
    def keep_spares(self, count: int) -> None:
        """Keep `count` kernels forked and initialised ahead of demand (0: none); a note
        then takes one and pays only for its placement (folder, environment, limits)."""
        with self._cond:
            self._spare_target = max(0, count)
            self._cond.notify_all()
            if self._filler is None and count > 0:
                self._filler = threading.Thread(target=self._fill, name="vault-runner-template-spares", daemon=True)
                self._filler.start()

    def spares_ready(self) -> int:
        """How many spare kernels wait for a note now."""
        with self._cond:
            return len(self._spares)

    def _fill(self) -> None:
        try:
            self._fill_spares()
        finally:
            # jupyter_client leaves an event loop on each thread that starts a client's
            # channels (connect_ahead): closed here, not at interpreter exit, where its
            # __del__ can fail.
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_event_loop_policy().get_event_loop()
                if not loop.is_running():
                    loop.close()

    def _fill_spares(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._closed and self.died is None and len(self._spares) >= self._spare_target:
                    self._cond.wait(5.0)
                if self._closed or self.died is not None:
                    return
            cgroup = self.spare_cgroup() if self.spare_cgroup is not None else None
            try:
                kernel = self._fork(
                    {"cwd": str(self.cwd or self.runtime_dir), "env": {}, "replace_env": False, "rlimits": {}},
                    None,
                    cgroup,
                    FORK_TIMEOUT,
                    spare=True,
                )
                kernel.cgroup, cgroup = cgroup, None
            except (ForkError, ForkUnavailable, OSError):
                failures += 1
                if failures >= 3:
                    return  # notes fork on demand instead
                time.sleep(1.0)
                continue
            finally:
                if cgroup is not None:
                    cgroup.remove()
            failures = 0
            with self._cond:
                if not self._closed:
                    self._spares.append(kernel)
                    self._cond.notify_all()
                    continue
            kernel.close()  # made while the template closed
            return

    def _take_spare(
        self,
        placement: Mapping[str, Any],
        cgroup: Cgroup | None,
        adopt_cgroup: Callable[[Cgroup], bool] | None,
        timeout: float,
    ) -> ForkedKernel | None:
        while True:
            with self._cond:
                kernel = self._spares.pop(0) if self._spares else None
                self._cond.notify_all()  # the filler makes the next one
            if kernel is None:
                return None
            waiting, kernel.waiting = kernel.waiting, None
            try:
                if waiting is None or not kernel.is_alive():
                    raise ForkError("the spare kernel died")
                waiting.settimeout(timeout)
                placement = {**placement, "env": {**placement["env"], **kernel.private_env}}
                waiting.send(json.dumps(dict(placement)).encode())
                answer = json.loads(waiting.recv(MAX_MESSAGE) or b"{}")
                if not answer.get("assigned"):
                    raise ForkError(f"the spare kernel could not take the note: {answer.get('error', 'it exited')}")
                kernel.cwd = Path(placement["cwd"])
                # Last, so that nothing after it fails: the note's caps before it sends any
                # code (the kernel only starts serving now), and `cgroup` stays the note's
                # own until here, for the next spare or a fork on demand.
                if cgroup is not None:
                    own = kernel.cgroup
                    if own is not None and adopt_cgroup is not None and adopt_cgroup(own):
                        kernel.cgroup = None  # the note's sandbox has it now
                    else:
                        cgroup.join(kernel.pid)
                return kernel
            except (OSError, ForkError, ValueError):
                kernel.close()  # then the next spare, or a fork on demand
            finally:
                if waiting is not None:
                    waiting.close()

    # -- bookkeeping ------------------------------------------------------------------------
    def _read(self) -> None:
        control = self._control
        while control is not None:
            try:
                data = control.recv(MAX_MESSAGE)
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


def _private_env(folder: Path) -> dict[str, str]:
    """Temp, cache, IPython and matplotlib folders of a kernel's own, in its folder: no other
    kernel of the template can write them (its Landlock domain grants it only its own) and
    they go with it. Put over the note's environment (bubblewrap's /tmp is the template's)."""
    tmp = folder / "tmp"
    (tmp / ".cache").mkdir(parents=True, mode=0o700)
    return {
        "TMPDIR": str(tmp),
        "XDG_CACHE_HOME": str(tmp / ".cache"),
        "IPYTHONDIR": str(tmp / ".ipython"),
        "MPLCONFIGDIR": str(kernel_mpl_dir(folder)),
        "JUPYTER_RUNTIME_DIR": str(folder),
    }


_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


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
