"""When a note's run stops early, and the words that say why. Pure.

A block that raised under `error: false`, or whose kernel had to be restarted (it died or
ignored an interrupt), stops the note there: the blocks after it depend on state that is not
there. The engine, the live runner and the pytest plugin all ask here.
"""

from __future__ import annotations

from vault_runner.core.plan import PlannedBlock

__all__ = ("stops_the_note", "stop_message")


def stops_the_note(planned: PlannedBlock, status: str, kernel_restarted: bool) -> bool:
    """Whether the blocks after this one must not run in this kernel."""
    return kernel_restarted or status == "dead" or (status == "error" and not planned.options["error"])


def stop_message(planned: PlannedBlock, status: str, kernel_restarted: bool) -> str:
    """What the skipped blocks after it say."""
    line = planned.block.fence_line
    if kernel_restarted or status == "dead":
        return f"not run: the kernel was restarted after the block at line {line}; fix it and run the note again"
    return f"not run: the block at line {line} raised and `error: false` stops the note at the first error"
