"""The endpoints of the API, on one APIRouter: each turns a request into a call of the `Runner`.

The runner (vault_runner.live) serialises the runs of one note, runs different notes in
parallel up to its kernel cap, and gives API runs the same compare-and-swap write-back as
the watcher. A run that was served but did not go well is not an HTTP error: its result
carries the report and an `error` (codes.run_error).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import platform
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from vault_runner import __version__
from vault_runner.disk.trust import is_trusted, untrusted_message
from vault_runner.disk.vault import Vault, VaultError
from vault_runner.engine.loading import Loaded, block_report, load
from vault_runner.errors import ApiError, PathRefused
from vault_runner.frontends.api.codes import run_error
from vault_runner.frontends.api.events import EventHub, event_stream
from vault_runner.frontends.api.schemas import (
    CLIENT_PATTERN,
    ERROR_RESPONSES,
    NOTE_PATTERN,
    BlockByIndex,
    BlockByLine,
    CancelResult,
    InterruptResult,
    NoteRequest,
    NoteResults,
    RestartResult,
    RunRequest,
    RunResult,
    Status,
)
from vault_runner.frontends.api.security import resolve_note
from vault_runner.live.runner import Runner
from vault_runner.model import BlockReport, NoteReport

__all__ = ("API_PREFIX", "named_note", "router", "versions")

API_PREFIX = "/api/v1"

router = APIRouter()


# -- helpers for the routes -------------------------------------------------------------------
def _state(request: Request) -> Any:
    return request.app.state


async def named_note(request: Request, raw: str) -> tuple[Any, Path]:
    """The app state and the note a control request names (it need not exist any more)."""
    state = _state(request)
    return state, await run_in_threadpool(_resolve, state.runner.vault, raw, False)


async def _call_on_note(request: Request, raw: str, action: Callable[[Runner, Path], bool]) -> tuple[str, bool]:
    """Call `action` (Runner.interrupt, Runner.cancel) on the note a control request names, in a
    worker thread: the note as the vault names it, and whether there was anything to do."""
    state, path = await named_note(request, raw)
    done = await run_in_threadpool(action, state.runner, path)
    return state.runner.vault.relative(path), bool(done)


def _resolve(vault: Vault, raw: str, must_exist: bool = True) -> Path:
    try:
        return resolve_note(vault, raw, must_exist=must_exist)
    except PathRefused as exc:
        raise ApiError(exc.code, exc.message) from None


def _check_trust(vault: Vault) -> None:
    if not is_trusted(vault.root):
        raise ApiError("vault_not_trusted", untrusted_message(vault.root))


def _load(vault: Vault, path: Path) -> Loaded:
    try:
        return load(vault, path)
    except VaultError as exc:
        raise ApiError("invalid_note", exc.one_line()) from None
    except (OSError, RuntimeError) as exc:
        raise ApiError("invalid_note", f"{vault.relative(path)}: cannot be read ({exc}); check the file") from None


def _prepare_run(state: Any, raw: str) -> tuple[Path, Loaded]:
    """Everything checked before a run is queued: path, trust, note, opt-in."""
    vault: Vault = state.runner.vault
    path = _resolve(vault, raw)
    _check_trust(vault)
    loaded = _load(vault, path)
    if state.runner.require_opt_in and loaded.plan and not loaded.opted_in:
        raise ApiError(
            "not_opted_in",
            f"{loaded.relative}: this note does not opt in to vault-runner; add `vault-runner: true` to its "
            "properties, or include its folder in vault-runner.toml",
        )
    return path, loaded


def _block_index(loaded: Loaded, index: int | None, line: int | None) -> int:
    if (index is None) == (line is None):
        raise ApiError("invalid_request", "give the block as `index` or as `line`, one of the two")
    for planned in loaded.plan:
        block = planned.block
        if index is not None:
            hit = block.index == index
        else:
            assert line is not None
            region = block.region
            hit = block.fence_line <= line <= block.close_line or (
                region is not None and region.start + 1 <= line <= region.stop
            )
        if hit:
            if planned.code_hash is None:
                raise ApiError(
                    "unknown_block",
                    f"{loaded.relative}:{block.fence_line}: this block has `eval: false`, so it does not run",
                )
            return block.index
    if index is not None:
        count = len(loaded.plan)
        raise ApiError(
            "unknown_block",
            f"{loaded.relative}: there is no python block {index} (the note has {count}, numbered from 0)",
        )
    raise ApiError("unknown_block", f"{loaded.relative}:{line}: there is no python block at this line")


_CANCELLED = object()


async def _await(future: Future[Any]) -> Any:
    """Wait for a runner future without ever cancelling it (a client that leaves does not stop a run)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def done(_: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    future.add_done_callback(done)
    await asyncio.shield(waiter)
    if future.cancelled():
        return _CANCELLED
    return future.result()


async def _submit_run(state: Any, relative: str, future: Future[Any], wait: bool) -> JSONResponse:
    if not wait:
        body = RunResult(note=relative, state="queued", report=None, error=None).model_dump(
            mode="json", exclude_unset=True
        )
        return JSONResponse(body, status_code=202)
    result = await _await(future)
    if result is _CANCELLED:
        if state.runner.status().get("closed"):
            raise ApiError("shutting_down", "vault-runner is shutting down; the run did not happen")
        raise ApiError("cancelled", f"{relative}: the run was cancelled before it started")
    if not isinstance(result, NoteReport):
        raise ApiError("internal_error", f"{relative}: the run gave no report; please report this")
    if result.status == "refused":
        raise ApiError("invalid_note", result.message or f"{relative}: the note cannot be run")
    problem = run_error(result)
    error = None if problem is None else {"code": problem.code, "message": problem.message}
    body = RunResult(note=relative, state="finished", report=result.to_json(), error=error)  # type: ignore[arg-type]
    # exclude_unset: outputs keep the keys the engine gave them (contract 8), no added nulls.
    return JSONResponse(body.model_dump(mode="json", exclude_unset=True))


def _report_from_note(loaded: Loaded) -> dict[str, Any]:
    """What the note on disk says, without running anything."""
    blocks: list[BlockReport] = []
    for planned in loaded.plan:
        block = planned.block
        region = block.region
        if planned.code_hash is None:
            status = "not-run"
        elif region is not None and region.hand_edited:
            status = "hand-edited"
        elif region is not None and region.code_hash == planned.code_hash:
            status = "current"
        else:
            status = "stale"
        blocks.append(block_report(loaded, planned, status))
    if not loaded.plan:
        status = "no-blocks"
    else:
        status = "current" if loaded.is_current() else "stale"
    return NoteReport(note=loaded.relative, status=status, blocks=blocks).to_json()


def versions() -> dict[str, str | None]:
    """The versions `/status` shows: vault_runner, python and the packages runs depend on."""
    found: dict[str, str | None] = {"vault_runner": __version__, "python": platform.python_version()}
    for name in ("fastapi", "uvicorn", "jupyter_client", "ipykernel", "torch"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _sandbox_info() -> dict[str, Any] | None:
    try:
        from vault_runner.engine.machine import sandbox_tier  # the sandbox costs an import: on first use

        return sandbox_tier()
    except Exception as exc:  # a sandbox that cannot be probed is a status line, not a failure
        return {"tier": None, "reason": str(exc)}


def _gpus() -> list[str]:
    try:
        from vault_runner.engine.machine import gpus

        return gpus()
    except Exception:
        return []


# -- the routes -------------------------------------------------------------------------------
_NOTES = ["notes"]
_RUN_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": RunResult, "description": "queued (`wait: false`)"},
    **ERROR_RESPONSES,
}


def _note_endpoint(name: str, model: type[Any], responses: dict[int | str, Any], summary: str, description: str) -> Any:
    """A POST endpoint on one note, in the `notes` group of the OpenAPI document."""
    return router.post(
        f"{API_PREFIX}/{name}",
        response_model=model,
        responses=responses,
        tags=_NOTES,
        summary=summary,
        description=description,
    )


@_note_endpoint(
    "run",
    RunResult,
    _RUN_RESPONSES,
    "Run a note",
    "Bring the note's outputs up to date in its warm kernel: the blocks whose code changed "
    "since they ran, and those after them (incremental; a note already current runs nothing). Runs of "
    "one note happen one after another; different notes run in parallel up to the kernel cap. Outputs "
    "are written into the note with the same compare-and-swap as the watcher: an edit made while it ran "
    "is never lost. The note must opt in (`not_opted_in`) and the vault be trusted (`vault_not_trusted`).",
)
async def run_note(body: RunRequest, request: Request) -> JSONResponse:
    state = _state(request)
    path, loaded = await run_in_threadpool(_prepare_run, state, body.note)
    future = state.runner.run_note(path)
    return await _submit_run(state, loaded.relative, future, body.wait)


@_note_endpoint(
    "run-block",
    RunResult,
    _RUN_RESPONSES,
    "Run one block",
    "Run one block, named by `index` (among the note's python blocks, from 0) or by a `line` "
    "inside it, in the note's warm kernel; blocks above it whose code changed since they ran run first. "
    "The block runs even when its output is current.",
)
async def run_block(body: BlockByIndex | BlockByLine, request: Request) -> JSONResponse:
    state = _state(request)
    path, loaded = await run_in_threadpool(_prepare_run, state, body.note)
    if isinstance(body, BlockByIndex):
        index = _block_index(loaded, body.index, None)
    else:
        index = _block_index(loaded, None, body.line)
    future = state.runner.run_block(path, index)
    return await _submit_run(state, loaded.relative, future, body.wait)


@_note_endpoint(
    "run-all",
    RunResult,
    _RUN_RESPONSES,
    "Restart and run all",
    "Shut the note's kernel down and run every block from the top in a fresh one: the "
    "ground truth, as `vault-runner render` gives it.",
)
async def run_all(body: RunRequest, request: Request) -> JSONResponse:
    state = _state(request)
    path, loaded = await run_in_threadpool(_prepare_run, state, body.note)
    future = state.runner.run_note(path, restart=True)
    return await _submit_run(state, loaded.relative, future, body.wait)


@_note_endpoint(
    "interrupt",
    InterruptResult,
    ERROR_RESPONSES,
    "Interrupt a note's run",
    "Interrupt the block running for the note (KeyboardInterrupt, as Jupyter's stop button) "
    "and skip the rest of that run. The interrupted block's output, with the KeyboardInterrupt, is "
    "written into the note. Queued runs of the note still run (use cancel to drop them).",
)
async def interrupt(body: NoteRequest, request: Request) -> InterruptResult:
    note, done = await _call_on_note(request, body.note, Runner.interrupt)
    return InterruptResult(note=note, interrupted=done)


@_note_endpoint(
    "restart",
    RestartResult,
    ERROR_RESPONSES,
    "Restart a note's kernel",
    "Stop what runs for the note and shut its kernel down; its next run starts in a fresh "
    "kernel from the top. Answers once the kernel is down.",
)
async def restart(body: NoteRequest, request: Request) -> RestartResult:
    state, path = await named_note(request, body.note)
    result = await _await(state.runner.restart(path))
    if result is _CANCELLED and state.runner.status().get("closed"):
        raise ApiError("shutting_down", "vault-runner is shutting down")
    return RestartResult(note=state.runner.vault.relative(path), restarted=result is not _CANCELLED)


@_note_endpoint(
    "cancel",
    CancelResult,
    ERROR_RESPONSES,
    "Cancel a note's queued runs",
    "Drop the note's queued runs (their requests answer `cancelled`) and the blocks of its "
    "current run that have not started; the block running now finishes (interrupt stops it).",
)
async def cancel(body: NoteRequest, request: Request) -> CancelResult:
    note, done = await _call_on_note(request, body.note, Runner.cancel)
    return CancelResult(note=note, cancelled=done)


@router.get(
    f"{API_PREFIX}/results",
    response_model=NoteResults,
    response_model_exclude_unset=True,
    responses=ERROR_RESPONSES,
    tags=_NOTES,
    summary="A note's current results",
    description="The report of the note's last run in this server (per block: status, duration, device, "
    "outputs with MIME types and text, attachment paths: the shapes of `vault-runner render --json`), "
    "or, before any run, what the note's output regions say. Runs nothing.",
)
async def results(
    request: Request,
    note: str = Query(
        ..., min_length=4, max_length=1024, pattern=NOTE_PATTERN, description="the note's path inside the vault"
    ),
) -> NoteResults:
    state = _state(request)
    vault: Vault = state.runner.vault
    hub: EventHub = state.hub
    path = await run_in_threadpool(_resolve, vault, note)
    loaded = await run_in_threadpool(_load, vault, path)
    last = hub.last_report(loaded.relative)
    source: Literal["last-run", "note"] = "last-run" if last is not None else "note"
    report = last if last is not None else _report_from_note(loaded)
    return NoteResults(
        note=loaded.relative,
        source=source,
        up_to_date=bool(loaded.plan) and loaded.is_current(),
        opted_in=loaded.opted_in,
        report=report,  # type: ignore[arg-type]
    )


@router.get(
    f"{API_PREFIX}/status",
    response_model=Status,
    responses=ERROR_RESPONSES,
    tags=["server"],
    summary="Server status",
    description="Queue, running notes, kernels, devices, sandbox tier and versions.",
)
async def status(request: Request) -> Status:
    state = _state(request)
    runner: Runner = state.runner
    hub: EventHub = state.hub
    snapshot = runner.status()
    sandbox = await run_in_threadpool(_sandbox_info)  # probed once per process
    gpus = await run_in_threadpool(_gpus)
    notes = snapshot.get("notes", [])
    return Status(
        vault=str(runner.vault.root),
        trusted=await run_in_threadpool(is_trusted, runner.vault.root),
        watching=bool(state.watching),
        queued=[n["note"] for n in notes if n.get("state") == "queued"],
        running=[{"note": n["note"], "block": n.get("block")} for n in notes if n.get("state") == "running"],
        notes=notes,
        kernels=snapshot.get("pool", {}),
        devices={"gpus": gpus, "notes": hub.devices()},
        sandbox=sandbox,
        versions=state.versions,
        streams=hub.count(),
        refused=dict(state.security.refusals) if state.security is not None else {},
    )


@router.get(
    f"{API_PREFIX}/events",
    responses={
        200: {
            "description": "A Server-Sent Events stream (text/event-stream). Each event's `event:` is its "
            "kind and `data:` a JSON object {id, time, kind, note, index, line, data}. Kinds: `ready` "
            "(first, once), `note-started`, `block-started`, `output` (data: one output, as it arrives, "
            "while the block still runs), `block-finished` (data: status, duration), `note-written`, "
            "`note-finished` (data: status, written, delegated, report), `regions` (only with `client`, for a note "
            "that client holds open: data {run, force, updates: [{index, code, code_hash, region}]}, applied by "
            "the plugin instead of a write), `superseded`, `kernel-*`, `log`, "
            "`overflow` (a slow client missed events), `closing` (server shutting down). A comment line "
            "is sent every 15 s to keep the connection open.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **ERROR_RESPONSES,
    },
    tags=["server"],
    summary="Live event stream",
    description="Server-Sent Events of every run (or of one note, with `note`): block started, output "
    "(partial output while a long block runs), block finished, note written.",
)
async def events(
    request: Request,
    note: str | None = Query(
        None,
        min_length=4,
        max_length=1024,
        pattern=NOTE_PATTERN,
        description="only this note's events (path inside the vault)",
    ),
    client: str | None = Query(
        None,
        pattern=CLIENT_PATTERN,
        description="the plugin instance's id (as in POST /api/v1/editors): this stream also gets the `regions` "
        "events of the notes that client holds open, and keeps its set of open notes alive",
    ),
) -> StreamingResponse:
    state = _state(request)
    hub: EventHub = state.hub
    relative = None
    if note is not None:
        path = await run_in_threadpool(_resolve, state.runner.vault, note, False)
        relative = state.runner.vault.relative(path)
    stream = hub.open(relative, client)
    return StreamingResponse(
        event_stream(hub, stream, state.heartbeat),
        media_type="text/event-stream",
        headers={"X-Accel-Buffering": "no"},
    )
