"""Read a note and decide whether and how it runs: Loaded, load, select, block_report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vault_runner.core import note as notes
from vault_runner.core.freshness import freshness, is_current
from vault_runner.core.options import OptionError, Resolved, opted_in, resolve
from vault_runner.core.plan import PlannedBlock, plan_blocks
from vault_runner.core.warnings import frontmatter_line, option_warnings
from vault_runner.disk.vault import Vault
from vault_runner.errors import NoteError, VaultError
from vault_runner.model import BlockReport

__all__ = (
    "Loaded",
    "PlannedBlock",
    "Selection",
    "block_report",
    "could_have_blocks",
    "load",
    "may_be_opted_in",
    "select",
)


@dataclass(frozen=True)
class Loaded:
    path: Path
    relative: str
    data: bytes
    note: notes.Note
    opted_in: bool
    note_options: Resolved
    plan: tuple[PlannedBlock, ...]
    warnings: tuple[str, ...] = ()  # `note:line: warning: ...` for options that are ignored
    # Its first line opens properties (`---`) that nothing closes: what a note looks like
    # while an editor is half-way through saving it. The watcher waits for the next save
    # rather than take such a read for an opt-out.
    unfinished: bool = False

    @property
    def runnable(self) -> tuple[PlannedBlock, ...]:
        return tuple(p for p in self.plan if p.code_hash is not None)

    def is_current(self) -> bool:
        return is_current(self.plan) and not notes.removable_orphans(self.note)

    def hand_edited(self) -> list[notes.Block]:
        return [p.block for p in self.runnable if freshness(p).hand_edited]


def could_have_blocks(data: bytes) -> bool:
    """Cheap byte-level filter: can this note hold a runnable block or one of our regions?"""
    if b"vault-runner:" in data:
        return True
    return (b"```" in data or b"~~~" in data) and b"py" in data.lower()


def load(vault: Vault, path: Path, data: bytes | None = None) -> Loaded:
    """Parse a note (read it, unless its bytes are given). Raises VaultError (file and line)
    on input we must not touch. A note that is a symlink inside the vault is loaded (and
    written) as the file it points to."""
    path = vault.check_inside(path)
    relative = vault.relative(path)
    if data is None:
        data = vault.read_note(path)
    try:
        text = notes.decode_note(data)
    except notes.NoteError as exc:
        # Bytes we cannot decode only matter in a note we would run or write.
        if _without_blocks(notes.parse_note(data.decode("utf-8", "replace"))):
            return _nothing_to_run(path, relative, data)
        raise VaultError(path, exc.message, exc.line) from None
    note = notes.parse_note(text)
    if _without_blocks(note):
        # A note with no python block is never run nor written, so its frontmatter,
        # however broken, is none of our business (real vaults have plenty of those).
        return _nothing_to_run(path, relative, data, note)
    if note.problems:
        problem = note.problems[0]
        raise VaultError(path, problem.message, problem.line)
    if note.frontmatter_error is not None:
        raise VaultError(path, note.frontmatter_error.message, note.frontmatter_error.line)
    config = vault.config
    try:
        note_options = resolve(config.defaults, note.frontmatter)
    except OptionError as exc:
        line = frontmatter_line(note, exc.option) if exc.origin == "frontmatter" and exc.option else 2
        raise VaultError(path, f"frontmatter: {exc}", line) from None
    try:
        plan = plan_blocks(note, config.defaults)
    except NoteError as exc:
        raise VaultError(path, exc.message, exc.line) from None
    return Loaded(
        path=path,
        relative=relative,
        data=data,
        note=note,
        opted_in=opted_in(note.frontmatter, relative, config.include, config.exclude),
        note_options=note_options,
        plan=plan,
        warnings=tuple(option_warnings(relative, note, note_options, plan)),
        unfinished=_unclosed_frontmatter(note),
    )


def may_be_opted_in(vault: Vault, path: Path, data: bytes) -> bool:
    """Could this note opt in? Judged on its bytes: the `vault-runner` property written in it,
    or a folder the vault config includes.

    Cheap, so that the many notes of a big vault that merely mention python are never
    parsed, and so that a broken draft that does not opt in (a half-written, unclosed fence)
    is left alone rather than reported.
    """
    if b"vault-runner" in data:
        return True
    try:
        relative = vault.relative(path)
    except ValueError:
        return True
    return opted_in({}, relative, vault.config.include, vault.config.exclude)


@dataclass(frozen=True)
class Selection:
    """Whether vault-runner runs a note: the loaded note, or why it is skipped."""

    relative: str
    loaded: Loaded | None
    skipped: str | None = None  # no-blocks | not-opted-in


def select(vault: Vault, path: Path, *, all_notes: bool = False) -> Selection:
    """Read a note once and decide whether it runs: it has python blocks and, unless
    `all_notes`, it opts in. Raises VaultError only for a note that would run."""
    relative = vault.relative(vault.check_inside(path))
    data = vault.read_note(path)
    if not could_have_blocks(data):
        return Selection(relative, None, "no-blocks")
    if not all_notes and not may_be_opted_in(vault, path, data):
        return Selection(relative, None, "not-opted-in")
    loaded = load(vault, path, data)
    if not loaded.plan:
        return Selection(relative, None, "no-blocks")
    if not all_notes and not loaded.opted_in:
        return Selection(relative, None, "not-opted-in")
    return Selection(relative, loaded)


def block_report(
    loaded: Loaded,
    planned: PlannedBlock,
    status: str,
    *,
    duration: float = 0.0,
    device: str | None = None,
    message: str | None = None,
) -> BlockReport:
    """A block's entry of the report (DESIGN.md contract 8), before its outputs are added."""
    block = planned.block
    first = next((line for line in block.code.split("\n") if line.strip() and not line.startswith("#|")), "")
    return BlockReport(
        note=loaded.relative,
        index=block.index,
        line=block.fence_line,
        first_line=first,
        label=planned.options["label"],
        status=status,
        duration=round(duration, 4),
        device=device,
        message=message,
    )


def _without_blocks(note: notes.Note) -> bool:
    return not note.blocks and not note.problems


def _nothing_to_run(path: Path, relative: str, data: bytes, note: notes.Note | None = None) -> Loaded:
    empty = note or notes.parse_note("")
    return Loaded(
        path,
        relative,
        data,
        empty,
        opted_in=False,
        note_options=resolve({}, {}),
        plan=(),
        unfinished=_unclosed_frontmatter(empty),
    )


def _unclosed_frontmatter(note: notes.Note) -> bool:
    """A first `---` line that no later `---` line closes (core/note.py: only `---` closes)."""
    lines = [line.rstrip("\r\n").rstrip() for line in note.lines]
    return bool(lines) and lines[0] == "---" and "---" not in lines[1:]


def needs_torch(loaded: Loaded) -> bool:
    """Whether the kernel's setup imports torch (the note's code mentions it or DEVICE)."""
    return any("torch" in p.block.code or "DEVICE" in p.block.code for p in loaded.runnable)
