"""Run a note: execute its blocks in a kernel, render their outputs, report; emit events on the way.

The engine is what every front end calls. It never loses a user's edit: write-back
(engine/writeback.py) re-reads the note, puts outputs only under blocks whose code is still
the code that ran, and swaps the file in only if nothing changed since that re-read.
"""

from __future__ import annotations

import hashlib
import time
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vault_runner.core import note as notes
from vault_runner.core.freshness import freshness, hand_edit_message, stored_failures
from vault_runner.core.options import resolve
from vault_runner.core.plan import PlannedBlock
from vault_runner.core.render import (
    CellSource,
    Rendered,
    names_note_lines,
    output_summary,
    render_outputs,
    strip_ansi,
)
from vault_runner.core.stopping import stop_message, stops_the_note
from vault_runner.disk.vault import Vault
from vault_runner.engine.loading import Loaded, block_report, needs_torch, select
from vault_runner.engine.writeback import WriteBack
from vault_runner.errors import KernelDied, KernelSetupError, VaultError
from vault_runner.kernel.factory import Kernel, KernelFactory, default_kernel_factory, prewarm
from vault_runner.kernel.session import Execution
from vault_runner.kernel.setup import kernel_env, setup_code
from vault_runner.model import BlockReport, Event, EventSink, NoteReport

__all__ = ("BlockResult", "Engine", "Rerender", "Run", "attachment_stem")

SETUP_TIMEOUT = 120.0


_GPU_PEAK_EXPRESSION = (
    "(__import__('torch').cuda.max_memory_allocated(), __import__('torch').cuda.reset_peak_memory_stats())[0]"
)


@dataclass
class BlockResult:
    planned: PlannedBlock
    rendered: Rendered | None  # None: nothing to write for this block
    report: BlockReport
    # Renders again with other note line numbers; set when the outputs name note lines.
    rerender: Rerender | None = None


@dataclass
class Run:
    """What one execution of a note produced, before it is written back."""

    loaded: Loaded
    report: NoteReport
    results: dict[int, BlockResult]
    kernel_restarted: bool = False
    sources: dict[int, CellSource] = field(default_factory=dict)


