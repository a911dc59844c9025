"""The template process of the kernel factory (template.py); run as a script, never imported.

    python child.py CONTROL_FD SPEC_JSON

It imports what every kernel imports (ipykernel, IPython, numpy, torch, matplotlib), runs
no user code, starts no thread, creates no ZMQ context, never initialises CUDA, and then
waits on the control socket (an AF_UNIX SOCK_SEQPACKET inherited as CONTROL_FD) for fork
requests. Each request is a JSON object with one socket passed along (SCM_RIGHTS); the
forked child reports its pid on that socket (SCM_CREDENTIALS, so the kernel translates it
into the pid namespace of whoever reads it: this process may live inside bubblewrap's),
waits for "go" (the parent moves it into the note's cgroup meanwhile), and becomes an
IPKernelApp on the request's connection file. In a sandbox each child first makes its own
/dev/shm, ptys and IPC namespace where it can (facts: "private_shm"), then enters a Landlock
domain of its own (launch.py `enter_own_devices`, `enter_nested_domain`, `enter_kernel_domain`).

Messages (JSON, one per datagram):
  template -> parent  {"op": "ready", ...facts}   once, after the imports
                      {"op": "exited", "id": N, "pid": P, "status": S}   a child was reaped
                      (S as subprocess.returncode: negative for a signal)
  parent -> template  {"op": "fork", "id": N, ...request} + one fd
                      {"op": "close"}   kill every child, reap them, exit (also on EOF)
  child -> parent     {"pid": P} with SCM_CREDENTIALS, or {"error": "..."}
  parent -> child     {"go": true}
  child -> parent     {"bound": true}   its sockets are bound; then it closes the socket
A spare (a fork request with "spare": true) is initialised in the template's folder and
environment before any note is known, and after "bound" waits for its note:
  parent -> child     {"cwd": ..., "env": ..., "replace_env": ..., "rlimits": ...}
  child -> parent     {"assigned": true}, or {"error": "..."}; then it closes the socket

Standard library at module level only: the heavy imports are the SPEC's `preload` list.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback

# This script's folder is sys.path[0]: a note must not import vault_runner's modules as
# top-level ones (`import note`). The child puts its own working folder there instead,
# as `python -m ipykernel_launcher` does.
if sys.path and os.path.dirname(os.path.abspath(__file__)) == os.path.abspath(sys.path[0] or "."):
    del sys.path[0]

_PR_SET_PDEATHSIG = 1
_MAX_MESSAGE = 1 << 20


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None, creds: bool = False) -> None:
    data = json.dumps(message).encode()
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds)))
    if creds:
        ancillary.append(
            (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("iII", os.getpid(), os.getuid(), os.getgid()))
        )
    sock.sendmsg([data], ancillary)


def _preload(modules: list[str]) -> tuple[list[str], dict[str, str]]:
    import importlib

    loaded, failed = [], {}
    for name in modules:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception as exc:  # a vault need not have torch; the kernel imports it later
            failed[name] = f"{type(exc).__name__}: {exc}"
    return loaded, failed


def _facts(started: float, loaded: list[str], failed: dict[str, str]) -> dict:
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = -1
    zmq = sys.modules.get("zmq")
    torch = sys.modules.get("torch")
    cuda = bool(torch is not None and getattr(torch, "cuda", None) and torch.cuda.is_initialized())
    iostream = sys.modules.get("ipykernel.iostream")
    return {
        "op": "ready",
        "pid": os.getpid(),
        "hash_seed": os.environ.get("PYTHONHASHSEED", "random"),
        "loaded": loaded,
        "failed": failed,
        "threads": threads,  # native threads (numpy's BLAS pool may hold some; it re-forms after fork)
        "python_threads": __import__("threading").active_count(),
        "zmq_context": bool(zmq is not None and getattr(zmq.Context, "_instance", None) is not None),
        "cuda_initialized": cuda,
        # ipykernel 7 greets each iopub subscriber (a spare's client can connect ahead)
        "iopub_welcome": hasattr(getattr(iostream, "IOPubThread", None), "_send_welcome_message"),
        "seconds": round(time.monotonic() - started, 3),
        "modules": len(sys.modules),
    }


def _status(code: int) -> int:
    if os.WIFSIGNALED(code):
        return -os.WTERMSIG(code)
    if os.WIFEXITED(code):
        return os.WEXITSTATUS(code)
    return code


class Template:
    def __init__(self, control: socket.socket, spec: dict) -> None:
        self.control = control
        self.spec = spec
        self.children: dict[int, int] = {}  # pid -> request id
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The sandbox launcher's module (kernel/sandbox/launch.py), loaded by path as it
        # loads its own siblings: each child enters a Landlock domain of its own with it.
        self.isolate = _launch_module() if spec.get("isolate") else None
        if self.isolate is not None and self.isolate.landlock_abi() < 1:
            self.isolate.enter_nested_domain()  # non-dumpable: inherited by every fork
        # True: each kernel makes a /dev/shm and IPC namespace of its own (and must); else
        # why it cannot here (its kernels share the template's, as the facts say). None:
        # kernels are not isolated (the plain tier), so nothing is claimed.
        self.private_shm = self.isolate.own_devices_work() if self.isolate is not None else None
        if self.isolate is not None and spec.get("landlock") is not None:
            self.isolate.set_non_dumpable()  # outside Landlock: its forks' domains keep them out too

    # -- main loop -------------------------------------------------------------------------
    def serve(self) -> int:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up byte is what counts
        while True:
            try:
                ready, _, _ = select.select([self.control, self.wake_r], [], [])
            except InterruptedError:
                continue
            if self.wake_r in ready:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
                self.reap()
            if self.control in ready:
                try:
                    data, ancillary, _, _ = self.control.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(16))
                except (ConnectionResetError, OSError):
                    data, ancillary = b"", []
                fds = _fds(ancillary)
                if not data:  # the parent is gone: take every kernel with us
                    self.shutdown()
                    return 0
                message = json.loads(data)
                if message.get("op") == "close":
                    for fd in fds:
                        os.close(fd)
                    self.shutdown()
                    return 0
                if message.get("op") == "fork" and fds:
                    for extra in fds[1:]:
                        os.close(extra)
                    self.fork(message, fds[0])
                else:
                    for fd in fds:
                        os.close(fd)

    def reap(self) -> None:
        while True:
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            request = self.children.pop(pid, None)
            try:
                _send(self.control, {"op": "exited", "id": request, "pid": pid, "status": _status(code)})
            except OSError:
                pass

    def shutdown(self) -> None:
        for pid in list(self.children):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 5.0
        while self.children and time.monotonic() < deadline:
            try:
                pid, code = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.pop(pid, None)

    # -- one kernel ------------------------------------------------------------------------
    def fork(self, request: dict, report_fd: int) -> None:
        template_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            report = socket.socket(fileno=report_fd)
            try:
                _send(report, {"error": f"fork failed: {exc}"})
            except OSError:
                pass
            report.close()
            return
        if pid == 0:
            code = 1
            try:
                code = _child(self, request, report_fd, template_pid)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(_exit_child(code))
        self.children[pid] = request.get("id")
        os.close(report_fd)


def _launch_module() -> object:
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.dirname(here), "sandbox", "launch.py")
    spec = importlib.util.spec_from_file_location("_vault_runner_launch", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fds(ancillary: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds


def _exit_child(code: int) -> int:
    # What a fresh interpreter does at exit: atexit handlers (the kernel's own, the note's),
    # then flushed streams. Never the template's Python-level teardown (os._exit).
    _trace("exiting")
    try:
        import atexit

        atexit._run_exitfuncs()
    except BaseException:
        pass
    _trace("atexit done")
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:
            pass
    return code if 0 <= code < 256 else 1


def _refuse(report_fd: int, error: str) -> int:  # why this kernel cannot be made: the note's is started
    _send(socket.socket(fileno=report_fd), {"error": error})
    return 1


def _child(template: Template, request: dict, report_fd: int, template_pid: int) -> int:
    _T0[0] = time.monotonic()
    os.setsid()  # own session and process group: SIGINT/SIGKILL to the group reach only this kernel
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != template_pid:  # the template died between fork and prctl
        return 1
    ruleset = template.spec.get("landlock")
    hide = template.spec.get("hide")  # of the runtime folder, only this kernel's own stays in sight
    hide = hide and {**hide, "keep": [*hide["keep"], request["folder"]]}
    if ruleset is not None:
        # The template runs outside Landlock, in a namespace of its own: this kernel makes
        # its own devices, drops every capability, then applies the tier's ruleset, writing
        # its own folder (launch.py, enter_kernel_domain). Fail closed.
        try:
            ruleset = {**ruleset, "write": [*ruleset["write"], request["folder"], "/proc/self"]}
            template.isolate.enter_kernel_domain(ruleset, template.private_shm is True, hide)
        except (OSError, KeyError) as exc:
            return _refuse(report_fd, f"the kernel could not be isolated: {exc}")
        _trace("own domain")
    elif template.private_shm is True:
        try:
            template.isolate.enter_own_devices(hide)
            template.isolate.drop_capabilities()  # those of its new user namespace
        except OSError as exc:  # fail closed: the note's kernel is started instead
            return _refuse(report_fd, f"the kernel's own /dev/shm could not be made: {exc}")
        _trace("private shm")
    if template.isolate is not None and ruleset is None:
        # Before anything else, while single-threaded: a Landlock domain of its own, so the
        # note's code can neither write the template's or a sibling's memory (/proc/PID/mem,
        # ptrace) nor signal them (launch.py, enter_nested_domain). Fail closed.
        try:
            grants = template.spec.get("writable")
            writable = None if grants is None else [*grants, request["folder"], "/proc/self"]
            template.isolate.enter_nested_domain(writable, template.spec.get("device_files"))
        except (OSError, KeyError) as exc:
            return _refuse(report_fd, f"the kernel could not be isolated: {exc}")
    if template.spec.get("harden") and template.isolate is not None:
        try:  # no setuid files, no user namespace of its own, no protected name: as a started kernel
            template.isolate.apply_hardening(template.spec.get("names"))
        except OSError as exc:
            return _refuse(report_fd, f"the kernel could not be hardened: {exc}")
    # Nothing of the template's loop survives into the kernel.
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in (template.wake_r, template.wake_w):
        os.close(fd)
    template.control.close()
    template.children.clear()
    report = socket.socket(fileno=report_fd)
    _trace("forked")
    try:
        argv = _prepare(request)
    except Exception as exc:
        _send(report, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _trace("prepared")
    _send(report, {"pid": os.getpid()}, creds=True)
    answer = report.recv(_MAX_MESSAGE)  # "go" once the parent has placed us (cgroup); b"" = abort
    go = json.loads(answer) if answer else {}
    if not go.get("go") or not go.get("connection"):
        return 1
    _trace("go")
    before = dict(os.environ)
    app = _initialize(request, argv, go["connection"])
    _trace("initialized")
    if template.spec.get("startup_code"):
        _run_silently(app, template.spec["startup_code"])
        _trace("startup code")
    # The sockets are bound: a client that connects now needs no reconnect (ZMQ retries
    # every 100 ms). Closed before the kernel runs anything a note sends.
    _send(report, {"bound": True})
    if request.get("spare"):
        # A spare: initialised ahead of demand, it waits here until a note takes it.
        answer = report.recv(_MAX_MESSAGE)
        if not answer:
            return 0
        # What the shell's start-up put in the environment (TERM, PAGER, ...), kept
        # across the note's own environment, as in a kernel that started with it.
        kept = {k: v for k, v in os.environ.items() if before.get(k) != v}
        try:
            _place(json.loads(answer), kept)
            _adopt_folder(app)
        except Exception as exc:
            _send(report, {"error": f"{type(exc).__name__}: {exc}"})
            return 1
        _trace("assigned")
        _send(report, {"assigned": True})
    report.close()
    app.start()
    _trace("stopped")
    _end_control_thread(app)
    return 0


def _end_control_thread(app: object) -> None:
    """Let the control thread finish the message it is on before atexit closes iopub.

    A shutdown_request stops the kernel's loops, and the control thread then flushes the
    streams and publishes "idle" through the iopub thread. IPKernelApp.close (atexit)
    stops the iopub thread first and only then joins the control thread: when the flush
    comes after the stop, it blocks on the iopub thread's pipe for good, and the kernel
    is killed after the shutdown wait (5 s per note instead of milliseconds)."""
    thread = getattr(app, "control_thread", None)
    if thread is None or not thread.is_alive():
        return
    try:
        thread.stop()  # a no-op after a shutdown_request (its loop is stopping already)
        thread.join(2.0)
    except Exception:
        pass
    _trace("control thread ended")


def _initialize(request: dict, argv: list[str], connection: dict) -> object:
    from ipykernel.kernelapp import IPKernelApp

    # The connection info (with the key) came over this kernel's own socket: it is never
    # written to a file, which another kernel could read (`-f` only names the kernel).
    preinitialized = IPKernelApp.initialized()
    app = IPKernelApp.instance()  # (else IPKernelApp.launch_instance, in two steps)
    app.init_connection_file = lambda: app.load_connection_info(connection)
    app.write_connection_file = lambda **_: None
    if preinitialized:
        # The template parsed the command line and the config files (_preinitialize):
        # what is left is this kernel's own part, from its connection info on.
        app.connection_file = request["connection_file"]
        with _base_initialize_done():
            app.initialize([])
    else:
        app.initialize(argv)
    return app


def _run_silently(app: object, code: str) -> None:
    """The template's startup code, in this kernel's shell, as a silent execute request
    would run it (no history, no execution count); a failure is the kernel's to report."""
    shell = getattr(app, "shell", None)
    if shell is None:
        raise RuntimeError("the kernel has no shell to run its startup code in")
    result = shell.run_cell(code, store_history=False, silent=True)
    if not result.success:
        raise RuntimeError(f"the startup code failed: {result.error_in_exec or result.error_before_exec!r}")


