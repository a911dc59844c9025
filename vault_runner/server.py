"""The localhost API an Obsidian plugin drives: run notes and blocks, stop them, watch them run.

A front end only: each endpoint turns a request into a call of the shared `Runner`
(session.py), which serialises the runs of one note, runs different notes in parallel up
to its kernel cap, and gives API runs the same compare-and-swap write-back as the
watcher. Security (token, Host and Origin checks, JSON-only bodies, note paths kept
inside the vault) is api_security.py; every request passes it before reaching a route.

Errors are JSON `{"error": {"code": ..., "message": ...}}` with a stable code (ERROR_CODES)
and a one-line message a plugin can show as it is. A run that was served but did not go
well (a block raised, timed out, the kernel died, the note changed under it) is not an
HTTP error: its result carries the report and an `error` with one of RUN_ERROR_CODES.

`python -m vault_runner.server` prints the OpenAPI document (docs/openapi.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import platform
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .api_security import PathRefused, SecurityMiddleware, resolve_note
from .engine import BlockReport, Event, Loaded, NoteReport, block_report, load
from .session import Runner
from .trust import is_trusted, untrusted_message
from .vault import Vault, VaultError

API_PREFIX = "/api/v1"
HEARTBEAT_SECONDS = 15.0
MAX_STREAMS = 32
STREAM_QUEUE = 10_000

# code -> HTTP status. Stable: a plugin may switch on them.
ERROR_CODES: dict[str, int] = {
    "invalid_path": 400,
    "unauthorized": 401,
    "forbidden_host": 403,
    "forbidden_origin": 403,
    "vault_not_trusted": 403,
    "not_opted_in": 403,
    "unknown_note": 404,
    "unknown_block": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "cancelled": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_request": 422,
    "invalid_note": 422,
    "too_many_streams": 429,
    "internal_error": 500,
    "shutting_down": 503,
}
# In a run's result (HTTP 200): what went wrong while the note ran.
RUN_ERROR_CODES = (
    "kernel_died",
    "timeout",
    "interrupted",
    "conflict",
    "run_failed",
    "block_error",
    "hand_edited",
    "cancelled",
)

ErrorCode = Literal[
    "invalid_path",
    "unauthorized",
    "forbidden_host",
    "forbidden_origin",
    "vault_not_trusted",
    "not_opted_in",
    "unknown_note",
    "unknown_block",
    "not_found",
    "method_not_allowed",
    "cancelled",
    "payload_too_large",
    "unsupported_media_type",
    "invalid_request",
    "invalid_note",
    "too_many_streams",
    "internal_error",
    "shutting_down",
    "kernel_died",
    "timeout",
    "interrupted",
    "conflict",
    "run_failed",
    "block_error",
    "hand_edited",
]


class ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = ERROR_CODES.get(code, 400)


# -- the JSON shapes (OpenAPI) ------------------------------------------------------------
# What the schema can say of a note path: `/`-separated parts, none empty or starting with
# `.` (so no `..`, no hidden folder, not absolute), no `\\` or `:` (Obsidian allows
# neither in names), ending in `.md`. resolve_note checks it all again, plus what depends
# on the vault: links out of it, Obsidian's excluded folders (400 `invalid_path`).
_PART = r"[^/\\.:\x00-\x1f][^/\\:\x00-\x1f]*"
NOTE_PATTERN = rf"^(?:{_PART}/)*{_PART}\.[mM][dD]$"
_NOTE_FIELD = Field(
    min_length=4,
    max_length=1024,
    pattern=NOTE_PATTERN,
    description="The note's path inside the vault, with `/` (as Obsidian shows it: `Folder/Note.md`). "
    "Absolute paths, `..` and links that lead out of the vault are refused (`invalid_path`).",
    examples=["PyTorch/01 Tensores.md"],
)
_WAIT_FIELD = Field(
    default=True,
    description="true: answer when the run has finished, with its report. false: answer at once "
    "(202, state `queued`) and follow the run on the event stream.",
)


class ErrorBody(BaseModel):
    code: ErrorCode = Field(description="Stable machine-readable code.")
    message: str = Field(description="One line a plugin can show to the note-taker as it is.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class NoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    note: str = _NOTE_FIELD


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    note: str = _NOTE_FIELD
    wait: bool = _WAIT_FIELD


def _whole_number(value: Any) -> Any:
    # JSON has one number type: 3.0 is the integer 3 (as JSON Schema says); 3.5 is refused.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_Whole = Annotated[int, BeforeValidator(_whole_number)]


class BlockByIndex(BaseModel):
    """A block named by its index."""

    model_config = ConfigDict(extra="forbid", strict=True)
    note: str = _NOTE_FIELD
    index: _Whole = Field(ge=0, le=1_000_000, description="The block's index among the note's python blocks, from 0.")
    wait: bool = _WAIT_FIELD


class BlockByLine(BaseModel):
    """A block named by a line of the note."""

    model_config = ConfigDict(extra="forbid", strict=True)
    note: str = _NOTE_FIELD
    line: _Whole = Field(
        ge=1,
        le=100_000_000,
        description="A line of the note (from 1) inside the block, its fences or its output region.",
    )
    wait: bool = _WAIT_FIELD


class Output(BaseModel):
    """One output of a block (DESIGN.md contract 8): stream text, a result or display, an error."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="stream | execute_result | display_data | error")
    name: str | None = Field(default=None, description="stdout or stderr, for streams")
    text: str | None = Field(default=None, description="stream text, or the text/plain of a result")
    mime: list[str] | None = Field(default=None, description="MIME types of a result or display")
    ename: str | None = None
    evalue: str | None = None


