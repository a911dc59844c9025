"""Where a warm, incremental run of a note starts and stops, and what it puts back. Pure.

The live runner remembers, per note, the chained code hashes of the blocks that ran in its
warm kernel. Because each hash covers every block above it, the first position where the
note's hashes differ from what ran is where a run must start; the blocks above keep their
outputs. Outputs the kernel already made for a hash (`kept`) are put back rather than run
again when an editor drops them (it saved an older copy).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ("Mode", "RunPlan", "first_difference", "first_mismatch", "plan_run")

Mode = Literal["changed", "run", "restart-run", "block"]


@dataclass(frozen=True)
class RunPlan:
    """Positions are in the note's runnable blocks. `start` None: nothing to run."""

    start: int | None
    stop: int | None = None  # the last position to run (run one block); None: to the end
    restores: tuple[int, ...] = ()  # positions whose kept outputs are written back as they are
    no_such_block: bool = False  # `block` mode named a block that does not run


def first_mismatch(hashes: Sequence[str], executed: Sequence[str]) -> int | None:
    """The first position whose hash is not what ran there in the kernel."""
    for position, digest in enumerate(hashes):
        if position >= len(executed) or executed[position] != digest:
            return position
    return None


def first_difference(new: Sequence[str], old: Sequence[str]) -> int | None:
    """The first position where two hash lists differ (a length change counts), or None."""
    for position, (a, b) in enumerate(zip(new, old, strict=False)):
        if a != b:
            return position
    return None if len(new) == len(old) else min(len(new), len(old))


def plan_run(
    mode: Mode,
    digests: Sequence[str],
    *,
    executed: Sequence[str],
    seen: Sequence[str] | None,
    kept: Container[str],
    stale: Sequence[int],
    target: int | None = None,
) -> RunPlan:
    """Decide one run.

    `digests`: the note's chained hashes now; `executed`: what ran in the kernel, in order;
    `seen`: the hashes when the note was last handled (None: first sight, or after a cut run);
    `stale`: positions whose region needs output; `target`: for `block`, the position of the
    block asked for (None when no runnable block has that index).
    """
    mismatch = first_mismatch(digests, executed)
    stop: int | None = None
    start: int | None
    if mode == "restart-run":
        start = 0
    elif mode == "block":
        if target is None:
            return RunPlan(start=None, no_such_block=True)
        start = target if mismatch is None else min(mismatch, target)
        stop = target
    elif mode == "run":
        start = mismatch
        if start is None:
            start = next((pos for pos in stale if digests[pos] not in kept), None)
    elif seen is not None and tuple(digests) == tuple(seen):
        start = None  # a save that changed no code
    elif seen is None:
        # First sight: run only when outputs are missing or stale and cannot simply be put
        # back from what ran in this kernel.
        missing = [pos for pos in stale if digests[pos] not in kept]
        start = None if not missing else min(missing[0], mismatch if mismatch is not None else missing[0])
    else:
        start = mismatch
    restore_until = len(digests) if start is None else start
    restores = tuple(pos for pos in stale if pos < restore_until and digests[pos] in kept)
    return RunPlan(start=start, stop=stop, restores=restores)