class Engine(WriteBack):
    def __init__(
        self,
        vault: Vault,
        *,
        kernel_factory: KernelFactory = default_kernel_factory,
        on_event: EventSink | None = None,
        force: bool = False,
        failed: bool = False,
    ) -> None:
        self.vault = vault
        self.failed = failed  # also re-run notes whose stored outputs hold a failure
        self.kernel_factory = kernel_factory
        self.on_event = on_event or (lambda event: None)
        self.force = force

    # -- front door ----------------------------------------------------------------------
    def run_note(self, path: Path, *, require_opt_in: bool = True, write: bool = True) -> NoteReport:
        started = time.monotonic()
        self.prewarm()  # the kernel template starts while the note is read
        try:
            selection = select(self.vault, path, all_notes=not require_opt_in)
        except VaultError as exc:
            return NoteReport(note=self._shown(path), status="refused", message=exc.one_line())
        loaded = selection.loaded
        if loaded is None:
            return NoteReport(note=selection.relative, status=str(selection.skipped))
        edited = loaded.hand_edited()
        if not self.force and loaded.is_current() and not (self.failed and stored_failures(loaded.plan)):
            return NoteReport(
                note=loaded.relative,
                status="current",
                blocks=[block_report(loaded, p, "current") for p in loaded.runnable],
                warnings=list(loaded.warnings),
            )
        if (
            not self.force
            and edited
            and all(freshness(p).has_region and not freshness(p).stale for p in loaded.runnable)
        ):
            # Nothing to run: only hand edits differ. Leave them, report them.
            return NoteReport(
                note=loaded.relative,
                status="ran",
                blocks=[
                    block_report(loaded, p, "hand-edited", message=self._hand_edit_message(loaded, p.block))
                    if p.block in edited
                    else block_report(loaded, p, "current")
                    for p in loaded.runnable
                ],
            )
        if write:
            try:
                self.vault.check_writable(path)  # before a kernel starts: its outputs could not be written
            except VaultError as exc:
                return NoteReport(note=loaded.relative, status="refused", message=exc.one_line())
        run = self.execute(loaded)
        report = run.report
        report.duration = time.monotonic() - started
        if write and loaded.runnable:
            self.write_back(run)
        self.on_event(
            Event("note-finished", loaded.relative, data={"failed": report.failed, "written": report.written})
        )
        return report

    def _shown(self, path: Path) -> str:
        """A note as every report names it: relative to the vault (as given, when it is not inside)."""
        try:
            return path.absolute().relative_to(self.vault.root).as_posix()
        except ValueError:
            return str(path)

    # -- execution -----------------------------------------------------------------------
    def prewarm(self) -> None:
        """Let the kernel factory get ready for a note of the vault's default options."""
        try:
            options = resolve(self.vault.config.defaults, {}).values
        except (VaultError, ValueError):
            return  # the note says what is wrong with them when it runs
        prewarm(self.kernel_factory, self.vault.root, options)

    def start_kernel(self, loaded: Loaded) -> Kernel:
        kernel = self.kernel_factory(
            loaded.path.parent,
            kernel_env(self.vault.root, loaded.path, loaded.note_options.values),
            loaded.note_options.values,
        )
        kernel.start()
        return kernel

    def prepare(self, kernel: Kernel, loaded: Loaded) -> str:
        """Run the setup code (device, seeds) in a kernel; return the device. Raises KernelSetupError."""
        setup = kernel.execute(
            setup_code(loaded.note_options, needs_torch(loaded)),
            SETUP_TIMEOUT,
            silent=True,
            user_expressions={"device": "__vault_runner_device"},
        )
        if setup.status != "ok":
            raise KernelSetupError(f"{loaded.relative}: the kernel could not be prepared: {_setup_failure(setup)}")
        return _expression_text(setup.user_expressions.get("device")) or "cpu"

    def execute(
        self,
        loaded: Loaded,
        kernel: Kernel | None = None,
        *,
        device: str | None = None,
        start_at: int = 0,
        sources: dict[int, CellSource] | None = None,
    ) -> Run:
        """Run the note's blocks from `start_at` (block index) on.

        Without `kernel`, the whole note runs in a fresh one (`execute_fresh`). With one, the
        caller owns it and has prepared it (`device` is what `prepare` returned); blocks
        before `start_at` are taken as already run in it. `sources` maps execution counts
        to note lines for tracebacks and is updated, so a caller can keep it per kernel.
        """
        if kernel is None:
            return self.execute_fresh(loaded)
        return self._execute(loaded, kernel, device=device, start_at=start_at, sources=sources)

    def execute_fresh(self, loaded: Loaded) -> Run:
        """Run the whole note in a fresh kernel, started, prepared and shut down here
        (engine/ray_executor.py runs it on a Ray worker instead)."""
        return self._execute(loaded, None)

    def _execute(
        self,
        loaded: Loaded,
        kernel: Kernel | None,
        *,
        device: str | None = None,
        start_at: int = 0,
        sources: dict[int, CellSource] | None = None,
    ) -> Run:
        relative = loaded.relative
        run = Run(loaded, NoteReport(note=relative, status="ran"), {})
        report = run.report
        report.warnings = list(loaded.warnings)
        self.on_event(Event("note-started", relative, data={"blocks": len(loaded.runnable)}))
        owns_kernel = kernel is None
        sources = {} if sources is None else sources
        run.sources = sources
        stop_reason: str | None = None
        try:
            if kernel is None:
                kernel = self.start_kernel(loaded)
                device = self.prepare(kernel, loaded)
            report.device = device
            report.kernel = getattr(kernel, "origin", None) or "started"
            # Said in the report (and by `doctor`), never in a block's outputs: those stay Jupyter's.
            take_notices = getattr(kernel, "take_notices", None)
            report.warnings.extend(take_notices() if take_notices is not None else [])
            for planned in loaded.plan:
                block = planned.block
                if planned.code_hash is None:
                    report.blocks.append(block_report(loaded, planned, "not-run", message="eval: false"))
                    continue
                if block.index < start_at:
                    report.blocks.append(block_report(loaded, planned, "current", message="kept"))
                    continue
                if stop_reason is not None:
                    report.blocks.append(block_report(loaded, planned, "skipped", message=stop_reason))
                    continue
                self.on_event(Event("block-started", relative, block.index, block.fence_line))
                execution = self._execute_block(kernel, planned, loaded, device, sources)
                if execution.execution_count is not None:
                    sources[execution.execution_count] = CellSource(loaded.path.name, block.code_line, block.index)
                result = self._finish_block(loaded, planned, execution, sources, device)
                run.results[block.index] = result
                report.blocks.append(result.report)
                self.on_event(
                    Event(
                        "block-finished",
                        relative,
                        block.index,
                        block.fence_line,
                        {"status": result.report.status, "duration": result.report.duration},
                    )
                )
                if execution.kernel_restarted:
                    run.kernel_restarted = True
                if stops_the_note(planned, result.report.status, execution.kernel_restarted):
                    stop_reason = stop_message(planned, result.report.status, execution.kernel_restarted)
        except (KernelDied, KernelSetupError) as exc:
            report.status = "failed"
            report.message = str(exc) if isinstance(exc, KernelSetupError) else f"{relative}: {exc}"
        finally:
            if owns_kernel and kernel is not None:
                kernel.shutdown()
        return run

    def _execute_block(
        self,
        kernel: Kernel,
        planned: PlannedBlock,
        loaded: Loaded,
        device: str | None,
        sources: Mapping[int, CellSource],
    ) -> Execution:
        block = planned.block
        options = planned.options
        here = CellSource(loaded.path.name, block.code_line, block.index)

        def forward(output: dict[str, Any], count: int | None) -> None:
            # A warning streamed while the block runs names the note's line, as the report
            # does: the kernel tells the cell's execution count before its first output.
            running = ChainMap({count: here}, sources) if count is not None else sources
            self.on_event(
                Event("output", loaded.relative, block.index, block.fence_line, output_summary(output, running))
            )

        if not options["warning"]:
            kernel.execute(
                "import warnings as __vr_w; __vr_ctx = __vr_w.catch_warnings(); "
                "__vr_ctx.__enter__(); __vr_w.simplefilter('ignore')",
                30,
                silent=True,
            )
        # On CUDA, the block's peak GPU memory comes back with its reply (then is reset).
        expressions = {"gpu_peak": _GPU_PEAK_EXPRESSION} if device and device.startswith("cuda") else None
        execution = kernel.execute(
            block.code, float(options["timeout"]), on_output=forward, user_expressions=expressions
        )
        if not options["warning"] and not execution.kernel_restarted:
            kernel.execute("__vr_ctx.__exit__(None, None, None); del __vr_ctx, __vr_w", 30, silent=True)
        return execution

    def _finish_block(
        self,
        loaded: Loaded,
        planned: PlannedBlock,
        execution: Execution,
        sources: Mapping[int, CellSource],
        device: str | None,
    ) -> BlockResult:
        outputs = list(execution.outputs)
        message = None
        if execution.status == "timeout":
            outputs = _as_timeout(outputs, planned.options["timeout"], execution.kernel_restarted)
            message = f"timed out after {planned.options['timeout']} s"
        elif execution.status == "dead":
            outputs.append(
                {
                    "output_type": "error",
                    "ename": "KernelDied",
                    "evalue": "the Python kernel died while running this block (a crash, os._exit(), "
                    "or running out of memory)",
                    "traceback": [],
                    "vault_runner_hint": "The kernel was restarted, so the blocks after this one did not "
                    "run. Fix this block and run the note again.",
                }
            )
            message = "the kernel died"
        if execution.dropped_bytes:
            outputs.append(
                {
                    "output_type": "stream",
                    "name": "stderr",
                    "text": f"[vault-runner: {execution.dropped_bytes:,} more bytes of output were "
                    "dropped: the block printed more than the output limit]\n",
                }
            )
        if execution.dropped_images:
            outputs.append(
                {
                    "output_type": "stream",
                    "name": "stderr",
                    "text": f"[vault-runner: {execution.dropped_images} more images were dropped: "
                    "the block made more than the image limit]\n",
                }
            )
        expected = planned.options["raises"]
        if expected:
            # The error the block is meant to raise is shown, but not as a failure.
            outputs = [
                {**o, "vault_runner_expected": True}
                if o.get("output_type") == "error" and str(o.get("ename")) == expected
                else o
                for o in outputs
            ]
        rerender = Rerender(
            outputs,
            bool(planned.options["output"]),
            attachment_stem(loaded),
            self.vault,
            loaded.path,
            int(planned.options["output-lines"]),
        )
        rendered = rerender(sources)
        status = execution.status
        if expected:
            raised = [str(o.get("ename")) for o in outputs if o.get("output_type") == "error"]
            if status == "error" and expected in raised:
                status, message = "raised", f"raised {expected} as expected"
            elif status == "ok":
                status, message = "error", f"expected it to raise {expected}, but it raised nothing"
            elif status == "error":
                message = f"expected it to raise {expected}, but it raised {raised[0] if raised else 'another error'}"
        report = block_report(loaded, planned, status, duration=execution.duration, device=device, message=message)
        peak = _expression_text(execution.user_expressions.get("gpu_peak"))
        report.gpu_peak_bytes = int(peak) if peak and peak.isdigit() else None
        report.outputs = rerender.summaries(sources)
        attachment_dir = self.vault.attachment_dir(loaded.path)
        report.attachments = [
            (attachment_dir / a.name).relative_to(self.vault.root).as_posix() for a in rendered.attachments
        ]
        return BlockResult(planned, rendered, report, rerender if names_note_lines(outputs) else None)

    def _hand_edit_message(self, loaded: Loaded, block: notes.Block) -> str:
        line = block.region.first_line if block.region else block.close_line + 1
        return f"{loaded.relative}:{line}: {hand_edit_message(block.fence_line)}"


