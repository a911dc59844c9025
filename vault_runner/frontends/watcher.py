"""Watch a vault with watchdog and turn each save of a note into a warm, incremental run.

Events are debounced per note (a save is often several events: truncate, write, close),
then the note on disk decides what happens, not the event's type: a note that exists is
updated (Runner.note_changed), one that is gone is dropped, a rename moves its session
and warm kernel along. What is ignored: our own write-backs (the bytes we wrote are
remembered, so the event they cause is recognised and dropped: no loops), hidden
folders (.obsidian, .trash, .git...), anything that is not a `.md` note (attachments,
temp files), Obsidian's "Excluded files" (userIgnoreFilters), and notes with no python
block. Notes that opt out in their frontmatter are dropped by the runner.

Faults give one clear log line and never stop the watcher: the vault folder deleted or
unmounted (it is watched again when it comes back), a note replaced by a folder,
permission denied, a symlink loop, a note over the size limit, and bursts such as a git
checkout of many notes (notes without a warm kernel are then not run; save one to run it).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from vault_runner.disk.vault import CONFIG_NAME, MAX_NOTE_BYTES
from vault_runner.engine import could_have_blocks
from vault_runner.errors import shown_path
from vault_runner.live.runner import Runner

DEBOUNCE = 0.04  # quiet time after a note's last event before it is read
MAX_WAIT = 0.5  # a note that keeps changing is still read this often
BURST_LIMIT = 25  # new notes within BURST_WINDOW that make a burst (a git checkout, a sync)
BURST_WINDOW = 2.0
HEALTH_INTERVAL = 2.0  # how often the vault folder itself is checked

_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
_SETTINGS = {CONFIG_NAME, ".obsidian/app.json"}


@dataclass
class _Pending:
    first: float
    last: float
    moved_from: Path | None = None
    was_file: bool = False
    folder_gone: bool = False


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: VaultWatcher) -> None:
        self.watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self.watcher._on_event(event)
        except Exception as exc:  # an exception here would kill watchdog's thread
            self.watcher._log("error", f"{shown_path(self.watcher.root)}: a file event could not be handled ({exc!r})")


class VaultWatcher:
    """A watchdog observer on the vault folder feeding a Runner. `start()`, then `stop()`."""

    def __init__(
        self,
        runner: Runner,
        *,
        debounce: float = DEBOUNCE,
        max_wait: float = MAX_WAIT,
        burst_limit: int = BURST_LIMIT,
        burst_window: float = BURST_WINDOW,
        health_interval: float = HEALTH_INTERVAL,
    ) -> None:
        self.runner = runner
        self.root = runner.vault.root
        self.debounce = debounce
        self.max_wait = max(max_wait, debounce)
        self.burst_limit = burst_limit
        self.burst_window = burst_window
        self.health_interval = health_interval
        self._cond = threading.Condition()
        self._pending: dict[Path, _Pending] = {}
        self._flushing = False  # due events taken off `_pending`, not yet handed to the runner
        self._settings_changed = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._watch: Any = None
        self._root_id: tuple[int, int] | None = None
        self._missing = False
        self._logged: dict[Path, str] = {}
        self._recent: deque[tuple[float, Path]] = deque()
        self._burst_skipped = 0
        self._in_burst = False
        self.events_seen = 0  # for status and tests: file events received

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._observer = Observer()
        self._observer.daemon = True
        if not self._schedule():
            self._missing = True
        self._observer.start()
        self._thread = threading.Thread(target=self._loop, name="vault-runner-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout=30)
            except Exception:
                pass

    def __enter__(self) -> VaultWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_quiet(self, timeout: float = 60.0) -> bool:
        """Block until no event is waiting for its debounce (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._settings_changed or self._flushing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    # -- events (watchdog's thread) -------------------------------------------------------
    def _relative(self, path: str | bytes) -> str | None:
        text = os.fsdecode(path)
        root = str(self.root)
        if text == root:
            return ""
        if not text.startswith(root + os.sep):
            return None
        return text[len(root) + 1 :].replace(os.sep, "/")

    def _on_event(self, event: FileSystemEvent) -> None:
        self.events_seen += 1
        now = time.monotonic()
        source = self._relative(event.src_path)
        if isinstance(event, (DirDeletedEvent, DirMovedEvent)):
            # The notes below it are gone from there (a moved folder's notes get their own events).
            if source is not None and source != "" and not self._ignored_folder(source):
                self._touch(Path(os.fsdecode(event.src_path)), now, folder_gone=True)
            elif source == "":
                with self._cond:
                    self._cond.notify_all()  # the vault folder itself: the health check sees to it
            return
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            destination = self._relative(event.dest_path)
            source_note = source is not None and self._is_note(source)
            destination_note = destination is not None and self._is_note(destination)
            if destination_note:
                moved_from = Path(os.fsdecode(event.src_path)) if source_note else None
                self._touch(Path(os.fsdecode(event.dest_path)), now, moved_from=moved_from, was_file=True)
            elif source_note:
                self._touch(Path(os.fsdecode(event.src_path)), now, was_file=True)  # moved out: gone
            return
        if source is None:
            return
        if source in _SETTINGS:
            with self._cond:
                self._settings_changed = True
                self._cond.notify_all()
            return
        if self._is_note(source):
            self._touch(Path(os.fsdecode(event.src_path)), now, was_file=True)

    def _is_note(self, relative: str) -> bool:
        return relative.lower().endswith(".md") and not self.runner.vault.is_ignored(relative)

    def _ignored_folder(self, relative: str) -> bool:
        return self.runner.vault.is_ignored(relative + "/")

    def _touch(
        self,
        path: Path,
        now: float,
        *,
        moved_from: Path | None = None,
        was_file: bool = False,
        folder_gone: bool = False,
    ) -> None:
        with self._cond:
            pending = self._pending.get(path)
            if pending is None:
                pending = self._pending[path] = _Pending(now, now)
            pending.last = now
            pending.moved_from = moved_from or pending.moved_from
            pending.was_file = pending.was_file or was_file
            pending.folder_gone = pending.folder_gone or folder_gone
            self._cond.notify_all()

    # -- the watcher's own thread ---------------------------------------------------------
    def _loop(self) -> None:
        next_health = time.monotonic() + self.health_interval
        while True:
            due: list[tuple[Path, _Pending]] = []
            settings = False
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                wake = next_health
                for path, pending in list(self._pending.items()):
                    deadline = min(pending.last + self.debounce, pending.first + self.max_wait)
                    if deadline <= now:
                        due.append((path, self._pending.pop(path)))
                    else:
                        wake = min(wake, deadline)
                if self._settings_changed and not due:
                    settings, self._settings_changed = True, False
                if not due and not settings and now < next_health:
                    self._cond.wait(max(0.0, wake - now))
                    continue
                self._flushing = bool(due or settings)
            try:
                if settings:
                    self._safely(self.runner.reload_vault)
                if due:
                    self._flush(due)
            finally:
                with self._cond:
                    self._flushing = False
                    self._cond.notify_all()
            if time.monotonic() >= next_health:
                self._safely(self._check_health)
                self._safely(self.runner.still_trusted)  # untrust stops the vault's kernels
                self._safely(self._end_burst_if_quiet)  # also when no event comes after a burst
                next_health = time.monotonic() + self.health_interval

    def _safely(self, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except Exception as exc:
            self._log(
                "error", f"{shown_path(self.root)}: vault-runner hit an unexpected error ({exc!r}); still watching"
            )

    def _flush(self, due: list[tuple[Path, _Pending]]) -> None:
        # Moves first (a session must follow its note before anything else touches it).
        due.sort(key=lambda item: (item[1].moved_from is None, not item[1].folder_gone))
        for path, pending in due:
            self._safely(self._process, path, pending)
        self._end_burst_if_quiet()

    def _process(self, path: Path, pending: _Pending) -> None:
        runner = self.runner
        if pending.folder_gone:
            for note in runner.sessions_under(path):
                if not note.exists():
                    runner.note_removed(note, "its folder was deleted or moved")
            if not pending.was_file:
                return
        try:
            info = os.stat(path)
        except FileNotFoundError:
            self._forget(path)
            runner.note_removed(path)
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._log(
                    "error",
                    f"{shown_path(path)}: is a symbolic link that loops back on itself; fix or delete the link",
                    path,
                )
            elif exc.errno == errno.EACCES:
                self._log("error", f"{shown_path(path)}: cannot be read (permission denied); fix its permissions", path)
            else:
                self._log("error", f"{shown_path(path)}: cannot be read ({exc.strerror}); check the file", path)
            runner.note_removed(path, "it cannot be read")
            return
        if stat.S_ISDIR(info.st_mode):
            if pending.was_file or runner.has_session(path):
                self._log(
                    "warning",
                    f"{shown_path(path)}: the note was replaced by a folder; vault-runner stopped running it",
                    path,
                )
                runner.note_removed(path, "the note was replaced by a folder")
            return
        if not stat.S_ISREG(info.st_mode):
            return
        if info.st_size > MAX_NOTE_BYTES:
            self._log(
                "warning",
                f"{shown_path(path)}: is {info.st_size / 2**20:.1f} MB, over the {MAX_NOTE_BYTES // 2**20} MB limit "
                "for notes vault-runner runs; split it into smaller notes",
                path,
                "too large",  # said once, also while the file is still growing
            )
            runner.note_removed(path, "the note is too large")
            return
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_NOTE_BYTES + 1)
        except PermissionError:
            self._log("error", f"{shown_path(path)}: cannot be read (permission denied); fix its permissions", path)
            return
        except FileNotFoundError:
            runner.note_removed(path)
            return
        except OSError as exc:
            self._log("error", f"{shown_path(path)}: cannot be read ({exc.strerror}); check the file", path)
            return
        if not data:
            return  # what a save looks like halfway through (truncated, not yet written)
        self._forget(path)
        if pending.moved_from is not None:
            runner.note_moved(pending.moved_from, path)  # its session and kernel follow it
            return
        if runner.is_own_write(path, data):
            return  # the write-back of a run: nothing new in it
        if not runner.has_session(path):
            if not could_have_blocks(data):
                return  # no python block: nothing to run, no session, no kernel
            if self._burst(path):
                return
        runner.note_changed(path)

    def _burst(self, path: Path) -> bool:
        """True when `path` arrives in a burst of new notes and should not be run now."""
        now = time.monotonic()
        recent = self._recent
        while recent and now - recent[0][0] > self.burst_window:
            recent.popleft()
        recent.append((now, path))
        if not self._in_burst and len(recent) <= self.burst_limit:
            return False
        if not self._in_burst:
            self._in_burst = True
            self._log(
                "warning",
                f"{shown_path(self.root)}: many notes changed at once (a git checkout or a sync?); notes without a "
                f"warm kernel are not run until you save them; run `vault-runner render {shown_path(self.root)}` "
                "to render them all",
            )
            for _, earlier in list(recent)[:-1]:
                if self.runner.cancel(earlier):
                    self._burst_skipped += 1
        self._burst_skipped += 1
        return True

    def _end_burst_if_quiet(self) -> None:
        if not self._in_burst:
            return
        now = time.monotonic()
        if self._recent and now - self._recent[-1][0] <= self.burst_window:
            return
        self._in_burst = False
        self._recent.clear()
        self._log("info", f"{shown_path(self.root)}: the burst is over; {self._burst_skipped} note(s) were not run")
        self._burst_skipped = 0

    # -- the vault folder itself -----------------------------------------------------------
    def _schedule(self) -> bool:
        try:
            info = os.stat(self.root)
            if not stat.S_ISDIR(info.st_mode):
                return False
            self._watch = self._observer.schedule(_Handler(self), str(self.root), recursive=True, event_filter=_EVENTS)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._log(
                    "error",
                    f"{shown_path(self.root)}: the system's limit of watched folders is reached; raise "
                    "fs.inotify.max_user_watches (sysctl) and restart vault-runner watch",
                )
            elif exc.errno != errno.ENOENT:
                self._log("error", f"{shown_path(self.root)}: cannot be watched ({exc.strerror})")
            return False
        self._root_id = (info.st_dev, info.st_ino)
        return True

    def _unschedule(self) -> None:
        if self._watch is not None:
            try:
                self._observer.unschedule(self._watch)
            except Exception:
                pass  # its emitter may have stopped itself already
            self._watch = None

    def _emitter_alive(self) -> bool:
        emitters = getattr(self._observer, "emitters", None)
        if emitters is None:
            return True
        return any(e.is_alive() for e in emitters)

    def _check_health(self) -> None:
        try:
            info = os.stat(self.root)
            present = stat.S_ISDIR(info.st_mode)
        except OSError:
            present = False
        if not present:
            if not self._missing:
                self._missing = True
                self._unschedule()
                self._log(
                    "error",
                    f"{shown_path(self.root)}: the vault folder is gone (deleted, moved or unmounted); "
                    f"waiting for it to come back (checked every {self.health_interval:g} s)",
                )
            return
        replaced = self._root_id != (info.st_dev, info.st_ino)
        if self._missing or replaced or not self._emitter_alive():
            self._unschedule()
            if self._schedule():
                was_missing, self._missing = self._missing, False
                if was_missing or replaced:
                    self._log("info", f"{shown_path(self.root)}: the vault folder is back; watching it again")
                    if replaced:  # kernels (and their sandboxes) still hold the old folder
                        self.runner.reset_kernels("the vault folder was replaced")
                else:
                    self._log("warning", f"{shown_path(self.root)}: the file watcher had stopped; watching again")
            elif not self._missing:
                self._missing = True

    # -- log lines ------------------------------------------------------------------------
    def _log(self, level: str, message: str, path: Path | None = None, problem: str | None = None) -> None:
        """Log a line once per problem: a note that stays broken is not reported on every event."""
        key = path or self.root
        said = problem or message
        if self._logged.get(key) == said:
            return
        self._logged[key] = said
        note = ""  # the note an event is about is vault-relative, as in every JSON report
        if path is not None:
            try:
                note = path.relative_to(self.root).as_posix()
            except ValueError:
                note = str(path)
        self.runner.log(level, message, note)

    def _forget(self, path: Path) -> None:
        self._logged.pop(path, None)