def _adopt_folder(app: object) -> None:
    """A spare's shell started in the template's folder: it now starts in the note's."""
    from pathlib import Path

    shell = getattr(app, "shell", None)
    if shell is None:
        return
    shell.starting_dir = os.getcwd()
    history = getattr(shell, "history_manager", None)
    if history is not None:
        history.dir_hist[:] = [Path.cwd()]


class _base_initialize_done:
    """IPKernelApp.initialize starts with BaseIPythonApplication.initialize (command line,
    profile folder, config files), which the template already ran: skip it once."""

    def __enter__(self) -> None:
        from IPython.core.application import BaseIPythonApplication

        self.cls = BaseIPythonApplication
        self.original = BaseIPythonApplication.__dict__["initialize"]
        BaseIPythonApplication.initialize = lambda self, argv=None: None  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        self.cls.initialize = self.original  # type: ignore[method-assign]


def _preinitialize(kernel_args: list[str]) -> str | None:
    """Run the kernel-independent first step of IPKernelApp.initialize; None, or why not.

    It parses the command line (less -f) and reads the profile's config files: no socket,
    no thread, no shell. ~50 ms of every kernel start."""
    try:
        from ipykernel.kernelapp import IPKernelApp
        from IPython.core.application import BaseIPythonApplication

        app = IPKernelApp.instance()
        BaseIPythonApplication.initialize(app, list(kernel_args))
        if app.subapp is not None or app.connection_file:
            raise RuntimeError("the kernel arguments name a sub-command or a connection file")
        # Made by each shell if missing, but a forked kernel may not write the profile
        # folder it shares with its siblings (its Landlock domain): made here, once.
        os.makedirs(os.path.join(app.profile_dir.location, "db"), exist_ok=True)
        return None
    except Exception as exc:
        try:
            from ipykernel.kernelapp import IPKernelApp

            IPKernelApp.clear_instance()
        except Exception:
            pass
        return f"{type(exc).__name__}: {exc}"


