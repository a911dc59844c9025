"""The values every layer passes around: block and note reports, events, their statuses.

Statuses are closed sets (`Literal`), and which of them count as a failure is decided here
once; the CLI, the reports, the API and the pytest plugin all ask these sets.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

__all__ = (
    "BLOCK_FAILED",
    "BlockReport",
    "BlockStatus",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Event",
    "EventKind",
    "EventSink",
    "NOTE_FAILED",
    "NoteReport",
    "NoteStatus",
    "TEST_FAILED",
)

BlockStatus = Literal[
    "ok", "raised", "error", "timeout", "dead", "skipped", "not-run", "hand-edited", "unwritten", "mismatch"
]
NoteStatus = Literal["ran", "current", "not-opted-in", "no-blocks", "refused", "failed"]
EventKind = str  # note-started | block-started | output | block-finished | note-written | note-finished | ...

# A block in one of these did not do what the note says; `skipped` is not one: the block that
# caused the skip (an error with `error: false`, a restarted kernel) already fails.
BLOCK_FAILED: frozenset[str] = frozenset({"error", "timeout", "dead", "hand-edited"})
# `test` also fails a block whose fresh outputs differ from the stored ones.
TEST_FAILED: frozenset[str] = BLOCK_FAILED | {"mismatch"}
NOTE_FAILED: frozenset[str] = frozenset({"refused", "failed"})

# Exit codes of every command: 0 all good, 1 a note or block failed, 2 usage or bad input.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_INTERNAL = {"internal": True}
# Not in the API's schema (the API runs notes on its own machine), but in `--json` when set.
_WHEN_SET = {"internal": True, "when_set": True}


@dataclass
class Event:
    kind: EventKind
    note: str
    index: int | None = None
    line: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self, seq: int | None = None) -> dict[str, Any]:
        """`{id, time, kind, note, index, line, data}` (`id` only when numbered), as the CLI's
        `--json` lines and the API's event stream show it."""
        found: dict[str, Any] = {} if seq is None else {"id": seq}
        found.update(
            {
                "time": round(time.time(), 3),
                "kind": self.kind,
                "note": self.note,
                "index": self.index,
                "line": self.line,
                "data": self.data,
            }
        )
        return found


EventSink = Callable[[Event], None]


@dataclass
class BlockReport:
    note: str
    index: int
    line: int
    first_line: str
    label: str | None
    status: str  # a BlockStatus
    duration: float = 0.0
    device: str | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[str] = field(default_factory=list)
    message: str | None = None
    gpu_peak_bytes: int | None = None  # on CUDA: torch.cuda.max_memory_allocated() during the block
    # Why it was skipped or failed, as a stable code (superseded, interrupted, cancelled, ...):
    # what callers branch on. Not in the JSON report, whose shape is a contract.
    reason: str | None = field(default=None, metadata=_INTERNAL)

    @property
    def failed(self) -> bool:
        return self.status in BLOCK_FAILED


@dataclass
class NoteReport:
    note: str
    status: str  # a NoteStatus
    written: bool = False
    duration: float = 0.0
    device: str | None = None
    blocks: list[BlockReport] = field(default_factory=list)
    message: str | None = None
    warnings: list[str] = field(default_factory=list)
    reason: str | None = field(default=None, metadata=_INTERNAL)  # e.g. write_conflict; see BlockReport
    # How the note's kernel was made: forked from a warm template, or started (kernel/fork).
    kernel: Literal["forked", "started"] | None = None
    node: str | None = field(default=None, metadata=_WHEN_SET)  # the Ray node it ran on (--executor ray)

    @property
    def failed(self) -> bool:
        return self.status in NOTE_FAILED or any(b.failed for b in self.blocks)

    def to_json(self) -> dict[str, Any]:
        return _public(self)


def _public(value: Any) -> Any:
    """asdict without the internal fields (but with those shown when set, and set)."""
    if hasattr(value, "__dataclass_fields__"):
        return {
            f.name: _public(getattr(value, f.name))
            for f in fields(value)
            if not f.metadata.get("internal") or (f.metadata.get("when_set") and getattr(value, f.name) is not None)
        }
    if isinstance(value, list):
        return [_public(item) for item in value]
    if isinstance(value, dict):
        return {key: _public(item) for key, item in value.items()}
    return copy.deepcopy(value)
