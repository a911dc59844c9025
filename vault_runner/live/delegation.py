"""The editor owns the open note (DESIGN.md contract 11): regions for an editor instead of a write.

When a front end tells the runner that an editor holds a note open (`EditorHolds`, the
Obsidian plugin through the API), a run of that note does not swap the file: its regions
are published as one `regions` event (per block: the code that ran, its code hash, the
region body) and the editor applies them to its own text, with the same rule as
engine/writeback.py. The file is then saved once, by the editor. Attachments are separate
files: they are written here as always.

The editor acknowledges each `regions` event (`acknowledge`); only then, and only once the
note on disk links the new attachments, are the attachments the old regions linked
removed, so that nothing is deleted on a guess. A note no editor holds is written as today.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from vault_runner.core import note as notes
from vault_runner.core.freshness import hand_edit_message
from vault_runner.disk.atomic import read_file
from vault_runner.disk.attachments import links_to, remove_stale_attachments
from vault_runner.engine.writeback import EditorRegions
from vault_runner.errors import VaultError
from vault_runner.model import Event, NoteReport

if TYPE_CHECKING:
    from vault_runner.engine import Engine, Run
    from vault_runner.live.runner import Runner

__all__ = ("ACK_SECONDS", "Delegation", "EditorHolds")

ACK_SECONDS = 60.0  # an unacknowledged run's stale attachments are left after this
DISK_WAIT = 30.0  # after an ack, how long to wait for the editor's save to reach the disk


class EditorHolds(Protocol):
    """Which notes an editor holds open (the API's editor registry)."""

    def is_held(self, note: str) -> bool:
        """True when an editor holds `note` open (now, or until a dropped stream's grace period ends)."""
        ...

    def wait_for_holder(self, note: str) -> bool:
        """True when an editor holds `note` and can be reached now (may wait out a reconnect)."""
        ...


@dataclass
class _Pending:
    note: str
    path: Path
    regions: EditorRegions
    report: NoteReport
    sent: float = field(default_factory=time.monotonic)


class Delegation:
    """The runner's side of contract 11: publish regions for held notes, take their acknowledgements."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.editors: EditorHolds | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self.disk_wait = DISK_WAIT

    def is_held(self, note: str) -> bool:
        """An editor holds the note open (no waiting)."""
        editors = self.editors
        return editors is not None and editors.is_held(note)

    def holds(self, note: str) -> bool:
        """An editor holds the note (waiting out a reconnect's grace period if need be)."""
        editors = self.editors
        return editors is not None and editors.wait_for_holder(note)

    def write_back(self, engine: Engine, run: Run) -> bool:
        """Write `run` back: to the editor holding its note (True), or to the file as always (False)."""
        relative = run.loaded.relative
        if not self.holds(relative):
            engine.write_back(run)
            return False
        regions = engine.editor_regions(run)
        if regions is None:
            return True  # an attachment could not be written inside the vault: the report says so
        run_id = f"r-{next(self._ids)}"
        now = time.monotonic()
        with self._lock:
            for key in [k for k, p in self._pending.items() if now - p.sent > ACK_SECONDS]:
                del self._pending[key]  # never acknowledged: its stale attachments are left
            self._pending[run_id] = _Pending(relative, run.loaded.path, regions, run.report)
        data = {"run": run_id, "force": bool(engine.force), "updates": regions.updates}
        self.runner.emit(Event("regions", relative, data=data))
        return True

    def acknowledge(
        self,
        note: str,
        run_id: str,
        via: str,
        unwritten: Sequence[int],
        hand_edited: Sequence[int],
        amend: Callable[[str, Sequence[int], Sequence[int]], None] | None = None,
    ) -> bool:
        """The editor applied (or could not apply) run `run_id`; False for an unknown or repeated run."""
        with self._lock:
            pending = self._pending.get(run_id)
            if pending is None or pending.note != note:
                return False
            del self._pending[run_id]
        _mark(pending.report, unwritten, hand_edited)
        if amend is not None:
            amend(note, unwritten, hand_edited)
        if via != "none" and pending.regions.old_links:
            worker = threading.Thread(
                target=self._remove_stale, args=(pending,), name="vault-runner-stale-attachments", daemon=True
            )
            worker.start()
        return True

    def _remove_stale(self, pending: _Pending) -> None:
        """Once the note on disk links the new attachments (the editor saved), remove the old ones."""
        regions = pending.regions
        vault = self.runner.vault
        path = pending.path
        deadline = time.monotonic() + self.disk_wait
        while True:
            try:
                text = notes.decode_note(read_file(path, root=vault.root))
            except (OSError, VaultError, notes.NoteError):
                return  # gone or unreadable: nothing is deleted on a guess
            if all(links_to(text, name) for name in regions.attachments):
                try:
                    remove_stale_attachments(regions.attachment_dir, regions.old_links, text, root=vault.root)
                except (OSError, VaultError):
                    pass
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.25)


def _mark(report: NoteReport, unwritten: Sequence[int], hand_edited: Sequence[int]) -> None:
    """The statuses the editor found, as the engine gives them when it writes the file itself."""
    for block in report.blocks:
        if block.index in hand_edited:
            block.status = "hand-edited"
            block.message = f"{block.note}:{block.line}: {hand_edit_message(block.line)}"
        elif block.index in unwritten and not block.failed:
            block.status = "unwritten"
            block.message = "its code changed while it ran; it will run again next time"