class BlockResult(BaseModel):
    """engine.BlockReport.to_json(): one block of a run."""

    model_config = ConfigDict(extra="allow")
    note: str
    index: int = Field(description="index among the note's python blocks, from 0")
    line: int = Field(description="line of the block's opening fence, from 1")
    first_line: str
    label: str | None = None
    status: str = Field(
        description="ok | raised | error | timeout | dead | skipped | not-run | current | stale | "
        "hand-edited | unwritten"
    )
    duration: float = 0.0
    device: str | None = None
    outputs: list[Output] = Field(default_factory=list)
    attachments: list[str] = Field(default_factory=list, description="attachment files, relative to the vault")
    message: str | None = None
    gpu_peak_bytes: int | None = None


class NoteResult(BaseModel):
    """engine.NoteReport.to_json(): the same shape as `vault-runner render --json`."""

    model_config = ConfigDict(extra="allow")
    note: str
    status: str = Field(description="ran | current | stale | not-opted-in | no-blocks | refused | failed")
    written: bool = False
    duration: float = 0.0
    device: str | None = None
    blocks: list[BlockResult] = Field(default_factory=list)
    message: str | None = None
    warnings: list[str] = Field(default_factory=list)


class RunResult(BaseModel):
    note: str
    state: Literal["finished", "queued"]
    report: NoteResult | None = Field(default=None, description="the run's report, when `state` is finished")
    error: ErrorBody | None = Field(
        default=None,
        description="set when the run did not go as expected; code: block_error (a block raised), timeout, "
        "interrupted, cancelled, kernel_died, conflict (the note changed under the run; some outputs were not "
        "written), hand_edited (an output region edited by hand was left alone), run_failed. The outputs are "
        "in the note and in `report`",
    )


class InterruptResult(BaseModel):
    note: str
    interrupted: bool = Field(description="false when nothing was running for this note")


class CancelResult(BaseModel):
    note: str
    cancelled: bool = Field(description="false when nothing was queued or left to skip for this note")


class RestartResult(BaseModel):
    note: str
    restarted: bool = Field(description="the note's kernel is shut down; its next run starts fresh from the top")


