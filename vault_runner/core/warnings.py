"""Option warnings with the line the option is written on, in the note. Pure.

An unknown option (`#| timout: 5`) or one in the wrong place (a note-level `#| seed: 3`) is
ignored, so the note-taker must hear of it at the line they would fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vault_runner.core.note import Note
from vault_runner.core.options import FRONTMATTER_OPTIONS_KEY, Resolved
from vault_runner.core.plan import PlannedBlock

__all__ = ("frontmatter_line", "option_warnings")


def option_warnings(relative: str, note: Note, note_options: Resolved, plan: Sequence[PlannedBlock]) -> list[str]:
    """Every option warning of a note as `note:line: warning: ...`, in note order."""
    found: list[tuple[int, str]] = []
    for warning in note_options.warnings:
        line = frontmatter_line(note, warning.name) if warning.origin == "frontmatter" else 0
        found.append((line, f"{relative}:{line}: warning: {warning}" if line else f"{relative}: warning: {warning}"))
    for planned in plan:
        for warning in planned.options.warnings:
            if warning.origin != "block":
                continue  # the note's own warnings are reported once, above
            line = planned.block.option_line(warning.name)
            found.append((line, f"{relative}:{line}: warning: {warning}"))
    return [text for _, text in sorted(found, key=lambda item: item[0])]


def frontmatter_line(note: Note, name: str) -> int:
    """The line of the option `name:` under `execute:`, else of a top-level `name:` property
    (`network`, `execute` itself), else the frontmatter's first line. The one rule of where
    a frontmatter option is written: its warnings and its value errors name this line."""
    pattern = re.escape(name)
    inside = False
    top_level = 0
    for index, line in enumerate(note.lines[1:], start=2):
        text = line.rstrip("\r\n")
        if text.rstrip() == "---":
            break
        if not top_level and re.match(rf"^{pattern}\s*:", text):
            top_level = index
        if re.match(rf"^{FRONTMATTER_OPTIONS_KEY}\s*:", text):
            inside = True
            continue
        if inside and re.match(rf"^\s+{pattern}\s*:", text):
            return index
        if inside and text and not text[0].isspace():
            inside = False
    return top_level or 1
