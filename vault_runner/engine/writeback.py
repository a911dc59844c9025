"""Write a run's outputs back into its note: the compare-and-swap of contract 5.

Re-read the note, match its blocks to what ran by code (occurrence by occurrence), put
outputs only under code that is still the code that ran, swap the file in only if it did
not change since that re-read, and redo on a conflict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vault_runner.core import note as notes
from vault_runner.core.freshness import hand_edit_message
from vault_runner.core.plan import PlannedBlock
from vault_runner.core.render import CellSource
from vault_runner.disk.atomic import read_file, swap_note, write_attachment
from vault_runner.disk.attachments import attachment_names, links_to, remove_stale_attachments
from vault_runner.disk.vault import Vault
from vault_runner.errors import VaultError, WriteConflict
from vault_runner.model import BlockReport, Event, EventSink

if TYPE_CHECKING:
    from vault_runner.engine.run import BlockResult, Run

__all__ = ("MAX_WRITE_ATTEMPTS", "EditorRegions", "WriteBack")

MAX_WRITE_ATTEMPTS = 50


@dataclass
class EditorRegions:
    """What an editor that holds the note open applies instead of our swap (DESIGN.md contract 11).

    `updates`: every python block of the note as it ran, in note order (`index`, `code`,
    `code_hash`, `region`: the region body, or None to keep the block's region as it is).
    `old_links`: attachments the replaced regions linked (stale once the editor's text no
    longer links them); `attachments`: the files written for the new regions.
    """

    updates: list[dict[str, Any]]
    attachment_dir: Path
    old_links: set[str] = field(default_factory=set)
    attachments: set[str] = field(default_factory=set)


class WriteBack:
    """The write-back half of the Engine (its vault, force flag and event sink)."""

    vault: Vault
    force: bool
    on_event: EventSink

    # -- write-back ----------------------------------------------------------------------
    def write_back(self, run: Run) -> None:
        """Compare-and-swap the new regions into the note (DESIGN.md contract 5).

        Every path is resolved inside the vault at the moment of writing: a folder that a
        block swapped for a symlink makes the note fail with one line, and nothing is
        written outside the vault (DESIGN.md, addition 10).
        """
        try:
            self._write_back(run)
        except VaultError as exc:
            try:
                where = exc.path.relative_to(self.vault.root).as_posix()
            except ValueError:
                where = str(exc.path)
            run.report.status = "failed"
            run.report.reason = "outside_vault"
            run.report.message = f"{run.loaded.relative}: outputs not written: {where} {exc.message}"

    def editor_regions(self, run: Run) -> EditorRegions | None:
        """The regions of `run` for an editor to apply; the note file is not written, its attachments are.

        Tracebacks are re-lined to the note as it is on disk now (the editor's text may have
        moved on; the editor matches blocks by code, as `_regions_for` does). Whether a region
        was edited by hand is the editor's call, on its own text: no block is marked here.
        None (and the report failed) when an attachment cannot be written inside the vault.
        """
        loaded, report, results = run.loaded, run.report, run.results
        ran = [(p, results.get(p.block.index)) for p in loaded.plan]
        by_report = {b.index: b for b in report.blocks}
        try:
            current = read_file(loaded.path, root=self.vault.root)
            note = loaded.note if current == loaded.data else notes.parse_note(notes.decode_note(current))
        except (OSError, VaultError, notes.NoteError):
            note = loaded.note  # the editor has the text that counts; ours only places tracebacks
        if note.problems:
            note = loaded.note
        kept = [(b, b.status, b.message) for b in report.blocks]
        regions, old_links, _, matched = self._regions_for(note, ran, by_report)
        new_text = notes.splice(note, regions, notes.removable_orphans(note))
        if self._reline_tracebacks(new_text, matched, ran, run.sources):
            regions, old_links, _, matched = self._regions_for(note, ran, by_report)
            new_text = notes.splice(note, regions, notes.removable_orphans(note))
        for block, status, message in kept:  # undo the hand-edit marks: the editor decides them
            block.status, block.message = status, message
        delegated = EditorRegions(updates=[], attachment_dir=self.vault.attachment_dir(loaded.path))
        delegated.old_links = old_links
        try:
            for _, result in ran:
                for attachment in result.rendered.attachments if result and result.rendered else ():
                    if attachment.name not in delegated.attachments:
                        write_attachment(
                            delegated.attachment_dir / attachment.name, attachment.data, root=self.vault.root
                        )
                        delegated.attachments.add(attachment.name)
        except VaultError as exc:
            try:
                where = exc.path.relative_to(self.vault.root).as_posix()
            except ValueError:
                where = str(exc.path)
            report.status = "failed"
            report.reason = "outside_vault"
            report.message = f"{loaded.relative}: outputs not written: {where} {exc.message}"
            return None
        for planned, result in ran:
            body = None
            if planned.code_hash is not None and result is not None and result.rendered is not None:
                body = result.rendered.body
            block = planned.block
            delegated.updates.append(
                {"index": block.index, "code": block.code, "code_hash": planned.code_hash, "region": body}
            )
        return delegated

    def _write_back(self, run: Run) -> None:
        loaded, report, results = run.loaded, run.report, run.results
        ran = [(p, results.get(p.block.index)) for p in loaded.plan]
        by_report = {b.index: b for b in report.blocks}
        attachment_dir = self.vault.attachment_dir(loaded.path)
        for _attempt in range(MAX_WRITE_ATTEMPTS):
            try:
                current = read_file(loaded.path, root=self.vault.root)
            except OSError as exc:
                report.message = f"{loaded.relative}: outputs not written: the note could not be re-read ({exc})"
                report.status = "failed"
                return
            if current == loaded.data:
                note = loaded.note
            else:
                try:
                    note = notes.parse_note(notes.decode_note(current))
                except notes.NoteError as exc:
                    report.message = f"{loaded.relative}:{exc.line}: outputs not written: the note {exc.message}"
                    report.status = "failed"
                    return
                if note.problems:
                    report.message = (
                        f"{loaded.relative}:{note.problems[0].line}: outputs not written: "
                        f"the note {note.problems[0].message}"
                    )
                    report.status = "failed"
                    return
            regions, old_links, unwritten, matched = self._regions_for(note, ran, by_report)
            for orphan in notes.removable_orphans(note):
                old_links |= attachment_names(orphan.body)
            new_text = notes.splice(note, regions, notes.removable_orphans(note))
            if self._reline_tracebacks(new_text, matched, ran, run.sources):
                regions, old_links, unwritten, matched = self._regions_for(note, ran, by_report)
                new_text = notes.splice(note, regions, notes.removable_orphans(note))
            new = new_text.encode("utf-8", "surrogatepass")
            needed = {
                a.name: a
                for _, r in ran
                if r and r.rendered
                for a in r.rendered.attachments
                if links_to(new_text, a.name)
            }
            for attachment in needed.values():
                write_attachment(attachment_dir / attachment.name, attachment.data, root=self.vault.root)
            if new != current:
                try:
                    swap_note(loaded.path, current, new, root=self.vault.root)
                except WriteConflict:
                    continue
                report.written = True
                _lines_as_written(new_text, matched, by_report)
                self.on_event(Event("note-written", loaded.relative))
            for index in unwritten:
                block_report = by_report.get(index)
                if block_report and not block_report.failed:
                    block_report.status = "unwritten"
                    block_report.message = "its code changed while it ran; it will run again next time"
            remove_stale_attachments(attachment_dir, old_links, new_text, root=self.vault.root)
            return
        report.status = "failed"
        report.reason = "write_conflict"
        report.message = (
            f"{loaded.relative}: outputs not written: the note kept changing while "
            "vault-runner tried to save it; run it again"
        )

    def _reline_tracebacks(
        self,
        new_text: str,
        matched: Mapping[int, int],
        ran: list[tuple[PlannedBlock, BlockResult | None]],
        sources: Mapping[int, CellSource],
    ) -> bool:
        """Point tracebacks at the lines blocks have in the note as written, not as read.

        Regions inserted above a block move it down; re-rendering an error only changes
        digits, never the number of lines, so one extra pass settles every line number.
        """
        errors = [r for _, r in ran if r is not None and r.rerender is not None]
        if not errors:
            return False
        written = notes.parse_note(new_text)
        line_of = {
            planned: written.blocks[current].code_line
            for planned, current in matched.items()
            if current < len(written.blocks)
        }
        relined = {
            count: replace(source, first_code_line=line_of.get(source.block_index, source.first_code_line))
            if source.block_index is not None
            else source
            for count, source in sources.items()
        }
        if relined == dict(sources):
            return False
        for result in errors:
            assert result.rerender is not None
            result.rendered = result.rerender(relined)
            result.report.outputs = result.rerender.summaries(relined)
        return True

    def _regions_for(
        self, note: notes.Note, ran: list[tuple[PlannedBlock, BlockResult | None]], by_report: Mapping[int, BlockReport]
    ) -> tuple[dict[int, list[str] | None], set[str], set[int], dict[int, int]]:
        """Match the blocks of the (re-read) note to what ran, by code, occurrence by occurrence."""
        queues: dict[str, list[tuple[PlannedBlock, BlockResult | None]]] = {}
        for planned, result in ran:
            queues.setdefault(planned.block.code, []).append((planned, result))
        regions: dict[int, list[str] | None] = {}
        old_links: set[str] = set()
        matched: dict[int, int] = {}  # planned block index -> index in the re-read note
        for block in note.blocks:
            candidates = queues.get(block.code)
            if not candidates:
                continue
            planned, result = candidates.pop(0)
            matched[planned.block.index] = block.index
            if planned.code_hash is None:
                if block.region is not None:
                    old_links |= attachment_names(block.region.body)
                    regions[block.index] = None
                continue
            if result is None or result.rendered is None:
                continue
            if block.region is not None and block.region.hand_edited and not self.force:
                result.report.status = "hand-edited"
                result.report.message = (
                    f"{by_report[planned.block.index].note}:{block.region.first_line}: "
                    f"{hand_edit_message(block.fence_line)}"
                )
                continue
            if block.region is not None:
                old_links |= attachment_names(block.region.body)
            regions[block.index] = notes.region_lines(block, planned.code_hash, result.rendered.body)
        unwritten = {p.block.index for p, r in ran if r is not None and p.block.index not in matched}
        return regions, old_links, unwritten, matched


def _lines_as_written(new_text: str, matched: Mapping[int, int], by_report: Mapping[int, BlockReport]) -> None:
    """Report each block at the line it has in the file the user now opens, not as it was read."""
    written = notes.parse_note(new_text)
    for planned, current in matched.items():
        if planned in by_report and current < len(written.blocks):
            by_report[planned].line = written.blocks[current].fence_line
