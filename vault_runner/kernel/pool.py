"""A pool of warm Jupyter kernels for the watcher and the API: one kernel per active note.

Kernels are started ahead, before any note is known, with torch and matplotlib already
imported, so the first run of a note pays neither the kernel start nor the `import torch`.
When a note needs a kernel it takes a spare one, which is then moved into the note's
folder (`os.chdir`) and told which note it serves (`VAULT_RUNNER_NOTE`). A note whose
kernel must be *launched* differently (core/options.py NOTE_LEVEL other than `seed`: device,
network, memory, deterministic, gpu-memory-fraction) gets a kernel started for it.

The number of kernels is capped; when a note needs one and the cap is reached, the
least recently used idle kernel is shut down. Kernels idle for longer than
`idle_timeout` are shut down. A kernel found dead while idle is dropped and the reason is
kept on its slot, so the note's session can say why it starts over.

Kernels come from a factory (kernel/factory.py), so the sandbox decides how one is
launched; this module only decides how many, when, and for whom.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vault_runner.core.options import DEFAULTS, NOTE_LEVEL, resolve
from vault_runner.errors import KernelStartError
from vault_runner.kernel.factory import Kernel, KernelFactory, default_kernel_factory
from vault_runner.kernel.setup import kernel_env
from vault_runner.model import Event, EventSink

if TYPE_CHECKING:
    from vault_runner.disk.vault import Vault  # only its root and config are read

__all__ = ("LAUNCH_OPTIONS", "WARM_CODE", "KernelPool", "Slot", "launch_key")

# Imported in every spare kernel before a note is known: the ~1 s that a note would
# otherwise pay on its first run. Failures are ignored: a vault need not use torch.
WARM_CODE = """
try:
    import torch
except Exception:
    pass
try:
    import matplotlib
    import matplotlib.pyplot
except Exception:
    pass
"""

# Note-level options that change how a kernel is *launched* (sandbox, limits, env).
# `seed` is not one of them: Engine.prepare applies it inside any kernel.
LAUNCH_OPTIONS = frozenset(NOTE_LEVEL - {"seed"})

WARM_TIMEOUT = 120.0
START_RETRY_DELAY = 30.0  # after a failed start of a spare, so a broken setup does not spin


def launch_key(note_options: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """What a kernel's launch depends on; two notes with equal keys can share a spare."""
    return tuple((name, repr(note_options.get(name, DEFAULTS.get(name)))) for name in sorted(LAUNCH_OPTIONS))


@dataclass(eq=False)
class Slot:
    """One kernel of the pool and who holds it."""

    kernel: Kernel
    key: tuple[tuple[str, str], ...]
    owner: Path | None = None  # the note it serves; None for a spare
    busy: bool = False
    closed: bool = False
    reason: str | None = None  # why it was closed (evicted, idle, died, ...)
    died: bool = False  # closed because the kernel process was found dead
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int | None:
        """The kernel's process id, when the kernel is a local KernelSession."""
        manager = getattr(self.kernel, "manager", None)
        provisioner = getattr(manager, "provisioner", None)
        process = getattr(provisioner, "process", None)
        return getattr(process, "pid", None)


def _alive(kernel: Kernel) -> bool:
    check: Callable[[], bool] | None = getattr(kernel, "is_alive", None)
    if check is None:
        return True
    try:
        return bool(check())
    except Exception:
        return False


def _shutdown(kernel: Kernel) -> None:
    try:
        kernel.shutdown()
    except Exception:
        pass  # a kernel that cannot be shut down cleanly is already gone for us


def _assign_code(note: Path, root: Path) -> str:
    return (
        "import os as __vr_os\n"
        f"__vr_os.chdir({str(note.parent)!r})\n"
        f"__vr_os.environ['VAULT_RUNNER_NOTE'] = {str(note)!r}\n"
        f"__vr_os.environ['VAULT_RUNNER_VAULT'] = {str(root)!r}\n"
        "del __vr_os\n"
    )


