"""Warm, incremental runs of notes: NoteSession (one note, one kernel) and Runner (all notes).

The watcher and the HTTP API drive a `Runner`. It owns the kernel pool, one
`NoteSession` per active note and a queue per note: requests for one note run one
after another, different notes run in parallel (up to the kernel cap). Every method of
the Runner is thread-safe; results come back as `concurrent.futures.Future`s and progress
as engine `Event`s to subscribers.

Incremental runs. A note's session remembers the code hashes of the blocks that ran in
its kernel, in order. `Loaded.plan[i].code_hash` is chained (it covers the block and
every block before it), so the first block whose hash differs from what ran is where a
run starts; the blocks above it keep their outputs and are not run again. "Restart and
run all" starts a fresh kernel and runs every block: the ground truth, as `render` does.

Hidden state. A warm kernel keeps whatever earlier runs left in it: a variable whose
defining block was deleted still exists, and a block that changes shared state
(`x += 1`) sees the state left by the previous run of the blocks below it. The outputs
of an incremental run are what Jupyter would show after "run from here"; only a
restart gives the top-to-bottom result.

Supersede. When a note's code changes while it runs, the run is cut where the change
makes it obsolete: blocks at or after the first changed block are not started, and (with
the default policy "interrupt") the block running is interrupted if it is one of them,
since its output would be stale anyway. Blocks above the change keep running and their
outputs are written. Then the note runs again from the first changed block. Policy
"finish" lets the running block finish (its output is written) and skips only the
blocks not yet started. A save that changes no code (prose, frontmatter that is not an
option) never touches a run.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import note as notes
from .engine import (
    Engine,
    Event,
    EventSink,
    Kernel,
    KernelFactory,
    KernelSetupError,
    Loaded,
    NoteReport,
    PlannedBlock,
    Run,
    _needs_torch,  # same rule as Engine.prepare, so a kernel is re-prepared when it flips
    _Result,  # what Engine.write_back takes per block; built here to re-write kept outputs
    block_report,
    default_kernel_factory,
    load,
    may_be_opted_in,
)
from .errors import UntrustedVault
from .kernel import Execution
from .options import NOTE_LEVEL
from .pool import WARM_CODE, KernelPool, KernelStartError, Slot, launch_key
from .render import CellSource, Rendered
from .trust import is_trusted, untrusted_message
from .vault import Vault, VaultError, load_vault

SUPERSEDE_POLICIES = ("interrupt", "finish")

_SKIP_MESSAGES = {
    "superseded": "not run: a newer save changed the code at or above it; it runs again",
    "interrupted": "not run: the run was interrupted",
    "cancelled": "not run: the run was cancelled",
}


# -- one run's control: cut a run at a block, interrupt the running block -------------------
# A block is interrupted for a newer save only once it has run this long. Interrupts reach a
# sandboxed kernel as a message; one that lands just as a short block ends can hit
# ipykernel while it sends the reply, and the reply is then lost (the run waits for the
# block's timeout). A block that has run a second is very unlikely to end in that instant,
# and a shorter one costs less to let finish.
INTERRUPT_AFTER = 1.0
INTERRUPT_RETRIES = 5


@dataclass
class _Control:
    kernel: Kernel
    lock: threading.Lock = field(default_factory=threading.Lock)
    current: int | None = None  # block index of the last block-started event
    running: int | None = None  # block index executing in the kernel right now
    running_since: float = 0.0
    cancel_from: int | None = None  # blocks with an index >= this are not started
    skipped: set[int] = field(default_factory=set)
    interrupted: dict[int, str] = field(default_factory=dict)  # block index -> why
    reasons: set[str] = field(default_factory=set)

    def stop_from(self, index: int, why: str, interrupt: bool, delay: float = INTERRUPT_AFTER) -> bool:
        """Do not start blocks from `index` on; interrupt the running one if it is among them.

        The interrupt waits until the block has run `delay` seconds (see INTERRUPT_AFTER).
        Returns True when the running block is (or will be) interrupted.
        """
        with self.lock:
            if self.cancel_from is None or index < self.cancel_from:
                self.cancel_from = index
            self.reasons.add(why)
            if not interrupt or self.running is None or self.running < index:
                return False
            block, since = self.running, self.running_since
            wait = since + delay - time.monotonic()
            if wait <= 0:
                self._interrupt(block, why)
                return True
        timer = threading.Timer(wait, self._late_interrupt, args=(block, since, why))
        timer.daemon = True
        timer.start()
        return True

    def _late_interrupt(self, block: int, since: float, why: str, tries: int = 0) -> None:
        with self.lock:
            if self.running == block and self.running_since == since:
                self._interrupt(block, why, tries)

    def _interrupt(self, block: int, why: str, tries: int = 0) -> None:
        # Called with the lock held, so the kernel cannot move on to another block meanwhile.
        self.interrupted.setdefault(block, why)
        interrupter: Callable[[], None] | None = getattr(self.kernel, "interrupt", None)
        if interrupter is not None:
            try:
                interrupter()
            except Exception:
                pass
        # An interrupt that reaches the kernel before it has begun the block is ignored
        # (ipykernel ignores SIGINT between requests): if the block still runs, send another.
        if tries < INTERRUPT_RETRIES:
            timer = threading.Timer(1.0, self._late_interrupt, args=(block, self.running_since, why, tries + 1))
            timer.daemon = True
            timer.start()

    def why(self, index: int) -> str:
        if index in self.interrupted:
            return self.interrupted[index]
        if "superseded" in self.reasons:
            return "superseded"
        return next(iter(sorted(self.reasons)), "cancelled")


class _ControlledKernel:
    """The note's kernel as the engine sees it during one run: blocks past the cut are not sent."""

    def __init__(self, kernel: Kernel, control: _Control) -> None:
        self.kernel = kernel
        self.control = control

    def start(self) -> None:  # the session owns the kernel; the engine never starts it
        pass

    def shutdown(self) -> None:
        pass

    def execute(
        self,
        code: str,
        timeout: float,
        on_output: Any = None,
        silent: bool = False,
        user_expressions: dict[str, str] | None = None,
    ) -> Execution:
        control = self.control
        if not silent:
            with control.lock:
                index = control.current
                if control.cancel_from is not None and index is not None and index >= control.cancel_from:
                    control.skipped.add(index)
                    return Execution(status="ok", outputs=[], execution_count=None, duration=0.0)
                control.running = index
                control.running_since = time.monotonic()
        try:
            return self.kernel.execute(
                code, timeout, on_output=on_output, silent=silent, user_expressions=user_expressions
            )
        finally:
            if not silent:
                with control.lock:
                    control.running = None