@dataclass(frozen=True)
class Rerender:
    """Renders a block's outputs for its note (again, with other traceback line numbers).

    A value, not a closure: a Run computed on a Ray worker travels to the driver, which
    points it at its own vault and note (engine/ray_executor.py) and writes it back there.
    """

    outputs: list[dict[str, Any]]  # all of them: the report has them all
    show_all: bool  # the block's `output` option; False: the note shows the errors only
    note_stem: str
    vault: Vault
    note: Path
    output_lines: int

    def __call__(self, sources: Mapping[int, CellSource]) -> Rendered:
        shown = self.outputs if self.show_all else [o for o in self.outputs if o.get("output_type") == "error"]
        return render_outputs(
            shown,
            note_stem=self.note_stem,
            embed=lambda name: self.vault.embed(self.note, self.vault.attachment_dir(self.note) / name),
            sources=sources,
            output_lines=self.output_lines,
        )

    def summaries(self, sources: Mapping[int, CellSource]) -> list[dict[str, Any]]:
        """The report's outputs, warnings naming the same note lines as the note."""
        return [output_summary(output, sources) for output in self.outputs]


def attachment_stem(loaded: Loaded) -> str:
    # The note's path goes into the name so two notes with the same name never share a file.
    digest = hashlib.sha256(loaded.relative.encode()).hexdigest()[:4]
    return f"{loaded.path.stem}-{digest}"


