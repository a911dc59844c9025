"""`vault-runner test`: run opted-in notes in a fresh kernel each and judge the blocks.

Nothing is written unless asked (`update`): the note's bytes are only read. A block
passes when it ran without an error, or raised exactly the exception its `raises` option
names; with `compare` (flag, or the `compare` option of a note or block) its text output
must also match the stored region after sanitizing (core/compare.py, compare_bodies).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vault_runner.ci.check import shown_path
from vault_runner.core.compare import compare_bodies, compile_sanitizers
from vault_runner.disk.vault import CONFIG_NAME, Vault
from vault_runner.engine import (
    Engine,
    KernelFactory,
    NoteReport,
    close_default_kernels,
    default_kernel_factory,
    select,
)
from vault_runner.errors import SanitizerError, VaultError
from vault_runner.kernel.sandbox.policy import MEMORY_ENV, default_memory
from vault_runner.model import NOTE_FAILED, TEST_FAILED

MISMATCH = "mismatch"
FAILING = TEST_FAILED


@dataclass
class NoteResult:
    """The report of one note under `test`, with what a failure should show."""

    path: str  # the note as shown to the user
    report: NoteReport
    code: dict[int, str] = field(default_factory=dict)  # block index -> code
    details: dict[int, str] = field(default_factory=dict)  # block index -> traceback / diff

    @property
    def refused(self) -> bool:
        return self.report.status == "refused"

    @property
    def counted(self) -> bool:
        """Whether the note is part of the run (opted in, with blocks)."""
        return self.report.status not in {"not-opted-in", "no-blocks"}

    @property
    def failed(self) -> bool:
        return self.report.status in NOTE_FAILED or any(b.status in FAILING for b in self.report.blocks)

    def to_json(self) -> dict[str, Any]:
        data = self.report.to_json()
        data["path"] = self.path
        for block in data["blocks"]:
            detail = self.details.get(block["index"])
            if detail is not None and block["status"] in FAILING:
                block["details"] = detail
        return data


@dataclass(frozen=True)
class NoteTestOptions:
    compare: bool = False  # compare every block's text output with the stored one
    update: bool = False  # write the fresh outputs back into the note, as render does
    all_notes: bool = False  # ignore opt-in


def run_note(
    vault: Vault,
    path: Path,
    options: NoteTestOptions = NoteTestOptions(),
    *,
    kernel_factory: KernelFactory = default_kernel_factory,
    make_engine: Callable[..., Engine] = Engine,
) -> NoteResult:
    """Run one note in a fresh kernel and judge its blocks (`make_engine`: Engine, or the
    RayEngine of a cluster, which runs the note there and judges and writes it here)."""
    shown = shown_path(path)
    started = time.monotonic()
    try:
        selection = select(vault, path, all_notes=options.all_notes)
        sanitizers = compile_sanitizers(vault.config.sanitizers)
    except VaultError as exc:
        return NoteResult(shown, NoteReport(note=shown, status="refused", message=exc.one_line()))
    except SanitizerError as exc:
        message = VaultError(vault.root / CONFIG_NAME, str(exc)).one_line()
        return NoteResult(shown, NoteReport(note=shown, status="refused", message=message))
    loaded = selection.loaded
    if loaded is None or not loaded.runnable:
        return NoteResult(shown, NoteReport(note=selection.relative, status=selection.skipped or "no-blocks"))
    engine = make_engine(vault, kernel_factory=kernel_factory)
    run = engine.execute(loaded)
    report = run.report
    result = NoteResult(shown, report, code={p.block.index: p.block.code for p in loaded.plan})
    by_index = {b.index: b for b in report.blocks}
    for planned in loaded.runnable:
        index = planned.block.index
        outcome = run.results.get(index)
        block_report = by_index.get(index)
        if outcome is None or block_report is None:
            continue
        body = outcome.rendered.body if outcome.rendered is not None else ""
        if block_report.status in FAILING:
            result.details[index] = body
            continue
        region = planned.block.region
        if not (options.compare or planned.options["compare"]) or region is None:
            continue
        diff = compare_bodies(region.body, body, sanitizers)
        if diff is not None:
            block_report.status = MISMATCH
            stale = region.code_hash != planned.code_hash
            block_report.message = "its output differs from the output stored in the note" + (
                " (the stored output is stale: run `vault-runner render`)"
                if stale
                else "; if the new output is right, run `vault-runner test --update` or `vault-runner render --force`"
            )
            result.details[index] = diff
    if options.update:
        engine.write_back(run)
    report.duration = time.monotonic() - started
    return result


def _guarded(
    vault: Vault,
    path: Path,
    options: NoteTestOptions,
    kernel_factory: KernelFactory = default_kernel_factory,
    make_engine: Callable[..., Engine] = Engine,
) -> NoteResult:
    """run_note, with an unexpected crash turned into a failed note instead of a lost run."""
    try:
        return run_note(vault, path, options, kernel_factory=kernel_factory, make_engine=make_engine)
    except Exception as exc:
        shown = shown_path(path)
        message = f"{shown}: vault-runner could not test this note ({type(exc).__name__}: {exc}); run it again"
        return NoteResult(shown, NoteReport(note=shown, status="failed", message=message))


def run_notes(
    notes: Sequence[tuple[Vault, Path]],
    options: NoteTestOptions = NoteTestOptions(),
    *,
    jobs: int = 1,
    on_result: Callable[[NoteResult], None] | None = None,
    kernel_factory: KernelFactory = default_kernel_factory,
    make_engine: Callable[..., Engine] | None = None,
) -> list[NoteResult]:
    """Test notes, `jobs` at a time (one kernel per note); results in the order of `notes`.

    With more than one job, notes run in worker processes (spawned, so no kernel's sockets
    or threads are inherited); a custom `kernel_factory` needs jobs=1. With `make_engine`
    (a Ray cluster's), they wait on the cluster in threads of this process, its driver.
    """
    done = on_result or (lambda result: None)
    if jobs <= 1 or len(notes) <= 1:
        results = []
        try:
            for vault, path in notes:
                result = _guarded(vault, path, options, kernel_factory, make_engine or Engine)
                done(result)
                results.append(result)
        finally:
            close_default_kernels()  # the batch is done: no kernel template outlives it
        return results
    if make_engine is not None:
        return _in_threads(notes, options, jobs, done, kernel_factory, make_engine)
    if kernel_factory is not default_kernel_factory:
        raise ValueError("a custom kernel_factory only works with jobs=1")
    slots: list[NoteResult | None] = [None] * len(notes)
    context = multiprocessing.get_context("spawn")
    workers = min(jobs, len(notes))
    share = _budget_share(workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_take_budget_share, initargs=(share,)) as pool:
        futures = {pool.submit(_guarded, vault, path, options): i for i, (vault, path) in enumerate(notes)}
        try:
            for future in as_completed(futures):
                result = future.result()
                slots[futures[future]] = result
                done(result)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [r for r in slots if r is not None]


def _budget_share(workers: int) -> int | None:
    """Each worker's part of the memory budget: the kernels of every worker together stay
    within the one budget (each worker process holds a budget of its own)."""
    total = default_memory()[0]
    return None if total is None else total // workers


def _take_budget_share(share: int | None) -> None:
    if share is not None:
        os.environ[MEMORY_ENV] = str(share)


def _in_threads(
    notes: Sequence[tuple[Vault, Path]],
    options: NoteTestOptions,
    jobs: int,
    done: Callable[[NoteResult], None],
    kernel_factory: KernelFactory,
    make_engine: Callable[..., Engine],
) -> list[NoteResult]:
    slots: list[NoteResult | None] = [None] * len(notes)
    pool = ThreadPoolExecutor(max_workers=min(jobs, len(notes)))
    futures = {
        pool.submit(_guarded, vault, path, options, kernel_factory, make_engine): i
        for i, (vault, path) in enumerate(notes)
    }
    try:
        for future in as_completed(futures):
            result = future.result()
            slots[futures[future]] = result
            done(result)
    finally:
        # Not waiting: on Ctrl+C the caller cancels the tasks these threads wait on.
        pool.shutdown(wait=False, cancel_futures=True)
    return [r for r in slots if r is not None]
