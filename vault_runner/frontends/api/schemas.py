"""The JSON shapes of the API (pydantic models), as the OpenAPI document shows them.

The report shapes (`BlockResult`, `NoteResult`) are derived from the report dataclasses of
vault_runner.model, field by field and in their order, leaving out the internal fields
(such as `reason`): a field added to a report shows in the API's schema. What the
dataclass cannot say (a description, `outputs` as `Output` objects) is given per field
here, and a hint for a field the report does not have is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from vault_runner.frontends.api.codes import CODES, ERROR_CODES
from vault_runner.model import BlockReport, NoteReport

__all__ = (
    "ERROR_RESPONSES",
    "NOTE_PATTERN",
    "BlockByIndex",
    "BlockByLine",
    "BlockResult",
    "CLIENT_PATTERN",
    "CancelResult",
    "EditorsRequest",
    "EditorsResult",
    "ErrorBody",
    "ErrorCode",
    "ErrorResponse",
    "IgnoredNote",
    "InterruptResult",
    "NoteRequest",
    "NoteResult",
    "NoteResults",
    "Output",
    "RegionsAppliedRequest",
    "RegionsAppliedResult",
    "RestartResult",
    "RunRequest",
    "RunResult",
    "Status",
)

# Every code of the table, in its order (the OpenAPI enum).
ErrorCode = Literal[tuple(CODES)]  # type: ignore[valid-type]

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
    """One output of a block (README, "JSON report"): stream text, a result or display, an error."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="stream | execute_result | display_data | error")
    name: str | None = Field(default=None, description="stdout or stderr, for streams")
    text: str | None = Field(default=None, description="stream text, or the text/plain of a result")
    mime: list[str] | None = Field(default=None, description="MIME types of a result or display")
    ename: str | None = None
    evalue: str | None = None


def _from_report(report: type, name: str, doc: str, hints: dict[str, dict[str, Any]]) -> type[BaseModel]:
    """A model with the public fields of the `report` dataclass; `hints[field]` adds to a field.

    A hint may give `annotation` (the type in the API), `default`, and any `Field` argument.
    """
    types = get_type_hints(report)
    public = [f for f in dataclasses.fields(report) if not f.metadata.get("internal")]
    unknown = set(hints) - {f.name for f in public}
    if unknown:
        raise TypeError(f"{name}: hints for fields {report.__name__} does not have: {sorted(unknown)}")
    definitions: dict[str, Any] = {}
    for item in public:
        extra = dict(hints.get(item.name, {}))
        annotation = extra.pop("annotation", types[item.name])
        if "default" not in extra:
            if item.default is not dataclasses.MISSING:
                extra["default"] = item.default
            elif item.default_factory is not dataclasses.MISSING:
                extra["default_factory"] = item.default_factory
        definitions[item.name] = (annotation, Field(**extra))
    model: type[BaseModel] = create_model(  # type: ignore[call-overload]
        name, __config__=ConfigDict(extra="allow"), __doc__=doc, __module__=__name__, **definitions
    )
    return model


BlockResult = _from_report(
    BlockReport,
    "BlockResult",
    "engine.BlockReport.to_json(): one block of a run.",
    {
        "index": {"description": "index among the note's python blocks, from 0"},
        "line": {"description": "line of the block's opening fence, from 1"},
        "label": {"default": None},
        "status": {
            "description": "ok | raised | error | timeout | dead | skipped | not-run | current | stale | "
            "hand-edited | unwritten"
        },
        "outputs": {"annotation": list[Output]},
        "attachments": {"description": "attachment files, relative to the vault"},
    },
)

NoteResult = _from_report(
    NoteReport,
    "NoteResult",
    "engine.NoteReport.to_json(): the same shape as `vault-runner render --json`.",
    {
        "status": {"description": "ran | current | stale | not-opted-in | no-blocks | refused | failed"},
        "blocks": {"annotation": list[BlockResult]},  # type: ignore[valid-type]
    },
)


class RunResult(BaseModel):
    note: str
    state: Literal["finished", "queued"]
    report: NoteResult | None = Field(  # type: ignore[valid-type]
        default=None, description="the run's report, when `state` is finished"
    )
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
    report: NoteResult  # type: ignore[valid-type]


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


# -- the editor extensions (obsidian-plugin/PROTOCOL.md) ---------------------------------------
CLIENT_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
_CLIENT_FIELD = Field(
    pattern=CLIENT_PATTERN,
    description="The plugin instance's random id (8 to 64 of `A-Z a-z 0-9 _ -`), also sent as `?client=` "
    "on its event stream.",
    examples=["3f9a0c1b2d4e5f60718293a4"],
)


class EditorsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    client: str = _CLIENT_FIELD
    open: list[Annotated[str, Field(max_length=1024)]] = Field(
        max_length=1000,
        description="Every note this client holds open in an editor (vault-relative, `/`): the whole set, "
        "not a change. `[]` when the plugin unloads.",
    )


class IgnoredNote(BaseModel):
    note: str
    code: ErrorCode = Field(description="why it was refused, as for any request naming it")


class EditorsResult(BaseModel):
    client: str
    open: list[str] = Field(description="the notes accepted, named as events name them")
    ignored: list[IgnoredNote] = Field(description="the paths refused, with their code")


class RegionsAppliedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    client: str = _CLIENT_FIELD
    note: str = _NOTE_FIELD
    run: str = Field(min_length=1, max_length=64, description="the `run` of the `regions` event")
    via: Literal["editor", "file", "none"] = Field(
        description="editor: written into the open editor; file: with Vault.process; none: nothing written"
    )
    applied: list[_Whole] = Field(default_factory=list, max_length=10_000, description="blocks written or removed")
    unwritten: list[_Whole] = Field(default_factory=list, max_length=10_000, description="their code changed")
    hand_edited: list[_Whole] = Field(default_factory=list, max_length=10_000, description="left alone: edited by hand")
    problem: str | None = Field(default=None, max_length=2000, description="why nothing could be written")


class RegionsAppliedResult(BaseModel):
    note: str
    run: str
    accepted: bool = Field(description="false for an unknown or already acknowledged run")


# The documented error answers of every route: each client-error status (and 503), with its codes.
_ERROR_STATUSES = sorted({status for status in ERROR_CODES.values() if status < 500} | {503})
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": ", ".join(c for c, s in ERROR_CODES.items() if s == status)}
    for status in _ERROR_STATUSES
}
