"""What `vault-runner check` finds. Pure: it executes nothing.

`check` executes nothing: every finding comes from the note's bytes. The opening marker of
a region records the chained hash of the code that produced it (DESIGN.md contract 2), so a
region is stale when that hash differs from the hash of the code now in the note; the end
marker records a checksum of the region, so a hand edit shows as a checksum mismatch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vault_runner.core import note as notes
from vault_runner.core.freshness import Freshness, advice, freshness, hand_edit_message, needs_output
from vault_runner.core.plan import PlannedBlock
from vault_runner.engine.loading import Loaded
from vault_runner.errors import shown_path  # noqa: F401  (the one path rule; callers import it from here too)

MISSING = "missing"
STALE = "stale"
HAND_EDITED = "hand-edited"
NOT_EVALUATED = "not-evaluated"
ORPHANED = "orphaned"
STRAY_MARKER = "stray-marker"

RENDER_HINT = advice(Freshness(runs=True, has_region=False, stale=False, hand_edited=False))
_REMOVE_HINT = advice(Freshness(runs=False, has_region=True, stale=False, hand_edited=False))
DIFF_PLACEHOLDER = "[vault-runner check: this output is made when `vault-runner render` runs the block]"


@dataclass(frozen=True)
class Finding:
    """One problem `check` reports: `path:line: message`."""

    path: str  # the note as shown to the user (relative to the working directory when inside it)
    note: str  # vault-relative path
    line: int  # the block's fence line, or the region's first line for a hand edit
    kind: str  # missing | stale | hand-edited | not-evaluated
    block_line: int  # the fence line of the block the finding is about
    message: str

    def one_line(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def find(loaded: Loaded, path: str | None = None) -> list[Finding]:
    """Every finding of one loaded note, in note order. Expects an opted-in note."""
    shown = path if path is not None else loaded.relative
    found: list[Finding] = []
    # Line of the first block above that is itself out of date: the cause of later staleness.
    first_cause: int | None = None
    # Hashes recorded by the regions above, nearest first: with chained hashes, a block is
    # unchanged itself when H(hash recorded above it, its code, its options) is what its
    # region recorded, even though the chain changed because of an earlier block.
    recorded_above: list[str] = []
    for planned in loaded.plan:
        block = planned.block
        region = block.region

        def add(kind: str, message: str, line: int = block.fence_line, block: notes.Block = block) -> None:
            found.append(Finding(shown, loaded.relative, line, kind, block.fence_line, message))

        if planned.code_hash is None:
            if region is not None:
                add(
                    NOT_EVALUATED,
                    f"this block has `eval: false` but still has an output region; {advice(freshness(planned))}",
                )
                first_cause = first_cause or block.fence_line
                recorded_above.insert(0, region.code_hash)
            continue
        if region is None:
            add(MISSING, f"this block has no output region; {RENDER_HINT}")
            first_cause = first_cause or block.fence_line
        else:
            if region.code_hash != planned.code_hash:
                # A stale region that was also edited by hand is left by a plain render: the
                # advice says what really updates it.
                hint = advice(freshness(planned))
                if _unchanged_itself(planned, region.code_hash, recorded_above):
                    cause = f"line {first_cause}" if first_cause else "a block above"
                    add(
                        STALE,
                        f"stale output: the code above it changed ({cause}) and this block's "
                        f"output depends on the blocks before it; {hint}",
                    )
                else:
                    add(STALE, f"stale output: this block's code or options changed since it ran; {hint}")
                    first_cause = first_cause or block.fence_line
            if region.hand_edited:
                add(HAND_EDITED, hand_edit_message(block.fence_line), line=region.first_line)
            recorded_above.insert(0, region.code_hash)
    for orphan in loaded.note.orphans:
        if orphan.hand_edited:
            message = (
                "an output region that follows no python block was edited by hand; it is left as it is: "
                "delete it yourself if you no longer need it"
            )
        else:
            message = f"an output region follows no python block (its block was deleted or moved); {_REMOVE_HINT}"
        found.append(Finding(shown, loaded.relative, orphan.first_line, ORPHANED, orphan.first_line, message))
    for index in loaded.note.stray_markers:
        found.append(
            Finding(
                shown,
                loaded.relative,
                index + 1,
                STRAY_MARKER,
                index + 1,
                "a vault-runner marker that pairs with no output region of ours; it is kept as your text: "
                "delete the line if you do not need it",
            )
        )
    found.sort(key=lambda finding: finding.line)
    return found


def _unchanged_itself(planned: PlannedBlock, recorded: str, recorded_above: Sequence[str]) -> bool:
    block = planned.block
    hashed = planned.options.hashed()
    # The nearest recorded hash is the usual predecessor; the one before it covers a block
    # inserted (or switched to eval: false) right above; "" covers the first block.
    candidates = [*recorded_above[:2], ""]
    return any(notes.code_hash(previous, block.code, hashed) == recorded for previous in candidates)


def render_diff(loaded: Loaded, path: str | None = None) -> str:
    """A unified diff of what `render` would change, as far as it is known without running.

    Stale and missing regions get a region whose opening marker is the one `render` will
    write, with a placeholder body (the real body exists only after the block runs); regions
    under `eval: false` blocks are removed; hand-edited regions are left, as `render` does.
    The placeholder region is deliberately invalid (its checksum never matches), so a diff
    applied by hand still fails `check` until `render` has really run the blocks.
    """
    shown = path if path is not None else loaded.relative
    regions: dict[int, list[str] | None] = {}
    for planned in loaded.plan:
        block = planned.block
        if freshness(planned).leftover:
            regions[block.index] = None
        elif needs_output(planned):
            assert planned.code_hash is not None
            lines = notes.region_lines(block, planned.code_hash, DIFF_PLACEHOLDER + "\n")
            # A checksum that cannot match: applying the diff must not make a note pass `check`.
            lines[-1] = re.sub(r"sum=[0-9a-f]+", "sum=" + "0" * 12, lines[-1])
            regions[block.index] = lines
    if not regions:
        return ""
    before = loaded.note.text
    after = notes.splice(loaded.note, regions)
    lines = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), f"a/{shown}", f"b/{shown}"
    )
    return "".join(line if line.endswith(("\n", "\r")) else line + "\n\\ No newline at end of file\n" for line in lines)
