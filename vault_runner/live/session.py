"""Warm, incremental runs of one note in its own kernel: NoteSession, driven by the Runner.

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

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vault_runner.core.freshness import needs_output
from vault_runner.core.options import NOTE_LEVEL
from vault_runner.core.render import CellSource, Rendered
from vault_runner.core.stopping import stops_the_note
from vault_runner.engine import (
    BlockResult,  # what Engine.write_back takes per block; built here to re-write kept outputs
    Engine,
    Event,
    Loaded,
    NoteReport,
    PlannedBlock,
    Run,
    block_report,
    load,
    may_be_opted_in,
    needs_torch,  # same rule as Engine.prepare, so a kernel is re-prepared when it flips
)
from vault_runner.errors import KernelSetupError, KernelStartError, VaultError
from vault_runner.kernel.pool import Slot, launch_key
from vault_runner.live.control import INTERRUPT_AFTER, Control, ControlledKernel, Tracker
from vault_runner.live.plan import first_difference, plan_run

if TYPE_CHECKING:
    from vault_runner.live.runner import Runner

SUPERSEDE_POLICIES = ("interrupt", "finish")

_SKIP_MESSAGES = {
    "superseded": "not run: a newer save changed the code at or above it; it runs again",
    "interrupted": "not run: the run was interrupted",
    "cancelled": "not run: the run was cancelled",
}


@dataclass
class Request:
    """One thing asked of a note's session, queued in order."""

    kind: str  # changed | run | block | restart | drop
    restart: bool = False
    index: int | None = None
    reason: str = ""
    futures: list[Future[Any]] = field(default_factory=list)


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
        self.queue: deque[Request] = deque()  # guarded by the runner's lock
        self.scheduled = False  # a worker is draining the queue (runner's lock)
        self.last_report: NoteReport | None = None
        self._notices: list[str] = []  # for the next run's report (e.g. why its kernel is new)
        self._state = threading.Lock()
        self._control: Control | None = None
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
        if fresh.unfinished:
            return False  # saved half-way (properties not closed): the next event decides
        position = first_difference([str(p.code_hash) for p in fresh.runnable], [d for _, d in hashes])
        if position is None or position >= end:
            return False  # every block of this run is still current
        index = hashes[max(position, start)][0]
        with control.lock:
            if control.cancel_from is not None and control.cancel_from <= index:
                return False  # already cut there by an earlier save
        interrupted = control.stop_from(index, "superseded", self.runner.supersede == "interrupt")
        # The line in the note as saved now, which is the one the user sees.
        line = next((b.fence_line for b in fresh.note.blocks if b.index == index), None)
        self.runner.emit(Event("superseded", self.relative(), index, line, data={"interrupted": interrupted}))
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
    def handle(self, request: Request) -> NoteReport | None:
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
            if loaded.unfinished and self.slot is not None:
                # Read half-way through a save (its properties not closed yet): not an opt-out.
                # The warm kernel stays; the save's next event runs the note.
                return NoteReport(note=relative, status="not-opted-in", reason="unfinished")
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
        plan = plan_run(
            mode,  # type: ignore[arg-type]
            digests,
            executed=self.executed,
            seen=self.seen,
            kept=self.kept,
            stale=[position for position, p in enumerate(runnable) if needs_output(p)],
            target=next((pos for pos, (i, _) in enumerate(hashes) if i == index), None),
        )
        if plan.no_such_block:
            message = (
                f"{relative}: there is no block {index} that runs (blocks are numbered from 0, "
                "and `eval: false` blocks do not run); check the block number"
            )
            return self._finish_early(NoteReport(note=relative, status="refused", message=message))
        start, stop, restores = plan.start, plan.stop, list(plan.restores)
        if restores and mode == "changed" and runner.delegation.is_held(relative):
            # An editor holds the note and saved it so: its text is the truth, nothing is put back
            # on a save (an explicit run still puts missing outputs back, through the editor).
            restores = []
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
        delegated = self.runner.delegation.write_back(engine, run)  # to the editor holding the note, or the file
        report.duration = time.monotonic() - started
        self._after_write(loaded, report)
        data = finished_data(report, restored=len(restores))
        data["delegated"] = delegated
        self.runner.emit(Event("note-finished", loaded.relative, data=data))
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
            needs_torch(loaded),
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
        control = Control(slot.kernel)
        with self._state:
            self._control = control
            self._running_hashes = hashes
            self._running_range = (start, end)
        engine = Engine(runner.vault, on_event=Tracker(runner.emit, control), force=runner.force)
        try:
            run = engine.execute(
                plan,
                ControlledKernel(slot.kernel, control),
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
        delegated = runner.delegation.write_back(engine, run)  # to the editor holding the note, or the file
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
            if block.status == "timeout" and run.kernel_restarted:
                break
            if stops_the_note(runnable[position], block.status, kernel_restarted=False):
                break  # the note stopped here: this block runs again next time
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
        data = finished_data(report, restored=len(restores))
        data["from_line"] = runnable[start].block.fence_line
        data["superseded"] = superseded
        data["delegated"] = delegated
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
            run.results[planned.block.index] = BlockResult(planned, rendered, report)

    def _after_write(self, loaded: Loaded, report: NoteReport) -> None:
        if report.written:
            self.runner.remember_own_write(self.path, loaded)

    def _finish_early(self, report: NoteReport) -> NoteReport:
        self.runner.emit(Event("note-finished", report.note, data=finished_data(report)))
        self.last_report = report
        return report


def finished_data(report: NoteReport, restored: int = 0) -> dict[str, Any]:
    ran = [b for b in report.blocks if b.status not in {"current", "not-run", "skipped", "hand-edited"}]
    return {
        "status": report.status,
        "failed": report.failed,
        "written": report.written,
        "duration": round(report.duration, 4),
        "blocks_run": len(ran),
        "restored": restored,
        "report": report.to_json(),
    }