class KernelPool:
    """Thread-safe pool of kernels. Use `acquire` / `release`; `close` stops everything.

    `max_kernels` caps all kernels (spares, starting and assigned). `spares` is how many
    warm kernels are kept ready for notes that have none (within the cap).
    """

    def __init__(
        self,
        vault: Vault,
        *,
        factory: KernelFactory = default_kernel_factory,
        max_kernels: int = 2,
        spares: int = 1,
        idle_timeout: float = 600.0,
        warm_code: str = WARM_CODE,
        on_event: EventSink | None = None,
        check_interval: float = 2.0,
    ) -> None:
        if max_kernels < 1:
            raise ValueError("max_kernels must be at least 1")
        self.vault = vault
        self.factory = factory
        self.max_kernels = max_kernels
        self.spares = max(0, min(spares, max_kernels))
        self.idle_timeout = idle_timeout
        self.warm_code = warm_code
        self.on_event = on_event or (lambda event: None)
        self.check_interval = check_interval
        self._cond = threading.Condition()
        self._slots: list[Slot] = []
        self._starting_spares = 0
        self._spare_generation = 0  # drop_spares: spares started before it are not kept
        self._starting_own = 0
        self._retry_at = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._default_options = resolve(vault.config.defaults, {}).values
        self.default_key = launch_key(self._default_options)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the maintenance thread: fills spares, shuts idle kernels, drops dead ones."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._maintain, name="vault-runner-pool", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Shut every kernel down, busy or not. The pool cannot be used afterwards."""
        with self._cond:
            self._closed = True
            slots, self._slots = self._slots, []
            for slot in slots:
                slot.closed = True
                slot.reason = slot.reason or "vault-runner is shutting down"
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        stoppers = [threading.Thread(target=_shutdown, args=(s.kernel,)) for s in slots]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()

    def __enter__(self) -> KernelPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_vault(self, vault: Vault) -> None:
        """The vault config changed: spares launched with other defaults are dropped."""
        stale: list[Slot] = []
        with self._cond:
            self.vault = vault
            self._default_options = resolve(vault.config.defaults, {}).values
            self.default_key = launch_key(self._default_options)
            for slot in list(self._slots):
                if slot.owner is None and not slot.busy and slot.key != self.default_key:
                    self._remove(slot, "the vault's default options changed")
                    stale.append(slot)
            self._cond.notify_all()
        for slot in stale:
            _shutdown(slot.kernel)

    def drop_spares(self, reason: str) -> None:
        """Shut the idle spares down and start fresh ones now (e.g. the vault folder was replaced)."""
        stale: list[Slot] = []
        with self._cond:
            for slot in list(self._slots):
                if slot.owner is None and not slot.busy:
                    self._remove(slot, reason)
                    stale.append(slot)
            self._spare_generation += 1
            self._retry_at = 0.0
            self._cond.notify_all()
        for slot in stale:
            _shutdown(slot.kernel)

    # -- for sessions ------------------------------------------------------------------
    def acquire(self, note: Path, note_options: Mapping[str, Any], timeout: float | None = None) -> Slot:
        """A started kernel for `note`, in its folder, marked busy. Blocks while all are busy.

        Raises KernelStartError when no kernel can be started (or `timeout` passes).
        """
        key = launch_key(note_options)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            victim: Slot | None = None
            spare: Slot | None = None
            with self._cond:
                while True:
                    if self._closed:
                        raise KernelStartError(f"{note}: vault-runner is shutting down; no kernel was started")
                    if key == self.default_key:
                        spare = next((s for s in self._slots if s.owner is None and not s.busy), None)
                        if spare is not None:
                            spare.owner, spare.busy = note, True
                            self._cond.notify_all()  # the maintenance thread refills spares
                            break
                        if self._starting_spares:
                            self._wait(deadline, note)  # one is on its way: faster than a new one
                            continue
                    if self._count() < self.max_kernels:
                        self._starting_own += 1
                        break
                    victim = self._least_recently_used(spares_too=key != self.default_key)
                    if victim is not None:
                        self._remove(victim, f"its kernel was shut down to make room for {note.name}")
                        self._starting_own += 1
                        break
                    self._wait(deadline, note)
            if victim is not None:
                self._emit("kernel-evicted", victim, reason=victim.reason)
                _shutdown(victim.kernel)
            if spare is not None:
                if self._assign(spare, note):
                    self._emit("kernel-assigned", spare, warm=True)
                    return spare
                continue  # it was dead: try again
            return self._start_own(note, note_options, key)

    def lease(self, slot: Slot) -> bool:
        """Mark a note's kernel busy again; False when the pool has closed it meanwhile."""
        with self._cond:
            if slot.closed or self._closed:
                return False
            slot.busy = True
            return True

    def release(self, slot: Slot) -> None:
        """The note is done with its kernel for now (it stays assigned until evicted)."""
        with self._cond:
            slot.busy = False
            slot.last_used = time.monotonic()
            self._cond.notify_all()

    def discard(self, slot: Slot, reason: str) -> None:
        """Shut a kernel down now (restart, dead kernel, note gone)."""
        with self._cond:
            if not slot.closed:
                self._remove(slot, reason)
            self._cond.notify_all()
        _shutdown(slot.kernel)
        self._emit("kernel-stopped", slot, reason=reason)

    def reassign(self, slot: Slot, note: Path) -> bool:
        """Point a note's kernel at the note's new path (after a rename or a move)."""
        if self._assign(slot, note):
            return True
        return False

    def stats(self) -> dict[str, Any]:
        with self._cond:
            now = time.monotonic()
            return {
                "max_kernels": self.max_kernels,
                "kernels": len(self._slots),
                "starting": self._starting_spares + self._starting_own,
                "spares": sum(1 for s in self._slots if s.owner is None),
                "assigned": [
                    {
                        "note": self._relative(s.owner),
                        "busy": s.busy,
                        "idle_s": 0.0 if s.busy else round(now - s.last_used, 1),
                    }
                    for s in self._slots
                    if s.owner is not None
                ],
            }

    def wait_for_spares(self, timeout: float = 120.0) -> bool:
        """Block until the spares are started (benchmarks and tests: "pool warm")."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for s in self._slots if s.owner is None) < self.spares:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                self._cond.wait(remaining)
            return True

    # -- internals (call with the lock held unless said otherwise) ------------------------
    def _count(self) -> int:
        return len(self._slots) + self._starting_spares + self._starting_own

    def _wait(self, deadline: float | None, note: Path) -> None:
        if deadline is None:
            self._cond.wait(self.check_interval)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise KernelStartError(
                f"{note}: every kernel is busy (limit {self.max_kernels}); wait for a run to finish "
                "or raise the kernel limit"
            )
        self._cond.wait(min(remaining, self.check_interval))

    def _least_recently_used(self, spares_too: bool) -> Slot | None:
        idle = [s for s in self._slots if not s.busy and (s.owner is not None or spares_too)]
        return min(idle, key=lambda s: (s.owner is not None, s.last_used), default=None)

    def _remove(self, slot: Slot, reason: str, died: bool = False) -> None:
        if slot in self._slots:
            self._slots.remove(slot)
        slot.closed = True
        slot.reason = reason
        slot.died = died

    def _relative(self, note: Path | None) -> str:
        if note is None:
            return ""
        try:
            return note.resolve().relative_to(self.vault.root).as_posix()
        except (ValueError, OSError, RuntimeError):
            return str(note)

    def _emit(self, kind: str, slot: Slot, **data: Any) -> None:
        try:
            self.on_event(Event(kind, self._relative(slot.owner), data={"pid": slot.pid, **data}))
        except Exception:
            pass  # feedback must never break the pool

    # -- starting kernels (no lock held) -----------------------------------------------------
    def _assign(self, slot: Slot, note: Path) -> bool:
        """Move a kernel to a note's folder; drop it if it turns out to be dead."""
        try:
            result = slot.kernel.execute(_assign_code(note, self.vault.root), 30.0, silent=True)
            ok = result.status == "ok"
        except Exception:
            ok = False
        if ok:
            with self._cond:
                slot.owner = note
            return True
        with self._cond:
            self._remove(slot, "the kernel did not answer", died=True)
            self._cond.notify_all()
        _shutdown(slot.kernel)
        return False

    def _start_own(self, note: Path, note_options: Mapping[str, Any], key: tuple[tuple[str, str], ...]) -> Slot:
        """Start a kernel for one note (no spare fits, or none is ready). A capacity unit is reserved."""
        env = kernel_env(self.vault.root, note, note_options)
        kernel: Kernel | None = None
        try:
            kernel = self.factory(note.parent, env, note_options)
            kernel.start()
        except Exception as exc:
            if kernel is not None:
                _shutdown(kernel)
            with self._cond:
                self._starting_own -= 1
                self._cond.notify_all()
            raise KernelStartError(f"{note}: the kernel could not be started ({exc}); check the Python setup") from None
        slot = Slot(kernel, key, owner=note, busy=True)
        with self._cond:
            self._starting_own -= 1
            if self._closed:
                closed = True
            else:
                closed = False
                self._slots.append(slot)
            self._cond.notify_all()
        if closed:
            _shutdown(kernel)
            raise KernelStartError(f"{note}: vault-runner is shutting down; no kernel was started")
        self._emit("kernel-started", slot, warm=False)
        return slot

    def _start_spare(self) -> None:
        with self._cond:
            generation = self._spare_generation
        env = kernel_env(self.vault.root, None, self._default_options)
        kernel: Kernel | None = None
        try:
            kernel = self.factory(self.vault.root, env, self._default_options)
            kernel.start()
            kernel.execute(self.warm_code, WARM_TIMEOUT, silent=True)
        except Exception as exc:
            if kernel is not None:
                _shutdown(kernel)
            with self._cond:
                self._starting_spares -= 1
                self._retry_at = time.monotonic() + START_RETRY_DELAY
                self._cond.notify_all()
            try:
                self.on_event(
                    Event(
                        "log",
                        "",
                        data={
                            "level": "error",
                            "message": f"{self.vault.root}: a warm kernel could not be started ({exc}); "
                            f"retrying in {START_RETRY_DELAY:.0f} s",
                        },
                    )
                )
            except Exception:
                pass
            return
        slot = Slot(kernel, self.default_key)
        with self._cond:
            self._starting_spares -= 1
            ready = sum(1 for s in self._slots if s.owner is None)
            # Not kept when the pool closed, when the spares were dropped while it started
            # (the vault was untrusted or replaced), or when no more spares are wanted.
            surplus = self._closed or generation != self._spare_generation or ready >= self.spares
            if not surplus:
                self._slots.append(slot)
            self._cond.notify_all()
        if surplus:
            _shutdown(kernel)
        else:
            self._emit("kernel-warm", slot)

    def _maintain(self) -> None:
        last_check = 0.0
        while True:
            doomed: list[Slot] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                for slot in list(self._slots):
                    if slot.owner is not None and not slot.busy and now - slot.last_used > self.idle_timeout:
                        self._remove(slot, f"its kernel was shut down after {self.idle_timeout:g} s idle")
                        doomed.append(slot)
                check = now - last_check >= self.check_interval
                candidates = [s for s in self._slots if not s.busy] if check else []
            if check:
                last_check = now
                for slot in candidates:
                    if not _alive(slot.kernel):
                        with self._cond:
                            if slot.busy or slot.closed:
                                continue
                            self._remove(
                                slot,
                                "its kernel had stopped while the note was idle (killed, or out of memory)",
                                died=True,
                            )
                        doomed.append(slot)
            for slot in doomed:
                _shutdown(slot.kernel)
                self._emit("kernel-stopped", slot, reason=slot.reason, died=slot.died)
            start = False
            with self._cond:
                if self._closed:
                    return
                ready = sum(1 for s in self._slots if s.owner is None)
                if (
                    ready + self._starting_spares < self.spares
                    and self._count() < self.max_kernels
                    and time.monotonic() >= self._retry_at
                    and self.vault.root.is_dir()  # a vault folder that is gone (for now) gets no spare
                ):
                    self._starting_spares += 1
                    start = True
                else:
                    self._cond.wait(self._next_wake())
            if start:
                self._start_spare()

    def _next_wake(self) -> float:
        wake = self.check_interval
        now = time.monotonic()
        for slot in self._slots:
            if slot.owner is not None and not slot.busy:
                wake = min(wake, max(0.05, slot.last_used + self.idle_timeout - now + 0.01))
        if self._retry_at > now:
            wake = min(wake, self._retry_at - now + 0.01)
        return wake
