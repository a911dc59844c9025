"""Run a note: load, plan, execute in a kernel, render, write back; emit events on the way.

The engine is what every front end calls. It never loses a user's edit: write-back
re-reads the note, puts outputs only under blocks whose code is still the code that
ran, and swaps the file in only if nothing changed since that re-read (contract 5).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from . import note as notes
from .errors import KernelSetupError
from .kernel import Execution, KernelDied, KernelSession
from .model import BlockReport, Event, EventSink, NoteReport
from .options import OptionError, Resolved, opted_in, resolve
from .render import ATTACHMENT_LINK_RE, CellSource, Rendered, output_summary, render_outputs
from .vault import ATTACHMENT_RE, Vault, VaultError, WriteConflict, swap_note, write_attachment

MAX_WRITE_ATTEMPTS = 50
SETUP_TIMEOUT = 120.0
_GPU_PEAK_EXPRESSION = (
    "(__import__('torch').cuda.max_memory_allocated(), __import__('torch').cuda.reset_peak_memory_stats())[0]"
)


class Kernel(Protocol):
    def start(self) -> None: ...
    def shutdown(self) -> None: ...
    def execute(
        self,
        code: str,
        timeout: float,
        on_output: Any = None,
        silent: bool = False,
        user_expressions: dict[str, str] | None = None,
    ) -> Execution: ...


KernelFactory = Callable[[Path, dict[str, str], Mapping[str, Any]], Kernel]


def default_kernel_factory(cwd: Path, env: dict[str, str], note_options: Mapping[str, Any]) -> Kernel:
    """A kernel in the sandbox (sandbox.py) that the note's options ask for: network,
    memory, device (GPU placement and device nodes)."""
    from .sandbox import Sandbox, SandboxError, policy_from_options

    try:
        sandbox = Sandbox(policy_from_options(cwd, env, note_options))
    except (SandboxError, ValueError) as exc:
        raise KernelDied(f"the kernel's sandbox could not be set up: {exc}") from None
    return KernelSession(cwd, env, sandbox=sandbox)


@dataclass(frozen=True)
class PlannedBlock:
    block: notes.Block
    options: Resolved
    code_hash: str | None  # None when the block does not run (eval: false)


@dataclass(frozen=True)
class Loaded:
    path: Path
    relative: str
    data: bytes
    note: notes.Note
    opted_in: bool
    note_options: Resolved
    plan: tuple[PlannedBlock, ...]

    @property
    def runnable(self) -> tuple[PlannedBlock, ...]:
        return tuple(p for p in self.plan if p.code_hash is not None)

    def is_current(self) -> bool:
        for planned in self.plan:
            region = planned.block.region
            if planned.code_hash is None:
                if region is not None:
                    return False
            elif region is None or region.code_hash != planned.code_hash or region.hand_edited:
                return False
        return True

    def hand_edited(self) -> list[notes.Block]:
        return [p.block for p in self.runnable if p.block.region is not None and p.block.region.hand_edited]


def could_have_blocks(data: bytes) -> bool:
    """Cheap byte-level filter: can this note hold a runnable block or one of our regions?"""
    if b"vault-runner:" in data:
        return True
    return (b"```" in data or b"~~~" in data) and b"py" in data.lower()


def load(vault: Vault, path: Path, data: bytes | None = None) -> Loaded:
    """Parse a note (read it, unless its bytes are given). Raises VaultError (file and line)
    on input we must not touch."""
    relative = vault.relative(vault.check_inside(path))
    if data is None:
        data = vault.read_note(path)
    try:
        text = notes.decode_note(data)
    except notes.NoteError as exc:
        # Bytes we cannot decode only matter in a note we would run or write.
        if _without_blocks(notes.parse_note(data.decode("utf-8", "replace"))):
            return _nothing_to_run(path, relative, data)
        raise VaultError(path, exc.message, exc.line) from None
    note = notes.parse_note(text)
    if _without_blocks(note):
        # A note with no python block is never run nor written, so its frontmatter,
        # however broken, is none of our business (real vaults have plenty of those).
        return _nothing_to_run(path, relative, data, note)
    if note.problems:
        problem = note.problems[0]
        raise VaultError(path, problem.message, problem.line)
    if note.frontmatter_error is not None:
        raise VaultError(path, note.frontmatter_error.message, note.frontmatter_error.line)
    config = vault.config
    try:
        note_options = resolve(config.defaults, note.frontmatter)
    except OptionError as exc:
        raise VaultError(path, f"frontmatter: {exc}", 2) from None
    plan = []
    previous = ""
    for block in note.blocks:
        if block.option_error:
            raise VaultError(path, block.option_error, block.code_line)
        try:
            options = resolve(config.defaults, note.frontmatter, block.options)
        except OptionError as exc:
            raise VaultError(path, str(exc), block.code_line) from None
        digest = None
        if options["eval"]:
            digest = notes.code_hash(previous, block.code, options.hashed())
            previous = digest
        plan.append(PlannedBlock(block, options, digest))
    return Loaded(
        path=path,
        relative=relative,
        data=data,
        note=note,
        opted_in=opted_in(note.frontmatter, relative, config.include, config.exclude),
        note_options=note_options,
        plan=tuple(plan),
    )


def kernel_env(vault_root: Path, note: Path | None, note_options: Mapping[str, Any]) -> dict[str, str]:
    """The environment a kernel is launched with (a warm spare has no note yet)."""
    env = {"VAULT_RUNNER_NOTE": str(note or ""), "VAULT_RUNNER_VAULT": str(vault_root)}
    if note_options.get("deterministic"):
        # Read by CUDA/cuBLAS and Python only at start-up, so they go in the launch env.
        env.update(CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONHASHSEED="0")
    return env


def may_be_opted_in(vault: Vault, path: Path, data: bytes) -> bool:
    """Could this note opt in? Judged on its bytes: the `vault-runner` property written in it,
    or a folder the vault config includes.

    Cheap, so that the many notes of a big vault that merely mention python are never
    parsed, and so that a broken draft that does not opt in (a half-written, unclosed fence)
    is left alone rather than reported.
    """
    if b"vault-runner" in data:
        return True
    try:
        relative = vault.relative(path)
    except ValueError:
        return True
    return opted_in({}, relative, vault.config.include, vault.config.exclude)


@dataclass(frozen=True)
class Selection:
    """Whether vault-runner runs a note: the loaded note, or why it is skipped."""

    relative: str
    loaded: Loaded | None
    skipped: str | None = None  # no-blocks | not-opted-in


def select(vault: Vault, path: Path, *, all_notes: bool = False) -> Selection:
    """Read a note once and decide whether it runs: it has python blocks and, unless
    `all_notes`, it opts in. Raises VaultError only for a note that would run."""
    relative = vault.relative(vault.check_inside(path))
    data = vault.read_note(path)
    if not could_have_blocks(data):
        return Selection(relative, None, "no-blocks")
    if not all_notes and not may_be_opted_in(vault, path, data):
        return Selection(relative, None, "not-opted-in")
    loaded = load(vault, path, data)
    if not loaded.plan:
        return Selection(relative, None, "no-blocks")
    if not all_notes and not loaded.opted_in:
        return Selection(relative, None, "not-opted-in")
    return Selection(relative, loaded)


def block_report(
    loaded: Loaded,
    planned: PlannedBlock,
    status: str,
    *,
    duration: float = 0.0,
    device: str | None = None,
    message: str | None = None,
) -> BlockReport:
    """A block's entry of the report (DESIGN.md contract 8), before its outputs are added."""
    block = planned.block
    first = next((line for line in block.code.split("\n") if line.strip() and not line.startswith("#|")), "")
    return BlockReport(
        note=loaded.relative,
        index=block.index,
        line=block.fence_line,
        first_line=first,
        label=planned.options["label"],
        status=status,
        duration=round(duration, 4),
        device=device,
        message=message,
    )


