"""The API's error codes, in one table, and what a finished run's report says went wrong.

Every code the API can answer with is a row of CODES: the HTTP status of a request that
fails with it (None: it only appears in a finished run's `error`, the request answers 200)
and whether a finished run's `error` may carry it. A plugin may switch on these codes, so
they are stable. The OpenAPI enum, the exception handlers, the security middleware and the
documented responses are all read from this table.

`run_error` decides a finished run's `error` from the report object and its stable
`status`/`reason` codes, never from message text (messages are for the note-taker and may
be reworded).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from vault_runner.errors import ApiError
from vault_runner.model import BlockReport, NoteReport

__all__ = (
    "CODES",
    "ERROR_CODES",
    "RUN_ERROR_CODES",
    "Code",
    "error_json",
    "http_status",
    "run_error",
)


class Code(NamedTuple):
    status: int | None  # HTTP status of a request refused with this code; None: only in a run's result
    in_run: bool = False  # a finished run's `error` (HTTP 200) may carry it


CODES: dict[str, Code] = {
    "invalid_path": Code(400),
    "unauthorized": Code(401),
    "forbidden_host": Code(403),
    "forbidden_origin": Code(403),
    "vault_not_trusted": Code(403),
    "not_opted_in": Code(403),
    "unknown_note": Code(404),
    "unknown_block": Code(404),
    "not_found": Code(404),
    "method_not_allowed": Code(405),
    "cancelled": Code(409, in_run=True),
    "payload_too_large": Code(413),
    "unsupported_media_type": Code(415),
    "invalid_request": Code(422),
    "invalid_note": Code(422),
    "too_many_streams": Code(429),
    "internal_error": Code(500),
    "shutting_down": Code(503),
    # In a run's result (HTTP 200): what went wrong while the note ran.
    "kernel_died": Code(None, in_run=True),
    "timeout": Code(None, in_run=True),
    "interrupted": Code(None, in_run=True),
    "conflict": Code(None, in_run=True),
    "run_failed": Code(None, in_run=True),
    "block_error": Code(None, in_run=True),
    "hand_edited": Code(None, in_run=True),
}

# Views of the table: code -> HTTP status, and the codes of a run's result.
ERROR_CODES: dict[str, int] = {code: row.status for code, row in CODES.items() if row.status is not None}
RUN_ERROR_CODES: tuple[str, ...] = tuple(code for code, row in CODES.items() if row.in_run)


def http_status(code: str) -> int:
    """The HTTP status of a request that fails with `code`; ValueError for a code that is not one."""
    row = CODES.get(code)
    if row is None or row.status is None:
        raise ValueError(f"{code!r} is not an API error code of a refused request (see codes.CODES)")
    return row.status


def error_json(code: str, message: str) -> dict[str, Any]:
    """The body of every error answer: `{"error": {"code": ..., "message": ...}}`."""
    return {"error": {"code": code, "message": message}}


def _interrupted(block: BlockReport) -> bool:
    """The block's last error output is a KeyboardInterrupt (structured output, not message text)."""
    errors = [o for o in block.outputs if o.get("type") == "error"]
    return bool(errors) and errors[-1].get("ename") == "KeyboardInterrupt"


def run_error(report: NoteReport) -> ApiError | None:
    """The one problem of a finished run a plugin should show, most serious first; None if it went well."""
    note = report.note
    blocks = report.blocks

    def first(status: str) -> BlockReport | None:
        return next((b for b in blocks if b.status == status), None)

    if (block := first("dead")) is not None:
        return ApiError(
            "kernel_died",
            f"{note}:{block.line}: the kernel died while this block ran (a crash, or out of memory); "
            "fix the block and run the note again",
        )
    if (block := first("timeout")) is not None:
        return ApiError(
            "timeout",
            f"{note}:{block.line}: {block.message or 'timed out'}; make the block faster "
            "or raise its `#| timeout:` option",
        )
    for block in blocks:
        if block.status == "error" and _interrupted(block):
            return ApiError(
                "interrupted",
                f"{note}:{block.line}: interrupted (KeyboardInterrupt); the blocks after it did not run",
            )
    if report.status == "failed":
        message = report.message or f"{note}: the run failed"
        return ApiError("conflict" if report.reason == "write_conflict" else "run_failed", message)
    if (block := first("error")) is not None:
        errors = [o for o in block.outputs if o.get("type") == "error"]
        what = f"{errors[0].get('ename')}: {errors[0].get('evalue')}" if errors else (block.message or "error")
        return ApiError("block_error", f"{note}:{block.line}: {what}")
    if (block := first("hand-edited")) is not None:
        return ApiError("hand_edited", block.message or f"{note}: an output region was edited")
    for block in blocks:
        if block.status != "skipped":
            continue
        if _interrupted(block) or block.reason == "cancelled":
            return ApiError(
                "cancelled",
                f"{note}:{block.line}: the run was cancelled (or vault-runner stopped) before this "
                "block finished; run the note again",
            )
        if block.reason == "superseded":
            return ApiError(
                "conflict",
                f"{note}:{block.line}: the note was saved with new code while it ran; it runs again",
            )
    if (block := first("unwritten")) is not None:
        return ApiError(
            "conflict",
            f"{note}:{block.line}: the block's code changed while it ran, so its output was not written; run it again",
        )
    return None
