"""Which notes the Obsidian plugin holds open in an editor (obsidian-plugin/PROTOCOL.md, contract 11).

A plugin instance names itself with a random `client` id, sent as `?client=` on its event
stream and in `POST /api/v1/editors`, which replaces the whole set of notes it holds open.
A set counts only while its client has an event stream open, plus a grace period of 10 s
after the last one closed (a reconnect after a drop); then it is forgotten and those notes
are written to disk as today. A note is *held* when a live set contains it: the runner then
publishes its regions (`regions` event, only on the holders' streams) instead of writing
the file, and the plugin acknowledges them with `POST /api/v1/regions-applied`.

A client that never registers editors sees exactly today's API.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from vault_runner.disk.vault import Vault
from vault_runner.errors import PathRefused
from vault_runner.frontends.api.routes import API_PREFIX, named_note
from vault_runner.frontends.api.schemas import (
    ERROR_RESPONSES,
    EditorsRequest,
    EditorsResult,
    IgnoredNote,
    RegionsAppliedRequest,
    RegionsAppliedResult,
)
from vault_runner.frontends.api.security import resolve_note

__all__ = ("GRACE_SECONDS", "MAX_OPEN", "EditorRegistry", "editors_router")

GRACE_SECONDS = 10.0
MAX_OPEN = 1000

editors_router = APIRouter()


class EditorRegistry:
    """The clients' sets of open notes and their streams; thread-safe (the runner asks from its threads)."""

    def __init__(self, grace: float = GRACE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self._clock = clock
        self._cond = threading.Condition()
        self._open: dict[str, frozenset[str]] = {}
        self._streams: Counter[str] = Counter()
        self._lost: dict[str, float] = {}  # client -> when its last stream closed
        self._closed = False

    # -- the API's side ----------------------------------------------------------------------
    def set_open(self, client: str, notes: Iterable[str]) -> None:
        """Replace the client's set (an empty set forgets the client)."""
        chosen = frozenset(notes)
        with self._cond:
            if chosen:
                self._open[client] = chosen
                if not self._streams[client]:
                    # Registered before (or without) a stream: the grace period runs (and is not renewed).
                    self._lost.setdefault(client, self._clock())
            else:
                self._open.pop(client, None)
                self._lost.pop(client, None)
            self._cond.notify_all()

    def stream_opened(self, client: str) -> None:
        with self._cond:
            self._streams[client] += 1
            self._lost.pop(client, None)
            self._cond.notify_all()

    def stream_closed(self, client: str) -> None:
        with self._cond:
            self._streams[client] -= 1
            if self._streams[client] <= 0:
                del self._streams[client]
                self._lost[client] = self._clock()
            self._cond.notify_all()

    def close(self) -> None:
        """Shutting down: nothing is held any more, no run waits for a client."""
        with self._cond:
            self._closed = True
            self._open.clear()
            self._cond.notify_all()

    # -- the runner's side (EditorHolds) ----------------------------------------------------------
    def holders(self, note: str, connected_only: bool = False) -> set[str]:
        """The clients holding `note`: with a stream open, or (unless `connected_only`) within grace."""
        with self._cond:
            return self._holders(note, connected_only)

    def is_held(self, note: str) -> bool:
        return bool(self.holders(note))

    def wait_for_holder(self, note: str) -> bool:
        """True when a client with a stream holds `note`; waits while only a reconnecting one does."""
        with self._cond:
            while not self._closed:
                if self._holders(note, connected_only=True):
                    return True
                waiting = [self._lost[c] + self.grace - self._clock() for c in self._holders(note, False)]
                if not waiting:
                    return False
                self._cond.wait(max(0.01, min(waiting)))
            return False

    def _holders(self, note: str, connected_only: bool) -> set[str]:
        now = self._clock()
        for client in [c for c, lost in self._lost.items() if now - lost > self.grace]:
            del self._lost[client]  # gone for good: its notes are written to disk again
            self._open.pop(client, None)
        found = set()
        for client, notes in self._open.items():
            if note in notes and (self._streams[client] > 0 or (not connected_only and client in self._lost)):
                found.add(client)
        return found

    def describe(self) -> dict[str, Any]:
        with self._cond:
            return {client: sorted(notes) for client, notes in self._open.items()}


# -- the routes ---------------------------------------------------------------------------------
def _editors_endpoint(name: str, model: type[Any], summary: str, description: str) -> Any:
    """A POST endpoint of the plugin's editors, in the `editors` group of the OpenAPI document."""
    return editors_router.post(
        f"{API_PREFIX}/{name}",
        response_model=model,
        responses=ERROR_RESPONSES,
        tags=["editors"],
        summary=summary,
        description=description,
    )


def _accept(vault: Vault, raw: list[str]) -> tuple[list[str], list[IgnoredNote]]:
    accepted: list[str] = []
    ignored: list[IgnoredNote] = []
    for item in raw:
        try:
            relative = vault.relative(resolve_note(vault, item))
        except PathRefused as exc:
            ignored.append(IgnoredNote(note=item[:1024], code=exc.code))
            continue
        if relative not in accepted:
            accepted.append(relative)
    return accepted, ignored


@_editors_endpoint(
    "editors",
    EditorsResult,
    "The notes a plugin holds open",
    "Replace the set of notes this client (`client`, the id of its event stream) holds open in "
    "an editor. For a held note, a run does not write the file: the regions are sent as a `regions` event on "
    "the client's stream and the plugin applies them in the editor. The set holds while the client has an "
    "event stream open, and 10 s after its last one closed. Paths that are refused go to `ignored` with "
    "their code; they do not fail the request.",
)
async def editors(body: EditorsRequest, request: Request) -> EditorsResult:
    state = request.app.state
    registry: EditorRegistry = state.editors
    accepted, ignored = await run_in_threadpool(_accept, state.runner.vault, body.open)
    registry.set_open(body.client, accepted)
    return EditorsResult(client=body.client, open=accepted, ignored=ignored)


@_editors_endpoint(
    "regions-applied",
    RegionsAppliedResult,
    "A plugin applied a regions event",
    "The acknowledgement of one `regions` event: how it was written (`editor`, `file`, "
    "`none`) and which blocks were left (`unwritten`: their code changed; `hand_edited`). The note's last "
    "report (`/api/v1/results`) takes these statuses, and the attachments the old regions linked are "
    "removed once the note on disk no longer links them. `accepted: false` for an unknown or already "
    "acknowledged run.",
)
async def regions_applied(body: RegionsAppliedRequest, request: Request) -> RegionsAppliedResult:
    state, path = await named_note(request, body.note)
    relative = state.runner.vault.relative(path)
    accepted = state.runner.delegation.acknowledge(
        relative, body.run, body.via, body.unwritten, body.hand_edited, amend=state.hub.amend_report
    )
    return RegionsAppliedResult(note=relative, run=body.run, accepted=accepted)