def _without_blocks(note: notes.Note) -> bool:
    return not note.blocks and not note.problems


def _nothing_to_run(path: Path, relative: str, data: bytes, note: notes.Note | None = None) -> Loaded:
    empty = note or notes.parse_note("")
    return Loaded(path, relative, data, empty, opted_in=False, note_options=resolve({}, {}), plan=())


def setup_code(note_options: Mapping[str, Any], need_torch: bool) -> str:
    """Code run silently in a fresh kernel before the note's first block."""
    settings = json.dumps(
        {
            "device": note_options["device"],
            "seed": note_options["seed"],
            "torch": need_torch,
            "deterministic": note_options["deterministic"],
            "fraction": note_options["gpu-memory-fraction"],
        }
    )
    # No `%config InlineBackend...` here: it imports matplotlib (0.6 s) in every kernel, and
    # PNG is already the inline backend's default format.
    return f"""
def __vault_runner_setup(settings):
    import json, os, random
    settings = json.loads(settings)
    shell = get_ipython()
    device = "cpu"
    if settings["torch"] or settings["device"] != "auto":
        import torch
        request = settings["device"]
        if request == "auto":
            mps = getattr(torch.backends, "mps", None)
            if torch.cuda.is_available():
                device = "cuda"
            elif mps is not None and mps.is_available():
                device = "mps"
        else:
            kind = request.split(":")[0]
            if kind == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("this note asks for device " + request + ", but CUDA is not available here")
            if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
                raise RuntimeError("this note asks for device mps, but MPS is not available here")
            device = request
        shell.user_ns["DEVICE"] = torch.device(device)
        if settings["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        if settings["fraction"] and device.startswith("cuda"):
            index = torch.device(device).index  # None for plain "cuda", which torch refuses here
            torch.cuda.set_per_process_memory_fraction(
                float(settings["fraction"]), torch.cuda.current_device() if index is None else index
            )
    os.environ["VAULT_RUNNER_DEVICE"] = device
    seed = settings["seed"]
    if seed is not None:
        random.seed(seed)
        try:
            import numpy
            numpy.random.seed(seed)
        except ImportError:
            pass
        if "torch" in __import__("sys").modules:
            import torch
            torch.manual_seed(seed)
    return device
__vault_runner_device = __vault_runner_setup({settings!r})
del __vault_runner_setup
"""