_TRACE = os.environ.get("VAULT_RUNNER_FORK_TRACE") == "1"
# The template's stderr, kept: a kernel's fd 2 is ipykernel's capture pipe, whose reader
# is gone by the time the kernel exits.
_TRACE_FD = os.dup(2) if _TRACE else 2
_T0 = [0.0]


def _trace(stage: str) -> None:
    """Stage timings of a fork on stderr, for benchmarks (VAULT_RUNNER_FORK_TRACE=1)."""
    if _TRACE:
        now = time.monotonic()
        os.write(_TRACE_FD, f"[fork {os.getpid()}] {stage} +{(now - _T0[0]) * 1000:.1f} ms\n".encode())


def _prepare(request: dict) -> list[str]:
    """Make this process look like a fresh `python -m ipykernel_launcher` in the note's folder."""
    _place(request)
    launcher = request.get("launcher") or "ipykernel_launcher"
    sys.argv = [launcher, "-f", request["connection_file"], *request.get("kernel_args", [])]
    sys.orig_argv = [sys.executable, "-m", "ipykernel_launcher", *sys.argv[1:]]
    try:
        import warnings

        warnings._filters_mutated()  # forget "once" warnings the imports may have shown
    except AttributeError:
        pass
    return sys.argv[1:]


_PLACED_PATH: list[str] = []  # the folder this process put first on sys.path