class NoteResults(BaseModel):
    note: str
    source: Literal["last-run", "note"] = Field(
        description="last-run: the report of the note's last run in this server; note: read from the note's "
        "output regions (no run yet), blocks are `current`, `stale`, `hand-edited` or `not-run`"
    )
    up_to_date: bool = Field(description="every block's output region matches its code as the note is now")
    opted_in: bool
    report: NoteResult


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")
    vault: str
    trusted: bool
    watching: bool
    queued: list[str] = Field(description="notes with a run waiting")
    running: list[dict[str, Any]] = Field(description="notes running now, with the block running")
    notes: list[dict[str, Any]] = Field(description="every note with a session (kernel, queue)")
    kernels: dict[str, Any] = Field(description="the kernel pool: cap, started, warm spares, assigned")
    devices: dict[str, Any] = Field(description="GPUs visible to kernels, and each note's device")
    sandbox: dict[str, Any] | None = Field(description="the sandbox tier kernels start in")
    versions: dict[str, str | None]
    streams: int = Field(description="open event streams")
    refused: dict[str, int] = Field(description="requests refused by the security checks, by error code")


_ERROR_STATUSES = sorted({status for status in ERROR_CODES.values() if status < 500} | {503})
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": ", ".join(c for c, s in ERROR_CODES.items() if s == status)}
    for status in _ERROR_STATUSES
}


# -- events ---------------------------------------------------------------------------------
def event_json(event: Event, seq: int) -> dict[str, Any]:
    return {
        "id": seq,
        "time": round(time.time(), 3),
        "kind": event.kind,
        "note": event.note,
        "index": event.index,
        "line": event.line,
        "data": event.data,
    }