@dataclass
class _Request:
    kind: str  # changed | run | block | restart | drop
    restart: bool = False
    index: int | None = None
    reason: str = ""
    futures: list[Future[Any]] = field(default_factory=list)


def _first_mismatch(hashes: Sequence[str], executed: Sequence[str]) -> int | None:
    for position, digest in enumerate(hashes):
        if position >= len(executed) or executed[position] != digest:
            return position
    return None


def _first_difference(new: Sequence[str], old: Sequence[str]) -> int | None:
    for position, (a, b) in enumerate(zip(new, old, strict=False)):
        if a != b:
            return position
    return None if len(new) == len(old) else min(len(new), len(old))


def _needs_output(planned: PlannedBlock) -> bool:
    """Its region is missing or from other code, and not edited by hand (those are left alone)."""
    region = planned.block.region
    if region is None:
        return True
    return region.code_hash != planned.code_hash and not region.hand_edited


class NoteSession:
    """One note and its warm kernel. Driven by the Runner, one request at a time."""

    def __init__(self, runner: Runner, path: Path) -> None:
        self.runner = runner
        self.path = path
        self.slot: Slot | None = None
        self.device: str | None = None
        self.signature: tuple[Any, ...] | None = None  # what the kernel was prepared for
        self.executed: list[str] = []  # chained hashes of the blocks run in this kernel, in order
        self.seen: tuple[str, ...] | None = None  # the note's block hashes when it was last handled
        self.kept: dict[str, Rendered] = {}  # outputs by hash, to re-write them if an editor drops them
        self.sources: dict[int, CellSource] = {}
        self.queue: deque[_Request] = deque()  # guarded by the runner's lock
        self.scheduled = False  # a worker is draining the queue (runner's lock)
        self.last_report: NoteReport | None = None
        self._notices: list[str] = []  # for the next run's report (e.g. why its kernel is new)
        self._state = threading.Lock()
        self._control: _Control | None = None
        self._running_hashes: list[tuple[int, str]] = []  # every runnable block of the running note
        self._running_range = (0, 0)  # the positions the run covers

    # -- for the runner (any thread) ------------------------------------------------------
    def relative(self) -> str:
        try:
            return self.runner.vault.relative(self.path)
        except (ValueError, OSError, RuntimeError):
            return str(self.path)

    def describe(self) -> dict[str, Any]:
        with self._state:
            control = self._control
        executing = None
        if control is not None:
            with control.lock:
                executing = control.running
        return {
            "note": self.relative(),
            "state": "running" if control is not None else ("queued" if self.queue else "idle"),
            "block": control.current if control is not None else None,
            "executing": executing,  # the block index in the kernel right now (None between blocks)
            "kernel": self.slot is not None and not self.slot.closed,
            "blocks_in_kernel": len(self.executed),
        }

    def supersede_check(self) -> bool:
        """The note changed on disk: cut the running run where its code is now obsolete."""
        with self._state:
            control, hashes, (start, end) = self._control, list(self._running_hashes), self._running_range
        if control is None:
            return False
        try:
            fresh = load(self.runner.vault, self.path)
        except Exception:
            return False  # unreadable or half-written: the queued run will say why
        position = _first_difference([str(p.code_hash) for p in fresh.runnable], [d for _, d in hashes])
        if position is None or position >= end:
            return False  # every block of this run is still current
        index = hashes[max(position, start)][0]
        with control.lock:
            if control.cancel_from is not None and control.cancel_from <= index:
                return False  # already cut there by an earlier save
        interrupted = control.stop_from(index, "superseded", self.runner.supersede == "interrupt")
        self.runner.emit(Event("superseded", self.relative(), index, data={"interrupted": interrupted}))
        return True

    def stop(self, why: str, interrupt: bool, include_running: bool = True, delay: float = INTERRUPT_AFTER) -> bool:
        with self._state:
            control = self._control
        if control is None:
            return False
        with control.lock:
            running, current = control.running, control.current
        start = running if running is not None else current
        if start is None:
            start = 0
        if not include_running and running is not None:
            start = running + 1
        control.stop_from(start, why, interrupt, delay)
        return True

    # -- requests (the runner's worker thread for this note) --------------------------------
    def handle(self, request: _Request) -> NoteReport | None:
        if request.kind == "drop":
            self.drop(request.reason)
            return None
        if request.kind == "restart":
            self.drop("restart requested")
            return None
        if request.kind == "block":
            return self.update("block", request.index)
        if request.kind == "run":
            return self.update("restart-run" if request.restart else "run")
        return self.update("changed")

    def drop(self, reason: str) -> None:
        """Give the kernel back (shut down) and forget what ran in it."""
        if self.slot is not None:
            self.runner.pool.discard(self.slot, reason)
        self.slot = None
        self._forget_kernel()

    def _forget_kernel(self) -> None:
        # `kept` stays: an output belongs to its code hash, not to a kernel.
        self.executed = []
        self.sources = {}
        self.signature = None

    def update(self, mode: str, index: int | None = None) -> NoteReport:
        """Bring the note's outputs up to date in its warm kernel (see the module doc)."""
        runner = self.runner
        vault = runner.vault
        started = time.monotonic()
        try:
            loaded = load(vault, self.path)
        except VaultError as exc:
            if mode == "changed" and self.slot is None and not self._may_be_opted_in():
                return NoteReport(note=self.relative(), status="not-opted-in")  # not ours to complain about
            return self._finish_early(NoteReport(note=self.relative(), status="refused", message=exc.one_line()))
        except (OSError, RuntimeError) as exc:  # e.g. a symlink loop, which pathlib raises as RuntimeError
            return self._finish_early(
                NoteReport(note=self.relative(), status="refused", message=f"{self.path}: cannot be read ({exc})")
            )
        relative = loaded.relative
        if self.slot is not None and self.slot.closed:
            # Evicted, idle too long, or found dead: what ran in it is gone.
            if self.slot.died:
                self._notices.append(f"{relative}: {self.slot.reason}; a fresh kernel runs the note from the top")
            self.slot = None
            self._forget_kernel()
        if mode == "changed" and runner.require_opt_in and not loaded.opted_in:
            if self.slot is not None:
                self.drop("the note is no longer opted in")
                runner.emit(Event("note-dropped", relative, data={"reason": "not opted in"}))
            return NoteReport(note=relative, status="not-opted-in")
        runnable = loaded.runnable
        if not runnable:
            if self.slot is not None:
                self.drop("the note has no runnable block any more")
            return NoteReport(note=relative, status="no-blocks")

        hashes = [(p.block.index, str(p.code_hash)) for p in runnable]
        digests = tuple(d for _, d in hashes)
        stale = [position for position, p in enumerate(runnable) if _needs_output(p)]
        mismatch = _first_mismatch(digests, self.executed)
        stop: int | None = None  # last position to run (run_block), None: to the end
        if mode == "restart-run":
            start: int | None = 0
        elif mode == "block":
            target = next((pos for pos, (i, _) in enumerate(hashes) if i == index), None)
            if target is None:
                message = (
                    f"{relative}: there is no block {index} that runs (blocks are numbered from 0, "
                    "and `eval: false` blocks do not run); check the block number"
                )
                return self._finish_early(NoteReport(note=relative, status="refused", message=message))
            start = target if mismatch is None else min(mismatch, target)
            stop = target
        elif mode == "run":
            start = mismatch
            if start is None:
                start = next((pos for pos in stale if digests[pos] not in self.kept), None)
        else:  # changed
            if self.seen is not None and digests == self.seen:
                start = None
            elif self.seen is None:
                # First sight (or after a cut run): run only when outputs are missing or stale
                # and cannot simply be put back from what ran in this kernel.
                missing = [pos for pos in stale if digests[pos] not in self.kept]
                start = None if not missing else min(missing[0], mismatch if mismatch is not None else missing[0])
            else:
                start = mismatch

        restore_until = len(runnable) if start is None else start
        restores = [pos for pos in stale if pos < restore_until and digests[pos] in self.kept]
        if start is None:
            self.seen = digests
            if not restores:
                return NoteReport(
                    note=relative,
                    status="current",
                    blocks=[block_report(loaded, p, "current") for p in runnable],
                )
            return self._restore_only(loaded, runnable, restores, started)
        return self._run(loaded, mode, hashes, start, stop, restores, started)

    # -- the two ways of writing --------------------------------------------------------
    def _restore_only(
        self, loaded: Loaded, runnable: Sequence[PlannedBlock], restores: list[int], started: float
    ) -> NoteReport:
        """Outputs we have went missing from the note (an editor saved an older copy): put them back."""
        report = NoteReport(note=loaded.relative, status="ran", device=self.device)
        report.blocks = [block_report(loaded, p, "current", message="kept") for p in runnable]
        run = Run(loaded, report, {})
        self._add_restores(run, runnable, restores)
        engine = Engine(self.runner.vault, on_event=self.runner.emit, force=self.runner.force)
        engine.write_back(run)
        report.duration = time.monotonic() - started
        self._after_write(loaded, report)
        self.runner.emit(Event("note-finished", loaded.relative, data=_finished_data(report, restored=len(restores))))
        self.last_report = report
        return report

    def _run(
        self,
        loaded: Loaded,
        mode: str,
        hashes: list[tuple[int, str]],
        start: int,
        stop: int | None,
        restores: list[int],
        started: float,
    ) -> NoteReport:
        runner = self.runner
        relative = loaded.relative
        warnings, self._notices = self._notices, []
        signature = (
            launch_key(loaded.note_options.values),
            tuple(repr(loaded.note_options[name]) for name in sorted(NOTE_LEVEL)),
            _needs_torch(loaded),
        )
        slot = self.slot
        if slot is not None and not runner.pool.lease(slot):
            if slot.died:
                warnings.append(f"{relative}: {slot.reason}; a fresh kernel runs the note from the top")
            self.slot = None
            self._forget_kernel()
        if self.slot is not None and (
            mode == "restart-run" or (self.signature is not None and signature[0] != self.signature[0])
        ):
            why = "restart and run all" if mode == "restart-run" else "the note's kernel options changed"
            runner.pool.discard(self.slot, why)
            self.slot = None
            self._forget_kernel()
        if self.slot is None:
            try:
                self.slot = runner.pool.acquire(self.path, loaded.note_options.values)
            except KernelStartError as exc:
                report = NoteReport(note=relative, status="failed", message=str(exc))
                return self._finish_early(report)
            self._forget_kernel()
        elif self.slot.owner != self.path and not runner.pool.reassign(self.slot, self.path):
            # The note moved and its kernel did not answer: take another one.
            self.slot = None
            self._forget_kernel()
            return self._run(loaded, mode, hashes, start, stop, restores, started)
        slot = self.slot
        try:
            if self.signature != signature:
                # A fresh kernel, or the note's kernel options (seed...) changed: prepare, run all.
                engine = Engine(runner.vault, on_event=runner.emit, force=runner.force)
                try:
                    self.device = engine.prepare(slot.kernel, loaded)
                except KernelSetupError as exc:
                    self.signature = None
                    return self._finish_early(NoteReport(note=relative, status="failed", message=str(exc)))
                self.executed = []
                self.signature = signature
            if not self.executed:
                start = 0
                restores = []
            return self._execute(loaded, slot, hashes, start, stop, restores, warnings, started)
        except Exception as exc:
            # A kernel that misbehaves (lost connection...) is not reused.
            if self.slot is not None:
                runner.pool.discard(self.slot, f"the kernel failed: {exc}")
                self.slot = None
            self._forget_kernel()
            report = NoteReport(
                note=relative,
                status="failed",
                message=f"{relative}: the run failed ({exc}); save the note to run it again in a fresh kernel",
            )
            return self._finish_early(report)
        finally:
            if self.slot is not None:
                runner.pool.release(self.slot)

    def _execute(
        self,
        loaded: Loaded,
        slot: Slot,
        hashes: list[tuple[int, str]],
        start: int,
        stop: int | None,
        restores: list[int],
        warnings: list[str],
        started: float,
    ) -> NoteReport:
        runner = self.runner
        runnable = loaded.runnable
        relative = loaded.relative
        end = len(hashes) if stop is None else stop + 1
        plan = loaded
        if stop is not None:
            last = hashes[stop][0]
            plan = replace(loaded, plan=tuple(p for p in loaded.plan if p.block.index <= last))
        control = _Control(slot.kernel)
        with self._state:
            self._control = control
            self._running_hashes = hashes
            self._running_range = (start, end)
        engine = Engine(runner.vault, on_event=_Tracker(runner.emit, control), force=runner.force)
        try:
            run = engine.execute(
                plan,
                _ControlledKernel(slot.kernel, control),
                device=self.device,
                start_at=hashes[start][0],
                sources=self.sources,
            )
        finally:
            with self._state:
                self._control = None
                self._running_hashes = []
        report = run.report
        report.warnings.extend(warnings)
        dropped = set(control.skipped)
        dropped |= {i for i, why in control.interrupted.items() if why != "interrupted"}
        for block in report.blocks:
            if block.index in dropped:
                run.results.pop(block.index, None)
                block.status = "skipped"
                block.reason = control.why(block.index)
                block.message = _SKIP_MESSAGES[block.reason]
        self._add_restores(run, runnable, restores)
        failed_before = report.status == "failed"
        engine.write_back(run)
        write_failed = report.status == "failed" and not failed_before
        report.duration = time.monotonic() - started

        by_index = {b.index: b for b in report.blocks}
        executed = self.executed[:start]
        for position in range(start, end):
            index, digest = hashes[position]
            block = by_index.get(index)
            result = run.results.get(index)
            if block is None or result is None or index in dropped:
                break
            if block.status == "dead" or (block.status == "timeout" and run.kernel_restarted):
                break
            if block.status == "error" and not runnable[position].options["error"]:
                break  # `error: false` stopped the note here: this block runs again next time
            executed.append(digest)
            if result.rendered is not None:
                self.kept[digest] = result.rendered
        if run.kernel_restarted:
            # The kernel restarted itself (died, or ignored an interrupt): it is no longer warm,
            # nor in the note's folder. Take a fresh one next time and run from the top.
            runner.pool.discard(slot, "the kernel died or was restarted during a run")
            self.slot = None
            self._forget_kernel()
        else:
            self.executed = executed
            current = {d for _, d in hashes}
            self.kept = {d: r for d, r in self.kept.items() if d in current}
        superseded = "superseded" in control.reasons
        self.seen = None if (superseded or write_failed) else tuple(d for _, d in hashes)
        self._after_write(loaded, report)
        data = _finished_data(report, restored=len(restores))
        data["from_line"] = runnable[start].block.fence_line
        data["superseded"] = superseded
        runner.emit(Event("note-finished", relative, data=data))
        self.last_report = report
        return report

    def _may_be_opted_in(self) -> bool:
        """For a note that cannot be loaded: does it look opted in (so its error is worth showing)?"""
        try:
            data = self.path.read_bytes()
        except (OSError, RuntimeError):
            return True
        return may_be_opted_in(self.runner.vault, self.path, data)

    def _add_restores(self, run: Run, runnable: Sequence[PlannedBlock], restores: list[int]) -> None:
        by_index = {b.index: b for b in run.report.blocks}
        for position in restores:
            planned = runnable[position]
            rendered = self.kept.get(str(planned.code_hash))
            report = by_index.get(planned.block.index)
            if rendered is None or report is None:
                continue
            report.message = "restored: an editor had saved the note without this output"
            run.results[planned.block.index] = _Result(planned, rendered, report)

    def _after_write(self, loaded: Loaded, report: NoteReport) -> None:
        if report.written:
            self.runner._remember_own_write(self.path, loaded)

    def _finish_early(self, report: NoteReport) -> NoteReport:
        self.runner.emit(Event("note-finished", report.note, data=_finished_data(report)))
        self.last_report = report
        return report