def _needs_torch(loaded: Loaded) -> bool:
    return any("torch" in p.block.code or "DEVICE" in p.block.code for p in loaded.runnable)


@dataclass
class _Result:
    planned: PlannedBlock
    rendered: Rendered | None  # None: nothing to write for this block
    report: BlockReport
    # Renders again with other traceback line numbers; set when the outputs hold an error.
    rerender: Callable[[Mapping[int, CellSource]], Rendered] | None = None


@dataclass
class Run:
    """What one execution of a note produced, before it is written back."""

    loaded: Loaded
    report: NoteReport
    results: dict[int, _Result]
    kernel_restarted: bool = False
    sources: dict[int, CellSource] = field(default_factory=dict)


class Engine:
    def __init__(
        self,
        vault: Vault,
        *,
        kernel_factory: KernelFactory = default_kernel_factory,
        on_event: EventSink | None = None,
        force: bool = False,
    ) -> None:
        self.vault = vault
        self.kernel_factory = kernel_factory
        self.on_event = on_event or (lambda event: None)
        self.force = force

    # -- front door ----------------------------------------------------------------------
    def run_note(self, path: Path, *, require_opt_in: bool = True, write: bool = True) -> NoteReport:
        started = time.monotonic()
        try:
            selection = select(self.vault, path, all_notes=not require_opt_in)
        except VaultError as exc:
            return NoteReport(note=str(path), status="refused", message=exc.one_line())
        loaded = selection.loaded
        if loaded is None:
            return NoteReport(note=selection.relative, status=str(selection.skipped))
        edited = loaded.hand_edited()
        if not self.force and loaded.is_current():
            return NoteReport(
                note=loaded.relative,
                status="current",
                blocks=[block_report(loaded, p, "current") for p in loaded.runnable],
            )
        if (
            not self.force
            and edited
            and all(p.block.region is not None and p.block.region.code_hash == p.code_hash for p in loaded.runnable)
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
        run = self.execute(loaded)
        report = run.report
        report.duration = time.monotonic() - started
        if write and loaded.runnable:
            self.write_back(run)
        self.on_event(
            Event("note-finished", loaded.relative, data={"failed": report.failed, "written": report.written})
        )
        return report

    # -- execution -----------------------------------------------------------------------
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
            setup_code(loaded.note_options, _needs_torch(loaded)),
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

        Without `kernel`, a fresh one is started, prepared and shut down. With one, the
        caller owns it and has prepared it (`device` is what `prepare` returned); blocks
        before `start_at` are taken as already run in it. `sources` maps execution counts
        to note lines for tracebacks and is updated, so a caller can keep it per kernel.
        """
        relative = loaded.relative
        run = Run(loaded, NoteReport(note=relative, status="ran"), {})
        report = run.report
        report.warnings = list(loaded.note_options.warnings)
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
                execution = self._execute_block(kernel, planned, relative, device)
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
                    stop_reason = (
                        f"not run: the kernel was restarted after the block at line "
                        f"{block.fence_line}; fix it and run the note again"
                    )
                elif result.report.status == "error" and not planned.options["error"]:
                    stop_reason = (
                        f"not run: the block at line {block.fence_line} raised and "
                        f"`error: false` stops the note at the first error"
                    )
        except (KernelDied, KernelSetupError) as exc:
            report.status = "failed"
            report.message = str(exc) if isinstance(exc, KernelSetupError) else f"{relative}: {exc}"
        finally:
            if owns_kernel and kernel is not None:
                kernel.shutdown()
        return run

    def _execute_block(
        self, kernel: Kernel, planned: PlannedBlock, relative: str, device: str | None = None
    ) -> Execution:
        block = planned.block
        options = planned.options

        def forward(output: dict[str, Any]) -> None:
            self.on_event(Event("output", relative, block.index, block.fence_line, output_summary(output)))

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
    ) -> _Result:
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
        shown = outputs if planned.options["output"] else [o for o in outputs if o.get("output_type") == "error"]

        def rerender(cell_sources: Mapping[int, CellSource]) -> Rendered:
            return render_outputs(
                shown,
                note_stem=_attachment_stem(loaded),
                embed=lambda name: self.vault.embed(loaded.path, self.vault.attachment_dir(loaded.path) / name),
                sources=cell_sources,
                output_lines=int(planned.options["output-lines"]),
            )

        rendered = rerender(sources)
        status = execution.status
        expected = planned.options["raises"]
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
        report.outputs = [output_summary(o) for o in outputs]
        attachment_dir = self.vault.attachment_dir(loaded.path)
        report.attachments = [
            (attachment_dir / a.name).relative_to(self.vault.root).as_posix() for a in rendered.attachments
        ]
        has_error = any(o.get("output_type") == "error" for o in shown)
        return _Result(planned, rendered, report, rerender if has_error else None)

    def _hand_edit_message(self, loaded: Loaded, block: notes.Block) -> str:
        line = block.region.first_line if block.region else block.close_line + 1
        return (
            f"{loaded.relative}:{line}: the output region of the block at line {block.fence_line} "
            "was edited by hand; move your text out of it, or run with --force to overwrite it"
        )

    # -- write-back ----------------------------------------------------------------------
    def write_back(self, run: Run) -> None:
        """Compare-and-swap the new regions into the note (DESIGN.md contract 5)."""
        loaded, report, results = run.loaded, run.report, run.results
        ran = [(p, results.get(p.block.index)) for p in loaded.plan]
        by_report = {b.index: b for b in report.blocks}
        attachment_dir = self.vault.attachment_dir(loaded.path)
        for _attempt in range(MAX_WRITE_ATTEMPTS):
            try:
                current = loaded.path.read_bytes()
            except OSError as exc:
                report.message = f"{loaded.relative}: outputs not written: the note could not be re-read ({exc})"
                report.status = "failed"
                return
            if current == loaded.data:
                note = loaded.note
            else:
                try:
                    note = notes.parse_note(notes.decode_note(current))
                except notes.NoteError as exc:
                    report.message = f"{loaded.relative}:{exc.line}: outputs not written: the note {exc.message}"
                    report.status = "failed"
                    return
                if note.problems:
                    report.message = (
                        f"{loaded.relative}:{note.problems[0].line}: outputs not written: "
                        f"the note {note.problems[0].message}"
                    )
                    report.status = "failed"
                    return
            regions, old_links, unwritten, matched = self._regions_for(note, ran, by_report)
            new_text = notes.splice(note, regions)
            if self._reline_tracebacks(new_text, matched, ran, run.sources):
                regions, old_links, unwritten, matched = self._regions_for(note, ran, by_report)
                new_text = notes.splice(note, regions)
            new = new_text.encode("utf-8", "surrogatepass")
            needed = {
                a.name: a
                for _, r in ran
                if r and r.rendered
                for a in r.rendered.attachments
                if _links_to(new_text, a.name)
            }
            for attachment in needed.values():
                write_attachment(attachment_dir / attachment.name, attachment.data)
            if new != current:
                try:
                    swap_note(loaded.path, current, new)
                except WriteConflict:
                    continue
                report.written = True
                self.on_event(Event("note-written", loaded.relative))
            for index in unwritten:
                block_report = by_report.get(index)
                if block_report and not block_report.failed:
                    block_report.status = "unwritten"
                    block_report.message = "its code changed while it ran; it will run again next time"
            remove_stale_attachments(attachment_dir, old_links, new_text)
            return
        report.status = "failed"
        report.reason = "write_conflict"
        report.message = (
            f"{loaded.relative}: outputs not written: the note kept changing while "
            "vault-runner tried to save it; run it again"
        )

    def _reline_tracebacks(
        self,
        new_text: str,
        matched: Mapping[int, int],
        ran: list[tuple[PlannedBlock, _Result | None]],
        sources: Mapping[int, CellSource],
    ) -> bool:
        """Point tracebacks at the lines blocks have in the note as written, not as read.

        Regions inserted above a block move it down; re-rendering an error only changes
        digits, never the number of lines, so one extra pass settles every line number.
        """
        errors = [r for _, r in ran if r is not None and r.rerender is not None]
        if not errors:
            return False
        written = notes.parse_note(new_text)
        line_of = {
            planned: written.blocks[current].code_line
            for planned, current in matched.items()
            if current < len(written.blocks)
        }
        relined = {
            count: replace(source, first_code_line=line_of.get(source.block_index, source.first_code_line))
            if source.block_index is not None
            else source
            for count, source in sources.items()
        }
        if relined == dict(sources):
            return False
        for result in errors:
            assert result.rerender is not None
            result.rendered = result.rerender(relined)
        return True

    def _regions_for(
        self, note: notes.Note, ran: list[tuple[PlannedBlock, _Result | None]], by_report: Mapping[int, BlockReport]
    ) -> tuple[dict[int, list[str] | None], set[str], set[int], dict[int, int]]:
        """Match the blocks of the (re-read) note to what ran, by code, occurrence by occurrence."""
        queues: dict[str, list[tuple[PlannedBlock, _Result | None]]] = {}
        for planned, result in ran:
            queues.setdefault(planned.block.code, []).append((planned, result))
        regions: dict[int, list[str] | None] = {}
        old_links: set[str] = set()
        matched: dict[int, int] = {}  # planned block index -> index in the re-read note
        for block in note.blocks:
            candidates = queues.get(block.code)
            if not candidates:
                continue
            planned, result = candidates.pop(0)
            matched[planned.block.index] = block.index
            if planned.code_hash is None:
                if block.region is not None:
                    old_links |= _attachment_names(block.region.body)
                    regions[block.index] = None
                continue
            if result is None or result.rendered is None:
                continue
            if block.region is not None and block.region.hand_edited and not self.force:
                result.report.status = "hand-edited"
                result.report.message = (
                    f"{by_report[planned.block.index].note}:{block.region.first_line}: "
                    f"the output region of the block at line {block.fence_line} was "
                    "edited by hand, so it was left as it is; move your text out of "
                    "it, or run with --force to overwrite it"
                )
                continue
            if block.region is not None:
                old_links |= _attachment_names(block.region.body)
            regions[block.index] = notes.region_lines(block, planned.code_hash, result.rendered.body)
        unwritten = {p.block.index for p, r in ran if r is not None and p.block.index not in matched}
        return regions, old_links, unwritten, matched


def remove_stale_attachments(folder: Path, old_links: set[str], new_text: str) -> None:
    """Delete attachments our old regions linked and the note no longer does: only our own
    files (name pattern), never through a symlink."""
    for name in old_links:
        if not ATTACHMENT_RE.search(name) or _links_to(new_text, name):
            continue
        path = folder / name
        try:
            if path.is_file() and not path.is_symlink():
                path.unlink()
        except OSError:
            pass


def _attachment_stem(loaded: Loaded) -> str:
    # The note's path goes into the name so two notes with the same name never share a file.
    digest = hashlib.sha256(loaded.relative.encode()).hexdigest()[:4]
    return f"{loaded.path.stem}-{digest}"


def _attachment_names(body: str) -> set[str]:
    names = set()
    for match in ATTACHMENT_LINK_RE.finditer(body):
        target = match.group(1) or match.group(2) or ""
        names.add(unquote(target.strip()).rsplit("/", 1)[-1])
    return names


def _links_to(text: str, name: str) -> bool:
    return name in text or name.replace(" ", "%20") in text


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
            "traceback": interrupt.get("traceback", []) if interrupt else [],
            "vault_runner_hint": hint,
        }
    )
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


def clean_note(vault: Vault, path: Path) -> bool:
    """Remove every output region of a note and the attachments vault-runner made for them.

    Returns True when the note was written. Same compare-and-swap as a run's write-back.
    """
    for _attempt in range(MAX_WRITE_ATTEMPTS):
        loaded_bytes = vault.read_note(path)
        if b"vault-runner:" not in loaded_bytes:
            return False  # no region of ours: nothing to parse
        try:
            note = notes.parse_note(notes.decode_note(loaded_bytes))
        except notes.NoteError as exc:
            raise VaultError(path, exc.message, exc.line) from None
        if note.problems:
            raise VaultError(path, note.problems[0].message, note.problems[0].line)
        with_region = [b for b in note.blocks if b.region is not None]
        if not with_region:
            return False
        links: set[str] = set()
        for block in with_region:
            assert block.region is not None
            links |= _attachment_names(block.region.body)
        new_text = notes.strip_regions(note)
        try:
            swap_note(path, loaded_bytes, new_text.encode("utf-8", "surrogatepass"))
        except WriteConflict:
            continue
        remove_stale_attachments(vault.attachment_dir(path), links, new_text)
        return True
    raise VaultError(path, "kept changing while vault-runner tried to clean it; try again")
