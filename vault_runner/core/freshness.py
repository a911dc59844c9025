"""Is a block's output region current? The one rule, and the words that report it. Pure.

A region is current when it was made by the code now above it (its opening marker records
that code's chained hash) and nobody edited it since (its closing checksum still matches).
render, check, test, the live runner and the API all ask here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vault_runner.core.plan import PlannedBlock

__all__ = (
    "Freshness",
    "advice",
    "freshness",
    "hand_edit_message",
    "holds_failure",
    "is_current",
    "needs_output",
    "stored_failures",
)


@dataclass(frozen=True)
class Freshness:
    """What the note's bytes say of one block's region, without running anything."""

    runs: bool  # the block is evaluated (not `eval: false`)
    has_region: bool
    stale: bool  # the region was made by other code (or other code above it)
    hand_edited: bool  # the region's checksum no longer matches

    @property
    def current(self) -> bool:
        if not self.runs:
            return not self.has_region
        return self.has_region and not self.stale and not self.hand_edited

    @property
    def leftover(self) -> bool:
        """A region under a block that no longer runs: render removes it."""
        return not self.runs and self.has_region


def freshness(planned: PlannedBlock) -> Freshness:
    region = planned.block.region
    if region is None:
        return Freshness(planned.code_hash is not None, False, False, False)
    return Freshness(
        runs=planned.code_hash is not None,
        has_region=True,
        stale=region.code_hash != planned.code_hash,
        hand_edited=region.hand_edited,
    )


def is_current(plan: Iterable[PlannedBlock]) -> bool:
    return all(freshness(planned).current for planned in plan)


def needs_output(planned: PlannedBlock) -> bool:
    """Render writes this block's region: missing, or made by other code and not edited by hand
    (a hand-edited region is left alone unless forced)."""
    state = freshness(planned)
    return state.runs and (not state.has_region or (state.stale and not state.hand_edited))


def advice(state: Freshness) -> str:
    """What fixes a region that is not current: the one wording of the fix, so that check,
    render, watch and test never advise different commands for the same region."""
    if state.hand_edited:
        return "move your text out of it, or run `vault-runner render --force` to overwrite it"
    if state.leftover:
        return "run `vault-runner render` to remove it"
    return "run `vault-runner render` to update it"


_HAND_EDITED = Freshness(runs=True, has_region=True, stale=False, hand_edited=True)


def hand_edit_message(fence_line: int, *, cleaning: bool = False) -> str:
    """The finding for a region edited by hand, the same wherever it is reported (`cleaning`:
    said by `clean`, whose own --force removes it)."""
    fix = "move your text out of it, or run `vault-runner clean --force` to remove it" if cleaning else None
    return (
        f"the output region of the block at line {fence_line} was edited by hand, so it is left as it is; "
        f"{fix or advice(_HAND_EDITED)}"
    )


# The callout render.py writes for an exception, a timeout or a dead kernel.
_FAILURE_CALLOUT = re.compile(r"^> \[!failure\]", re.MULTILINE)


def holds_failure(planned: PlannedBlock) -> bool:
    """The block's stored output is a failure (an error, a timeout, a dead kernel, an interrupt)."""
    region = planned.block.region
    return region is not None and bool(_FAILURE_CALLOUT.search(region.body))


def stored_failures(plan: Sequence[PlannedBlock]) -> list[PlannedBlock]:
    """Blocks that run and whose current region is a stored failure (`render --failed` re-runs them)."""
    return [p for p in plan if p.code_hash is not None and holds_failure(p) and not freshness(p).hand_edited]