def _place(request: dict, kept: dict | None = None) -> None:
    """The note's limits, folder, environment and random state (a spare: again, for its note)."""
    import resource

    for name, value in (request.get("rlimits") or {}).items():
        limit = getattr(resource, f"RLIMIT_{name.upper()}")
        resource.setrlimit(limit, (int(value), int(value)))
    cwd = request["cwd"]
    os.chdir(cwd)
    env = request.get("env") or {}
    if request.get("replace_env"):
        os.environ.clear()
    for key, value in {**env, **(kept or {})}.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    wanted_seed = os.environ.get("PYTHONHASHSEED", "random")
    have_seed = template_hash_seed()
    if wanted_seed != have_seed and not (wanted_seed in {"random", ""} and have_seed in {"random", ""}):
        raise RuntimeError(f"PYTHONHASHSEED={wanted_seed} asked for, but the template runs with {have_seed}")
    import tempfile

    tempfile.tempdir = None  # re-read TMPDIR
    matplotlib = sys.modules.get("matplotlib")
    if matplotlib is not None and os.environ.get("MPLBACKEND"):
        # Read at `import matplotlib`, which the template did; pyplot resolves it lazily.
        matplotlib.rcParams["backend"] = os.environ["MPLBACKEND"]
    if matplotlib is not None:
        # matplotlib remembers its config and cache folder from the template's import: this
        # kernel's MPLCONFIGDIR (its own, per kernel) is read again from now on.
        for name in ("get_configdir", "get_cachedir"):
            cached = getattr(matplotlib, name, None)
            if cached is not None and hasattr(cached, "__wrapped__"):
                setattr(matplotlib, name, cached.__wrapped__)
    _trace("environment")
    _reseed()
    _trace("reseeded")
    if _PLACED_PATH and _PLACED_PATH[0] in sys.path:
        sys.path.remove(_PLACED_PATH[0])
    _PLACED_PATH[:] = [os.getcwd()]
    sys.path.insert(0, os.getcwd())