def _as_timeout(outputs: list[dict[str, Any]], timeout: float, restarted: bool) -> list[dict[str, Any]]:
    kept = [o for o in outputs if not (o.get("output_type") == "error" and o.get("ename") == "KeyboardInterrupt")]
    interrupt = next(
        (o for o in outputs if o.get("output_type") == "error" and o.get("ename") == "KeyboardInterrupt"), None
    )
    hint = (
        "It ignored the interrupt, so the kernel was restarted and the blocks after it did not run."
        if restarted
        else "Make it faster, or raise its `#| timeout:` option."
    )
    kept.append(
        {
            "output_type": "error",
            "ename": "TimeoutError",
            "evalue": f"the block ran longer than its timeout of {timeout} s and was stopped",
            "traceback": _where_it_was(interrupt.get("traceback", [])) if interrupt else [],
            "vault_runner_hint": hint,
        }
    )
    return kept


def _where_it_was(traceback: list[str]) -> list[str]:
    """The interrupt's traceback shows where the block was stuck; its closing
    `KeyboardInterrupt:` line is ours (the timeout), not the note's, so it goes."""
    kept = list(traceback)
    while kept and strip_ansi(str(kept[-1])).strip().startswith("KeyboardInterrupt"):
        kept.pop()
    return kept


def _expression_text(value: Any) -> str | None:
    if not isinstance(value, dict) or value.get("status") != "ok":
        return None
    text = value.get("data", {}).get("text/plain")
    return text.strip("'\"") if isinstance(text, str) else None


def _setup_failure(execution: Execution) -> str:
    for output in execution.outputs:
        if output.get("output_type") == "error":
            return f"{output.get('ename')}: {output.get('evalue')}"
    return execution.status
