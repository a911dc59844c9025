"""Which blocks of a note run, with which options, under which chained code hash. Pure.

A block's hash covers its code, its options and the hash of the block that ran before it:
in notebook semantics a block's outputs depend on everything above it (contract 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vault_runner.core.note import Block, Note, code_hash
from vault_runner.core.options import Resolved, resolve
from vault_runner.errors import NoteError, OptionError

__all__ = ("PlannedBlock", "plan_blocks")


@dataclass(frozen=True)
class PlannedBlock:
    block: Block
    options: Resolved
    code_hash: str | None  # None when the block does not run (eval: false)


def plan_blocks(note: Note, defaults: Mapping[str, Any]) -> tuple[PlannedBlock, ...]:
    """The plan of every python block; NoteError (with the block's line) for a bad option."""
    plan = []
    previous = ""
    for block in note.blocks:
        if block.option_error:
            raise NoteError(block.option_error, block.code_line)
        try:
            options = resolve(defaults, note.frontmatter, block.options)
        except OptionError as exc:
            line = block.option_line(exc.option) if exc.origin == "block" and exc.option else block.code_line
            raise NoteError(str(exc), line) from None
        digest = None
        if options["eval"]:
            digest = code_hash(previous, block.code, options.hashed())
            previous = digest
        plan.append(PlannedBlock(block, options, digest))
    return tuple(plan)