_HASH_SEED = os.environ.get("PYTHONHASHSEED", "random")


def template_hash_seed() -> str:
    return _HASH_SEED


def _reseed() -> None:
    """Global generators seeded from the OS, as a new process seeds them."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        # torch seeds its CPU generator from the OS at start-up; CUDA generators are lazy
        # (never initialised in the template) and follow torch.manual_seed when they start.
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))


def main(argv: list[str]) -> int:
    started = time.monotonic()
    control = socket.socket(fileno=int(argv[0]))
    os.set_inheritable(control.fileno(), False)
    spec = json.loads(argv[1]) if len(argv) > 1 else {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for vault-runner, not us
    if spec.get("cwd"):
        os.chdir(spec["cwd"])
    loaded, failed = _preload(list(spec.get("preload", [])))
    preinit_failed = _preinitialize(spec["kernel_args"]) if spec.get("preinitialize") else "off"
    _reseed()  # the first calls import and set up lazily (numpy: 20 ms); the child reseeds again
    # Everything imported so far is shared with every kernel, copy-on-write: keep the
    # collector from walking (and so copying) it in each child.
    gc.collect()
    gc.freeze()
    template = Template(control, spec)
    facts = {**_facts(started, loaded, failed), "preinitialized": preinit_failed is None, "preinit": preinit_failed}
    _send(control, {**facts, "private_shm": template.private_shm})
    return template.serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
