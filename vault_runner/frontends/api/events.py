"""The live event stream of the API: one hub fed by the runner, one queue per client, SSE framing.

The runner's threads hand events to `EventHub`, which numbers them, remembers each note's
last report (for `/results` and the device of each note in `/status`) and fans them out
to the open streams (a `regions` event only to the streams of the plugins that hold its
note open, editors.py). Each client's `EventStream` is a bounded asyncio queue: a slow client
loses events (and is told how many, with an `overflow` event), never the server's memory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from vault_runner.errors import ApiError
from vault_runner.model import BLOCK_FAILED, Event, EventSink

__all__ = (
    "HEARTBEAT_SECONDS",
    "MAX_STREAMS",
    "STREAM_QUEUE",
    "EventHub",
    "EventSource",
    "EventStream",
    "event_json",
    "event_stream",
    "sse",
)

HEARTBEAT_SECONDS = 15.0
MAX_STREAMS = 32
STREAM_QUEUE = 10_000


class EventSource(Protocol):
    """What the hub needs of the runner."""

    def subscribe(self, callback: EventSink) -> Callable[[], None]: ...


def event_json(event: Event, seq: int | None = None) -> dict[str, Any]:
    """An event as the stream sends it (see Event.to_json)."""
    return event.to_json(seq)


class EventStream:
    """One client's event stream: an asyncio queue fed from the runner's threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, note: str | None, client: str | None = None) -> None:
        self.loop = loop
        self.note = note
        self.client = client
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(STREAM_QUEUE)
        self.dropped = 0

    def push(self, item: dict[str, Any] | None) -> None:  # any thread
        if item is not None and self.note is not None and item["note"] != self.note:
            return
        try:
            self.loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:
            pass  # the loop is closed: the stream is gone

    def _put(self, item: dict[str, Any] | None) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            if item is None:  # the end must get through: make room for it
                self.queue.get_nowait()
                self.queue.put_nowait(None)
            else:
                self.dropped += 1  # a slow client loses events, never the server's memory


class StreamClients(Protocol):
    """What the hub needs of the editor registry (editors.py)."""

    def holders(self, note: str, connected_only: bool = False) -> set[str]: ...
    def stream_opened(self, client: str) -> None: ...
    def stream_closed(self, client: str) -> None: ...


class EventHub:
    """Subscribed to the runner once: fans events out to streams, remembers each note's last report."""

    def __init__(
        self, runner: EventSource, max_streams: int = MAX_STREAMS, clients: StreamClients | None = None
    ) -> None:
        self.max_streams = max_streams
        self.clients = clients
        self._lock = threading.Lock()
        self._streams: set[EventStream] = set()
        self._seq = itertools.count(1)
        self._closed = False
        self._reports: dict[str, dict[str, Any]] = {}
        self._devices: dict[str, str] = {}
        self._unsubscribe = runner.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:  # the runner's threads: be quick
        if event.kind == "note-finished":
            report = event.data.get("report")
            if isinstance(report, dict):
                with self._lock:
                    self._reports[event.note] = report
                    if report.get("device"):
                        self._devices[event.note] = str(report["device"])
        with self._lock:
            item = event_json(event, next(self._seq))
            streams = list(self._streams)
        if event.kind == "regions":
            # Regions are for the editor that holds the note, never for a stream that would write them twice.
            holders = self.clients.holders(event.note, connected_only=True) if self.clients is not None else set()
            streams = [s for s in streams if s.client is not None and s.client in holders]
        for stream in streams:
            stream.push(item)

    def amend_report(self, note: str, unwritten: Sequence[int], hand_edited: Sequence[int]) -> None:
        """The editor's acknowledgement of a `regions` event: blocks it left alone get their status."""
        with self._lock:
            report = self._reports.get(note)
            for block in report.get("blocks", []) if report else []:
                if block.get("index") in hand_edited:
                    block["status"] = "hand-edited"
                elif block.get("index") in unwritten and block.get("status") not in BLOCK_FAILED:
                    block["status"] = "unwritten"

    def last_report(self, note: str) -> dict[str, Any] | None:
        """The JSON report of the note's last run in this server, or None."""
        with self._lock:
            return self._reports.get(note)

    def devices(self) -> dict[str, str]:
        """Each note's device in its last run (a copy)."""
        with self._lock:
            return dict(self._devices)

    def open(self, note: str | None, client: str | None = None) -> EventStream:
        """A new stream (of one note's events, or all; of a plugin `client`); ApiError when shutting down
        or too many are open."""
        stream = EventStream(asyncio.get_running_loop(), note, client)
        with self._lock:
            if self._closed:
                raise ApiError("shutting_down", "vault-runner is shutting down; start it again")
            if len(self._streams) >= self.max_streams:
                raise ApiError(
                    "too_many_streams",
                    f"{self.max_streams} event streams are open already; close one (reload the plugin) and retry",
                )
            self._streams.add(stream)
        if client is not None and self.clients is not None:
            self.clients.stream_opened(client)
        return stream

    def remove(self, stream: EventStream) -> None:
        with self._lock:
            known = stream in self._streams
            self._streams.discard(stream)
        if known and stream.client is not None and self.clients is not None:
            self.clients.stream_closed(stream.client)

    def count(self) -> int:
        with self._lock:
            return len(self._streams)

    def close(self) -> None:
        """End every stream (shutdown) and stop listening to the runner."""
        self._unsubscribe()
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for stream in streams:
            stream.push(None)


def sse(kind: str, data: dict[str, Any], seq: int | None = None) -> str:
    """One Server-Sent Event: `id:`, `event:` and `data:` lines, then a blank line."""
    lines = [f"id: {seq}"] if seq is not None else []
    lines.append(f"event: {kind}")
    payload = json.dumps(data, ensure_ascii=False, default=str)
    lines.extend(f"data: {part}" for part in payload.split("\n"))  # json.dumps has no newline, but be safe
    return "\n".join(lines) + "\n\n"


async def event_stream(hub: EventHub, stream: EventStream, heartbeat: float) -> AsyncIterator[str]:
    """The text of a stream's response: `ready`, the events, keep-alives, `overflow`, `closing`."""
    try:
        yield sse("ready", {"note": stream.note, "time": round(time.time(), 3)})
        while True:
            try:
                item = await asyncio.wait_for(stream.queue.get(), heartbeat)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"  # also how a vanished client is noticed
                continue
            if stream.dropped:
                dropped, stream.dropped = stream.dropped, 0
                yield sse("overflow", {"dropped": dropped, "message": f"{dropped} event(s) were dropped"})
            if item is None:
                yield sse("closing", {"message": "vault-runner is shutting down"})
                return
            yield sse(item["kind"], item, item["id"])
    finally:
        hub.remove(stream)
