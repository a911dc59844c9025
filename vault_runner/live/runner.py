"""The live runner: warm kernels, one NoteSession and one queue per note, for one vault.

The watcher and the HTTP API drive a `Runner`. Requests for one note run one after another,
different notes in parallel (up to the kernel cap). Every method is thread-safe; results
come back as `concurrent.futures.Future`s and progress as `Event`s to subscribers.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vault_runner.core import note as notes
from vault_runner.disk.trust import is_trusted, trust_file, untrusted_message
from vault_runner.disk.vault import Vault, load_vault
from vault_runner.engine import (
    Event,
    EventSink,
    KernelFactory,
    Loaded,
    NoteReport,
    default_kernel_factory,
)
from vault_runner.errors import UntrustedVault, VaultError
from vault_runner.kernel.pool import WARM_CODE, KernelPool
from vault_runner.live.delegation import Delegation
from vault_runner.live.session import SUPERSEDE_POLICIES, NoteSession, Request


# -- the runner: all notes of one vault -----------------------------------------------------
class Runner:
    """Warm kernels, per-note sessions and queues for one vault. Thread-safe.

    Requests for one note are served in order, one at a time; different notes run in
    parallel up to `max_kernels`. Subscribers get every engine Event plus these kinds:
    `note-finished` (data: status, written, blocks_run, duration, report), `superseded`,
    `note-dropped`, `kernel-warm`, `kernel-assigned`, `kernel-started`, `kernel-evicted`,
    `kernel-stopped` and `log` (data: level, message). Subscribers are called from worker
    threads and must return quickly.
    """

    def __init__(
        self,
        vault: Vault,
        *,
        kernel_factory: KernelFactory = default_kernel_factory,
        max_kernels: int = 2,
        spares: int = 1,
        idle_timeout: float = 600.0,
        supersede: str = "interrupt",
        require_opt_in: bool = True,
        require_trust: bool = True,
        force: bool = False,
        warm_code: str = WARM_CODE,
        check_interval: float = 2.0,
    ) -> None:
        if supersede not in SUPERSEDE_POLICIES:
            raise ValueError(f"supersede must be one of {', '.join(SUPERSEDE_POLICIES)}")
        self.vault = vault
        self.supersede = supersede
        self.require_opt_in = require_opt_in
        self.require_trust = require_trust
        self._untrusted = False
        self._spares_wanted = spares
        self._trust_lock = threading.Lock()
        self._trust_store = trust_file()
        self.force = force
        self.pool = KernelPool(
            vault,
            factory=kernel_factory,
            max_kernels=max_kernels,
            spares=spares,
            idle_timeout=idle_timeout,
            warm_code=warm_code,
            on_event=self.emit,
            check_interval=check_interval,
        )
        self._executor = ThreadPoolExecutor(max_workers=max_kernels + 1, thread_name_prefix="vault-runner-note")
        self._lock = threading.Condition()
        self._sessions: dict[Path, NoteSession] = {}
        self._subscribers: list[EventSink] = []
        self._own_writes: dict[Path, str] = {}
        self._scheduled = 0  # sessions with a worker draining their queue
        self._closed = False
        # Notes an editor holds open get their regions as a `regions` event, not a write
        # (DESIGN.md contract 11); `delegation.editors` is set by the API, None elsewhere.
        self.delegation = Delegation(self)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Check trust, then start warming kernels. Raises UntrustedVault."""
        if self.require_trust and not is_trusted(self.vault.root, self._trust_store):
            raise UntrustedVault(untrusted_message(self.vault.root))
        self.pool.start()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what is queued, interrupt what runs, shut every kernel down."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions.values())
            for session in sessions:
                _cancel_requests(session.queue)
                session.queue.clear()
        for session in sessions:
            session.stop("cancelled", interrupt=True)
        self.wait_idle(timeout)
        # Kernels first: a block that ignored the interrupt ends when its kernel does.
        self.pool.close()
        self._executor.shutdown(wait=True)
        self.pool.close()

    def __enter__(self) -> Runner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events ------------------------------------------------------------------------
    def subscribe(self, callback: EventSink) -> Callable[[], None]:
        """Call `callback(event)` for every event; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                pass  # a broken subscriber must not break a run

    def log(self, level: str, message: str, note: str = "") -> None:
        self.emit(Event("log", note, data={"level": level, "message": message}))

    # -- requests ----------------------------------------------------------------------
    def note_changed(self, path: Path) -> Future[NoteReport | None]:
        """A note was saved (watcher): cut an obsolete run, then update its outputs incrementally."""
        session = self._existing(path)
        if session is not None:
            session.supersede_check()
        return self._submit(path, Request("changed"))

    def run_note(self, path: Path, restart: bool = False) -> Future[NoteReport | None]:
        """Bring a note's outputs up to date (incremental); `restart`: fresh kernel, run all."""
        return self._submit(path, Request("run", restart=restart))

    def run_block(self, path: Path, index: int) -> Future[NoteReport | None]:
        """Run block `index` (0-based among python blocks) and the stale blocks above it."""
        return self._submit(path, Request("block", index=index))

    def restart(self, path: Path) -> Future[NoteReport | None]:
        """Shut the note's kernel down; its next run starts fresh from the top."""
        session = self._existing(path)
        if session is not None:
            session.stop("cancelled", interrupt=True)
        return self._submit(path, Request("restart"))

    def interrupt(self, path: Path) -> bool:
        """Interrupt the block running for a note (KeyboardInterrupt) and skip the rest of the run."""
        session = self._existing(path)
        return session is not None and session.stop("interrupted", interrupt=True, delay=0.0)

    def cancel(self, path: Path) -> bool:
        """Drop the note's queued requests and the blocks of its run not started yet."""
        session = self._existing(path)
        if session is None:
            return False
        with self._lock:
            had_queue = bool(session.queue)
            _cancel_requests(session.queue)
            session.queue.clear()
        return session.stop("cancelled", interrupt=False, include_running=False) or had_queue

    def note_removed(self, path: Path, reason: str = "the note was deleted") -> None:
        """Deleted, replaced by a folder, opted out: stop its run and give its kernel back."""
        session = self._existing(path)
        if session is None:
            return
        with self._lock:
            _cancel_requests(session.queue)
            session.queue.clear()
        session.stop("cancelled", interrupt=True)
        self._submit_to(session, Request("drop", reason=reason))
        self.emit(Event("note-dropped", session.relative(), data={"reason": reason}))

    def note_moved(self, source: Path, destination: Path) -> Future[NoteReport | None]:
        """A note was renamed or moved: its session and warm kernel follow it."""
        old, new = _key(source), _key(destination)
        with self._lock:
            session = self._sessions.pop(old, None)
            replaced = self._sessions.get(new)
            if session is not None:
                session.path = new
                self._sessions[new] = session
            self._own_writes.pop(old, None)
        if replaced is not None and replaced is not session:
            self._submit_to(replaced, Request("drop", reason="another note was moved over it"))
        return self.note_changed(new)

    def has_session(self, path: Path) -> bool:
        with self._lock:
            return _key(path) in self._sessions

    def sessions_under(self, folder: Path) -> list[Path]:
        base = _key(folder)
        with self._lock:
            return [p for p in self._sessions if p == base or base in p.parents]

    def is_own_write(self, path: Path, data: bytes) -> bool:
        """True when `data` is exactly what vault-runner last wrote to this note."""
        with self._lock:
            recorded = self._own_writes.get(_key(path))
        return recorded is not None and recorded == hashlib.sha256(data).hexdigest()

    def reload_vault(self) -> None:
        """vault-runner.toml or .obsidian/app.json changed: read the vault's settings again."""
        root = self.vault.root
        if not root.is_dir():
            return  # the vault folder is gone (for now): nothing to read
        try:
            vault = load_vault(root)
        except VaultError as exc:
            self.log("error", f"{exc.one_line()}; keeping the previous settings")
            return
        if vault.root != root:
            return  # its .obsidian folder went away with it; the vault stays where it is
        self.vault = vault
        self.pool.set_vault(vault)
        self.log("info", f"{vault.root}: vault settings reloaded")

    def still_trusted(self) -> bool:
        """Trust is asked again before every execution, whatever starts it (a save, the API).

        The first time the vault is found untrusted, every kernel of the vault is shut down
        and no spare is kept warm until it is trusted again.
        """
        with self._trust_lock:
            return self._check_trust()

    def _check_trust(self) -> bool:
        if not self.require_trust or is_trusted(self.vault.root, self._trust_store):
            if self._untrusted:
                self._untrusted = False
                self.pool.spares = self._spares_wanted
                self.log("info", f"{self.vault.root}: the vault is trusted again; its notes run on save")
            return True
        if not self._untrusted:
            self._untrusted = True
            self._spares_wanted, self.pool.spares = self.pool.spares, 0
            self.log("error", untrusted_message(self.vault.root))
            self.reset_kernels("the vault is no longer trusted")
        return False

    def reset_kernels(self, reason: str) -> None:
        """Shut every kernel down (spares too): the vault folder was replaced under them."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            self._submit_to(session, Request("drop", reason=reason))
        self.pool.drop_spares(reason)

    def status(self) -> dict[str, Any]:
        """JSON-ready: the pool's kernels and every note with a session."""
        with self._lock:
            sessions = list(self._sessions.values())
        return {
            "vault": str(self.vault.root),
            "supersede": self.supersede,
            "closed": self._closed,
            "pool": self.pool.stats(),
            "notes": [s.describe() for s in sessions],
        }

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is queued or running (tests, benchmarks, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._scheduled:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining if remaining is not None else 1.0)
            return True

    # -- internals ---------------------------------------------------------------------
    def _existing(self, path: Path) -> NoteSession | None:
        with self._lock:
            return self._sessions.get(_key(path))

    def _submit(self, path: Path, request: Request) -> Future[NoteReport | None]:
        """Queue a request for the note at `path`, creating its session (cheap, no kernel) if needed."""
        key = _key(path)
        with self._lock:
            session = self._sessions.get(key)
            if session is None and not self._closed:
                session = self._sessions[key] = NoteSession(self, key)
            return self._enqueue(session, request)

    def _submit_to(self, session: NoteSession, request: Request) -> Future[NoteReport | None]:
        with self._lock:
            return self._enqueue(session, request)

    def _enqueue(self, session: NoteSession | None, request: Request) -> Future[NoteReport | None]:
        future: Future[NoteReport | None] = Future()
        if self._closed or session is None:
            future.cancel()
            return future
        queue = session.queue
        request.futures.append(future)
        if request.kind in _COALESCED:
            # The same run queued again (saves in a row, a plugin's repeated clicks): one run
            # serves them all, at the place of the latest, so a queue never grows past one
            # entry per kind of request (issue 9.11).
            same = next((r for r in queue if _same_run(r, request)), None)
            if same is not None:
                queue.remove(same)
                request.futures[:0] = same.futures
        queue.append(request)
        if not session.scheduled:
            session.scheduled = True
            self._scheduled += 1
            self._executor.submit(self._drain, session)
        return future

    def _drain(self, session: NoteSession) -> None:
        while True:
            with self._lock:
                if not session.queue:
                    session.scheduled = False
                    self._scheduled -= 1
                    if session.slot is None and self._sessions.get(session.path) is session:
                        del self._sessions[session.path]  # no kernel: nothing worth remembering
                    self._lock.notify_all()
                    return
                request = session.queue.popleft()
            result: NoteReport | None
            try:
                if request.kind in ("changed", "run", "block") and not self.still_trusted():
                    result = NoteReport(
                        note=session.relative(),
                        status="refused",
                        message=untrusted_message(self.vault.root),
                        reason="untrusted",
                    )
                else:
                    result = session.handle(request)
            except Exception as exc:  # a bug must not kill the worker or leave futures hanging
                result = NoteReport(
                    note=session.relative(),
                    status="failed",
                    message=f"{session.path}: vault-runner failed on this note ({exc!r}); please report it",
                )
                self.log("error", result.message or "", session.relative())
            for future in request.futures:
                if not future.cancelled():
                    future.set_result(result)

    def remember_own_write(self, path: Path, loaded: Loaded) -> None:
        """Remember the bytes we wrote, so the watcher can ignore the event they cause.

        Read back right after the write; kept only if everything outside the output
        regions is still what the run loaded, so an edit that lands in between is never
        mistaken for ours.
        """
        try:
            data = path.read_bytes()
            written = notes.parse_note(notes.decode_note(data))
        except (OSError, notes.NoteError):
            return
        if notes.strip_regions(written) != notes.strip_regions(loaded.note):
            return
        with self._lock:
            self._own_writes[_key(path)] = hashlib.sha256(data).hexdigest()


def _key(path: Path) -> Path:
    # Absolute but not resolved: resolving a symlink loop raises, and notes are keyed by
    # the path the watcher sees.
    import os

    return Path(os.path.abspath(path))


_COALESCED = ("changed", "run", "block")


def _same_run(queued: Request, new: Request) -> bool:
    return (queued.kind, queued.restart, queued.index) == (new.kind, new.restart, new.index)


def _cancel_requests(queue: deque[Request]) -> None:
    for request in queue:
        for future in request.futures:
            future.cancel()