class _Tracker:
    """Forwards a run's engine events, and tells the run's control which block is next."""

    def __init__(self, sink: EventSink, control: _Control) -> None:
        self.sink = sink
        self.control = control
        self.announced: set[int] = set()

    def __call__(self, event: Event) -> None:
        control = self.control
        if event.kind == "block-started" and event.index is not None:
            with control.lock:
                control.current = event.index
                cut = control.cancel_from is not None and event.index >= control.cancel_from
            if cut:
                return
            self.announced.add(event.index)
        elif event.kind == "block-finished" and event.index is not None:
            with control.lock:
                skipped = event.index in control.skipped
            if skipped:
                if event.index not in self.announced:
                    return
                event = replace(event, data={**event.data, "status": "skipped"})
        self.sink(event)


def _finished_data(report: NoteReport, restored: int = 0) -> dict[str, Any]:
    ran = [b for b in report.blocks if b.status not in {"current", "not-run", "skipped"}]
    return {
        "status": report.status,
        "failed": report.failed,
        "written": report.written,
        "duration": round(report.duration, 4),
        "blocks_run": len(ran),
        "restored": restored,
        "report": report.to_json(),
    }


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

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Check trust, then start warming kernels. Raises UntrustedVault."""
        if self.require_trust and not is_trusted(self.vault.root):
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
        return self._submit(path, _Request("changed"))

    def run_note(self, path: Path, restart: bool = False) -> Future[NoteReport | None]:
        """Bring a note's outputs up to date (incremental); `restart`: fresh kernel, run all."""
        return self._submit(path, _Request("run", restart=restart))

    def run_block(self, path: Path, index: int) -> Future[NoteReport | None]:
        """Run block `index` (0-based among python blocks) and the stale blocks above it."""
        return self._submit(path, _Request("block", index=index))

    def restart(self, path: Path) -> Future[NoteReport | None]:
        """Shut the note's kernel down; its next run starts fresh from the top."""
        session = self._existing(path)
        if session is not None:
            session.stop("cancelled", interrupt=True)
        return self._submit(path, _Request("restart"))

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
        self._submit_to(session, _Request("drop", reason=reason))
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
            self._submit_to(replaced, _Request("drop", reason="another note was moved over it"))
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

    def reset_kernels(self, reason: str) -> None:
        """Shut every kernel down (spares too): the vault folder was replaced under them."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            self._submit_to(session, _Request("drop", reason=reason))
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

    def _submit(self, path: Path, request: _Request) -> Future[NoteReport | None]:
        """Queue a request for the note at `path`, creating its session (cheap, no kernel) if needed."""
        key = _key(path)
        with self._lock:
            session = self._sessions.get(key)
            if session is None and not self._closed:
                session = self._sessions[key] = NoteSession(self, key)
            return self._enqueue(session, request)

    def _submit_to(self, session: NoteSession, request: _Request) -> Future[NoteReport | None]:
        with self._lock:
            return self._enqueue(session, request)

    def _enqueue(self, session: NoteSession | None, request: _Request) -> Future[NoteReport | None]:
        future: Future[NoteReport | None] = Future()
        if self._closed or session is None:
            future.cancel()
            return future
        queue = session.queue
        if request.kind == "changed" and queue and queue[-1].kind == "changed":
            queue[-1].futures.append(future)  # saves in a row: one run serves them all
            return future
        request.futures.append(future)
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

    def _remember_own_write(self, path: Path, loaded: Loaded) -> None:
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


def _cancel_requests(queue: deque[_Request]) -> None:
    for request in queue:
        for future in request.futures:
            future.cancel()