class _Stream:
    """One client's event stream: an asyncio queue fed from the runner's threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, note: str | None) -> None:
        self.loop = loop
        self.note = note
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(STREAM_QUEUE)
        self.dropped = 0

    def push(self, item: dict[str, Any] | None) -> None:  # any thread
        if item is not None and self.note is not None and item["note"] != self.note:
            return
        try:
            self.loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:
            pass  # the loop is closed: the stream is gone

    def _put(self, item: dict[str, Any] | None) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            if item is None:  # the end must get through: make room for it
                self.queue.get_nowait()
                self.queue.put_nowait(None)
            else:
                self.dropped += 1  # a slow client loses events, never the server's memory


class EventHub:
    """Subscribed to the runner once: fans events out to streams, remembers each note's last report."""

    def __init__(self, runner: Runner, max_streams: int = MAX_STREAMS) -> None:
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()
        self._seq = itertools.count(1)
        self._closed = False
        self.reports: dict[str, dict[str, Any]] = {}
        self.devices: dict[str, str] = {}
        self._unsubscribe = runner.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:  # the runner's threads: be quick
        if event.kind == "note-finished":
            report = event.data.get("report")
            if isinstance(report, dict):
                with self._lock:
                    self.reports[event.note] = report
                    if report.get("device"):
                        self.devices[event.note] = str(report["device"])
        with self._lock:
            item = event_json(event, next(self._seq))
            streams = list(self._streams)
        for stream in streams:
            stream.push(item)

    def open(self, note: str | None) -> _Stream:
        stream = _Stream(asyncio.get_running_loop(), note)
        with self._lock:
            if self._closed:
                raise ApiError("shutting_down", "vault-runner is shutting down; start it again")
            if len(self._streams) >= self.max_streams:
                raise ApiError(
                    "too_many_streams",
                    f"{self.max_streams} event streams are open already; close one (reload the plugin) and retry",
                )
            self._streams.add(stream)
        return stream

    def remove(self, stream: _Stream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def count(self) -> int:
        with self._lock:
            return len(self._streams)

    def close(self) -> None:
        """End every stream (shutdown) and stop listening to the runner."""
        self._unsubscribe()
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for stream in streams:
            stream.push(None)


def _sse(kind: str, data: dict[str, Any], seq: int | None = None) -> str:
    lines = [f"id: {seq}"] if seq is not None else []
    lines.append(f"event: {kind}")
    payload = json.dumps(data, ensure_ascii=False, default=str)
    lines.extend(f"data: {part}" for part in payload.split("\n"))  # json.dumps has no newline, but be safe
    return "\n".join(lines) + "\n\n"


async def _event_stream(hub: EventHub, stream: _Stream, heartbeat: float) -> AsyncIterator[str]:
    try:
        yield _sse("ready", {"note": stream.note, "time": round(time.time(), 3)})
        while True:
            try:
                item = await asyncio.wait_for(stream.queue.get(), heartbeat)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"  # also how a vanished client is noticed
                continue
            if stream.dropped:
                dropped, stream.dropped = stream.dropped, 0
                yield _sse("overflow", {"dropped": dropped, "message": f"{dropped} event(s) were dropped"})
            if item is None:
                yield _sse("closing", {"message": "vault-runner is shutting down"})
                return
            yield _sse(item["kind"], item, item["id"])
    finally:
        hub.remove(stream)


# -- helpers for the routes -------------------------------------------------------------------
def _state(request: Request) -> Any:
    return request.app.state


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


_CANCELLED = object()


def _run_error(report: dict[str, Any]) -> dict[str, str] | None:
    """The one problem of a finished run a plugin should show, most serious first."""
    note = report.get("note", "")
    blocks = report.get("blocks") or []

    def first(status: str) -> dict[str, Any] | None:
        return next((b for b in blocks if b.get("status") == status), None)

    if (block := first("dead")) is not None:
        return {
            "code": "kernel_died",
            "message": f"{note}:{block['line']}: the kernel died while this block ran (a crash, or out of memory); "
            "fix the block and run the note again",
        }
    if (block := first("timeout")) is not None:
        return {
            "code": "timeout",
            "message": f"{note}:{block['line']}: {block.get('message') or 'timed out'}; make the block faster "
            "or raise its `#| timeout:` option",
        }
    for block in blocks:
        errors = [o for o in block.get("outputs") or [] if o.get("type") == "error"]
        if block.get("status") == "error" and errors and errors[-1].get("ename") == "KeyboardInterrupt":
            return {
                "code": "interrupted",
                "message": f"{note}:{block['line']}: interrupted (KeyboardInterrupt); the blocks after it did not run",
            }
    if report.get("status") == "failed":
        message = report.get("message") or f"{note}: the run failed"
        code = "conflict" if "kept changing" in message else "run_failed"
        return {"code": code, "message": message}
    if (block := first("error")) is not None:
        errors = [o for o in block.get("outputs") or [] if o.get("type") == "error"]
        what = f"{errors[0].get('ename')}: {errors[0].get('evalue')}" if errors else (block.get("message") or "error")
        return {"code": "block_error", "message": f"{note}:{block['line']}: {what}"}
    if (block := first("hand-edited")) is not None:
        return {"code": "hand_edited", "message": block.get("message") or f"{note}: an output region was edited"}
    for block in blocks:
        if block.get("status") != "skipped":
            continue
        errors = [o for o in block.get("outputs") or [] if o.get("type") == "error"]
        message = block.get("message") or ""
        if errors and errors[-1].get("ename") == "KeyboardInterrupt" or "cancelled" in message:
            return {
                "code": "cancelled",
                "message": f"{note}:{block['line']}: the run was cancelled (or vault-runner stopped) before this "
                "block finished; run the note again",
            }
        if "newer save" in message:
            return {
                "code": "conflict",
                "message": f"{note}:{block['line']}: the note was saved with new code while it ran; it runs again",
            }
    if (block := first("unwritten")) is not None:
        return {
            "code": "conflict",
            "message": f"{note}:{block['line']}: the block's code changed while it ran, so its output was not "
            "written; run it again",
        }
    return None


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
    report = result.to_json()
    if report["status"] == "refused":
        raise ApiError("invalid_note", report.get("message") or f"{relative}: the note cannot be run")
    error = _run_error(report)
    body = RunResult(note=relative, state="finished", report=report, error=error)  # type: ignore[arg-type]
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


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"vault_runner": __version__, "python": platform.python_version()}
    for name in ("fastapi", "uvicorn", "jupyter_client", "ipykernel", "torch"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _sandbox_info() -> dict[str, Any] | None:
    try:
        from .sandbox import probe

        found = probe()
        return {"tier": found.tier, "reason": found.reason}
    except Exception as exc:  # a sandbox that cannot be probed is a status line, not a failure
        return {"tier": None, "reason": str(exc)}


def _gpus() -> list[str]:
    try:
        from .sandbox import visible_gpus

        return visible_gpus()
    except Exception:
        return []


# -- the app ------------------------------------------------------------------------------
def _routes(app: FastAPI) -> None:
    tag = ["notes"]

    @app.post(
        f"{API_PREFIX}/run",
        response_model=RunResult,
        responses={202: {"model": RunResult, "description": "queued (`wait: false`)"}, **_ERRORS},
        tags=tag,
        summary="Run a note",
        description="Bring the note's outputs up to date in its warm kernel: the blocks whose code changed "
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

    @app.post(
        f"{API_PREFIX}/run-block",
        response_model=RunResult,
        responses={202: {"model": RunResult, "description": "queued (`wait: false`)"}, **_ERRORS},
        tags=tag,
        summary="Run one block",
        description="Run one block, named by `index` (among the note's python blocks, from 0) or by a `line` "
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

    @app.post(
        f"{API_PREFIX}/run-all",
        response_model=RunResult,
        responses={202: {"model": RunResult, "description": "queued (`wait: false`)"}, **_ERRORS},
        tags=tag,
        summary="Restart and run all",
        description="Shut the note's kernel down and run every block from the top in a fresh one: the "
        "ground truth, as `vault-runner render` gives it.",
    )
    async def run_all(body: RunRequest, request: Request) -> JSONResponse:
        state = _state(request)
        path, loaded = await run_in_threadpool(_prepare_run, state, body.note)
        future = state.runner.run_note(path, restart=True)
        return await _submit_run(state, loaded.relative, future, body.wait)

    @app.post(
        f"{API_PREFIX}/interrupt",
        response_model=InterruptResult,
        responses=_ERRORS,
        tags=tag,
        summary="Interrupt a note's run",
        description="Interrupt the block running for the note (KeyboardInterrupt, as Jupyter's stop button) "
        "and skip the rest of that run. The interrupted block's output, with the KeyboardInterrupt, is "
        "written into the note. Queued runs of the note still run (use cancel to drop them).",
    )
    async def interrupt(body: NoteRequest, request: Request) -> InterruptResult:
        state = _state(request)
        path = await run_in_threadpool(_resolve, state.runner.vault, body.note, False)
        done = await run_in_threadpool(state.runner.interrupt, path)
        return InterruptResult(note=state.runner.vault.relative(path), interrupted=bool(done))

    @app.post(
        f"{API_PREFIX}/restart",
        response_model=RestartResult,
        responses=_ERRORS,
        tags=tag,
        summary="Restart a note's kernel",
        description="Stop what runs for the note and shut its kernel down; its next run starts in a fresh "
        "kernel from the top. Answers once the kernel is down.",
    )
    async def restart(body: NoteRequest, request: Request) -> RestartResult:
        state = _state(request)
        path = await run_in_threadpool(_resolve, state.runner.vault, body.note, False)
        result = await _await(state.runner.restart(path))
        if result is _CANCELLED and state.runner.status().get("closed"):
            raise ApiError("shutting_down", "vault-runner is shutting down")
        return RestartResult(note=state.runner.vault.relative(path), restarted=result is not _CANCELLED)

    @app.post(
        f"{API_PREFIX}/cancel",
        response_model=CancelResult,
        responses=_ERRORS,
        tags=tag,
        summary="Cancel a note's queued runs",
        description="Drop the note's queued runs (their requests answer `cancelled`) and the blocks of its "
        "current run that have not started; the block running now finishes (interrupt stops it).",
    )
    async def cancel(body: NoteRequest, request: Request) -> CancelResult:
        state = _state(request)
        path = await run_in_threadpool(_resolve, state.runner.vault, body.note, False)
        done = await run_in_threadpool(state.runner.cancel, path)
        return CancelResult(note=state.runner.vault.relative(path), cancelled=bool(done))

    @app.get(
        f"{API_PREFIX}/results",
        response_model=NoteResults,
        response_model_exclude_unset=True,
        responses=_ERRORS,
        tags=tag,
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
        path = await run_in_threadpool(_resolve, vault, note)
        loaded = await run_in_threadpool(_load, vault, path)
        with state.hub._lock:
            last = state.hub.reports.get(loaded.relative)
        source: Literal["last-run", "note"] = "last-run" if last is not None else "note"
        report = last if last is not None else _report_from_note(loaded)
        return NoteResults(
            note=loaded.relative,
            source=source,
            up_to_date=bool(loaded.plan) and loaded.is_current(),
            opted_in=loaded.opted_in,
            report=report,  # type: ignore[arg-type]
        )

    @app.get(
        f"{API_PREFIX}/status",
        response_model=Status,
        responses=_ERRORS,
        tags=["server"],
        summary="Server status",
        description="Queue, running notes, kernels, devices, sandbox tier and versions.",
    )
    async def status(request: Request) -> Status:
        state = _state(request)
        runner: Runner = state.runner
        snapshot = runner.status()
        sandbox = await run_in_threadpool(_sandbox_info)  # probed once per process
        gpus = await run_in_threadpool(_gpus)
        notes = snapshot.get("notes", [])
        with state.hub._lock:
            devices = dict(state.hub.devices)
        return Status(
            vault=str(runner.vault.root),
            trusted=await run_in_threadpool(is_trusted, runner.vault.root),
            watching=bool(state.watching),
            queued=[n["note"] for n in notes if n.get("state") == "queued"],
            running=[{"note": n["note"], "block": n.get("block")} for n in notes if n.get("state") == "running"],
            notes=notes,
            kernels=snapshot.get("pool", {}),
            devices={"gpus": gpus, "notes": devices},
            sandbox=sandbox,
            versions=state.versions,
            streams=state.hub.count(),
            refused=dict(state.security.refusals) if state.security is not None else {},
        )

    @app.get(
        f"{API_PREFIX}/events",
        responses={
            200: {
                "description": "A Server-Sent Events stream (text/event-stream). Each event's `event:` is its "
                "kind and `data:` a JSON object {id, time, kind, note, index, line, data}. Kinds: `ready` "
                "(first, once), `note-started`, `block-started`, `output` (data: one output, as it arrives, "
                "while the block still runs), `block-finished` (data: status, duration), `note-written`, "
                "`note-finished` (data: status, written, report), `superseded`, `kernel-*`, `log`, "
                "`overflow` (a slow client missed events), `closing` (server shutting down). A comment line "
                "is sent every 15 s to keep the connection open.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **_ERRORS,
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
    ) -> StreamingResponse:
        state = _state(request)
        relative = None
        if note is not None:
            path = await run_in_threadpool(_resolve, state.runner.vault, note, False)
            relative = state.runner.vault.relative(path)
        stream = state.hub.open(relative)
        return StreamingResponse(
            _event_stream(state.hub, stream, state.heartbeat),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
        )


def _handlers(app: FastAPI) -> None:
    def reply(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": code, "message": message}}, status_code=ERROR_CODES[code], headers=headers
        )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return reply(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors()[:3]:
            where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query"))
            problems.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
        return reply("invalid_request", "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            return reply("method_not_allowed", f"{request.method} is not allowed here", headers)
        if exc.status_code == 404:
            return reply("not_found", f"{request.url.path}: there is no such endpoint; see /openapi.json", headers)
        return reply("invalid_request", str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return reply("internal_error", f"vault-runner failed on this request ({exc!r}); please report it")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with our error shape for 422 and the bearer scheme declared."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    spec = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses["422"] = {
                "description": "invalid_request, invalid_note",
                "content": {"application/json": {"schema": error_ref}},
            }
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    spec["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "The token in the file named by `token_file` in the server file "
            "(<config dir>/servers/<vault hash>.json).",
        }
    }
    spec["security"] = [{"bearer": []}]
    app.openapi_schema = spec
    return spec


_DESCRIPTION = (
    "The localhost API of `vault-runner serve VAULT`, for the Obsidian plugin. Bound to 127.0.0.1 only. "
    "Every request needs `Authorization: Bearer <token>`, a Host of `127.0.0.1:PORT`, `localhost:PORT` "
    "or `[::1]:PORT`, and, when it has an Origin, `app://obsidian.md` or an origin given with "
    '`--allow-origin`. Bodies are JSON (at most 64 KiB). Errors are `{"error": {"code", "message"}}`.'
)


def _make_app() -> FastAPI:
    app = FastAPI(
        title="vault-runner",
        version=__version__,
        description=_DESCRIPTION,
        docs_url=None,  # Swagger UI loads scripts from a CDN: not on a server that runs code
        redoc_url=None,
        openapi_tags=[
            {"name": "notes", "description": "run notes and blocks, stop them, read their results"},
            {"name": "server", "description": "status and the live event stream"},
        ],
    )
    app.router.redirect_slashes = False  # a redirect would only hand a refused request a second path
    _routes(app)
    _handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI document, as served at /openapi.json and committed as docs/openapi.json."""
    return _make_app().openapi()


class ApiApp:
    """The ASGI app `create_app` returns: the FastAPI routes behind the security middleware."""

    def __init__(self, fastapi: FastAPI, security: SecurityMiddleware) -> None:
        self.fastapi = fastapi
        self.security = security

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.security(scope, receive, send)

    def close(self) -> None:
        """End every event stream (before the server shuts down)."""
        self.fastapi.state.hub.close()


def create_app(
    runner: Runner,
    vault: Vault,
    token: str,
    allowed_origins: Iterable[str] = (),
    *,
    port: int | None = None,
    watching: bool = False,
    heartbeat: float = HEARTBEAT_SECONDS,
    max_streams: int = MAX_STREAMS,
) -> ApiApp:
    """The API for one vault and its runner, as an ASGI app.

    `port` pins the Host allow-list; without it, the port each request came in on is used
    (the socket's own port, never a header). `allowed_origins` adds to `app://obsidian.md`.
    """
    if vault.root != runner.vault.root:
        raise ValueError("the runner serves another vault")
    app = _make_app()
    app.state.runner = runner
    app.state.watching = watching
    app.state.heartbeat = heartbeat
    app.state.versions = _versions()
    app.state.hub = EventHub(runner, max_streams)
    json_routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
        if method in {"POST", "PUT", "PATCH", "DELETE"}
    }
    security = SecurityMiddleware(app, token=token, allowed_origins=allowed_origins, port=port, json_routes=json_routes)
    app.state.security = security
    return ApiApp(app, security)


# -- serving ----------------------------------------------------------------------------------
class ApiServer:
    """uvicorn on 127.0.0.1 in a background thread, on a socket bound here (`port=0`: a free one)."""

    def __init__(self, app: ApiApp, port: int = 0, host: str = "127.0.0.1") -> None:
        self.app = app
        # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto says
        # TCP; with 0, each response's body waits ~40 ms for a delayed ACK (Nagle).
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        def serve() -> None:
            try:
                self.server.run(sockets=[self.socket])
            except BaseException as exc:  # reported by start() or stop()
                self.error = exc

        self._thread = threading.Thread(target=serve, name="vault-runner-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start ({self.error or 'no reason given'})")
            time.sleep(0.01)

    def stop(self) -> None:
        self.app.close()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self.socket.close()

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(json.dumps(openapi_spec(), indent=2, ensure_ascii=False) + "\n")
