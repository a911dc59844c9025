"""The editor owns the open note (obsidian-plugin/PROTOCOL.md, DESIGN.md contract 11), on a real
uvicorn server on 127.0.0.1 with real kernels, driven with httpx as the plugin drives it: a note
registered as open in an editor gets its regions on that client's event stream and its file is
not written; the acknowledgement updates the report; unregistered, the server writes as before.
Also: identical queued runs of a note are coalesced (issue 9.11).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import make_note_vault, using_config_dir
from tests.frontends.api.test_server import WAIT, EventReader, client_for, serving
from vault_runner.core import note as notes
from vault_runner.disk import trust
from vault_runner.frontends.api.app import ApiApp, ApiServer
from vault_runner.frontends.api.editors import EditorRegistry
from vault_runner.frontends.watcher import VaultWatcher
from vault_runner.live.runner import Runner

pytestmark = pytest.mark.kernel

CLIENT = "3f9a0c1b2d4e5f60718293a4"
ORIGIN = {"Origin": "app://obsidian.md"}

NOTES = {
    "held.md": """
        ---
        vault-runner: true
        ---
        # Held

        ```python
        print("hello from the kernel")
        ```

        Prose between.

        ```python
        #| eval: false
        import os
        ```
        """,
    "Folder/saved.md": """
        ---
        vault-runner: true
        ---
        ```python
        print("first")
        ```

        Prose.
        """,
    "Folder/lost.md": """
        ---
        vault-runner: true
        ---
        ```python
        print("kept in the kernel")
        ```
        """,
    "Folder/coalesce.md": """
        ---
        vault-runner: true
        ---
        ```python
        import time
        time.sleep(4)
        ```
        """,
    "Folder/figure.md": """
        ---
        vault-runner: true
        ---
        ```python
        import struct, zlib
        from IPython.display import Image, display

        def png(red):
            def chunk(kind, data):
                return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
            pixel = zlib.compress(bytes([0, red, 0, 0]))
            header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
            return bytes([137, 80, 78, 71, 13, 10, 26, 10]) + chunk(b"IHDR", header) + chunk(b"IDAT", pixel) + chunk(b"IEND", b"")

        display(Image(data=png(RED), format="png"))
        ```
        """,
    "Folder/slow.md": """
        ---
        vault-runner: true
        ---
        ```python
        import time
        time.sleep(1.5)
        print("slept")
        ```
        """,
}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, Runner, ApiApp, Path]]:
    root = make_note_vault(tmp_path_factory.mktemp("vault"), NOTES)
    with using_config_dir(tmp_path_factory.mktemp("config")):
        with serving(root, max_kernels=2, spares=0) as (server, runner, app):
            yield server, runner, app, root


@pytest.fixture(autouse=True)
def _trusted(request: pytest.FixtureRequest, _isolated_config: None) -> None:
    if "api" in request.fixturenames:
        trust.trust(request.getfixturevalue("api")[3])


@contextmanager
def stream(server: ApiServer, client: str | None = CLIENT) -> Iterator[EventReader]:
    """The plugin's event stream: `?client=`, with Obsidian's Origin."""
    reader = EventReader(server)
    reader.client.headers.update(ORIGIN)
    if client is not None:
        reader.params = {"client": client}
    try:
        yield reader.start()
    finally:
        reader.close()


def editors(server: ApiServer, notes: list[str], client: str = CLIENT) -> dict:
    with client_for(server, **ORIGIN) as http:
        answer = http.post("/api/v1/editors", json={"client": client, "open": notes})
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == "app://obsidian.md"
    return answer.json()


def digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def apply_like_the_plugin(text: str, updates: list[dict]) -> str:
    """What the plugin does with a `regions` event (src/regions.ts, checked against the Python
    splice on shared vectors): under each block whose code is still the code that ran."""
    note = notes.parse_note(text)
    queues: dict[str, list[dict]] = {}
    for update in updates:
        queues.setdefault(update["code"], []).append(update)
    regions: dict[int, list[str] | None] = {}
    for block in note.blocks:
        if queues.get(block.code):
            update = queues[block.code].pop(0)
            if update["code_hash"] is None:
                regions[block.index] = None
            elif update["region"] is not None:
                regions[block.index] = notes.region_lines(block, update["code_hash"], update["region"])
    return notes.splice(note, regions, notes.removable_orphans(note))


def test_a_note_open_in_an_editor_gets_its_regions_on_the_stream_and_its_file_is_not_written(api) -> None:
    server, _runner, _app, root = api
    note = root / "held.md"
    before = digest(note)
    with stream(server) as plugin, stream(server, client=None) as other:
        registered = editors(server, ["held.md", "../outside.md", "missing.md", "held.md"])
        assert registered["open"] == ["held.md"]
        assert {(i["note"], i["code"]) for i in registered["ignored"]} == {
            ("../outside.md", "invalid_path"),
            ("missing.md", "unknown_note"),
        }
        with client_for(server, **ORIGIN) as http:
            answer = http.post("/api/v1/run", json={"note": "held.md"})
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["error"] is None, result
        assert result["report"]["written"] is False
        assert plugin.wait(lambda: bool(plugin.of("note-finished")))
        [(_, regions)] = plugin.of("regions")
        assert regions["note"] == "held.md" and regions["kind"] == "regions"
        data = regions["data"]
        assert data["force"] is False and data["run"].startswith("r-")
        first, second = data["updates"]
        assert first["index"] == 0 and first["code"] == 'print("hello from the kernel")\n'
        assert len(first["code_hash"]) == 12 and "hello from the kernel" in first["region"]
        assert second == {"index": 1, "code": "#| eval: false\nimport os\n", "code_hash": None, "region": None}
        finished = plugin.of("note-finished")[-1][1]["data"]
        assert finished["delegated"] is True and finished["written"] is False
        assert not plugin.of("note-written")
        # Regions are for the editor that holds the note: a stream without that client never sees them.
        assert other.wait(lambda: bool(other.of("note-finished")))
        assert not other.of("regions")
        assert digest(note) == before, "the server wrote a note that an editor holds open"

        ack = {"client": CLIENT, "note": "held.md", "run": data["run"], "via": "editor"}
        with client_for(server, **ORIGIN) as http:
            done = http.post("/api/v1/regions-applied", json={**ack, "applied": [1], "unwritten": [0]})
            again = http.post("/api/v1/regions-applied", json={**ack, "applied": [0, 1]})
            results = http.get("/api/v1/results", params={"note": "held.md"}).json()
        assert done.json() == {"note": "held.md", "run": data["run"], "accepted": True}
        assert again.json()["accepted"] is False, "a run is acknowledged once"
        # The editor found block 0's code changed: the last report says so, as a file write would.
        assert results["source"] == "last-run"
        assert [b["status"] for b in results["report"]["blocks"]][0] == "unwritten"

        # Closed in the editor: the server writes the note itself again, as today.
        assert editors(server, [])["open"] == []
        mark = len(plugin.of("note-finished"))
        with client_for(server, **ORIGIN) as http:
            answer = http.post("/api/v1/run-block", json={"note": "held.md", "index": 0})
        assert answer.json()["report"]["written"] is True
        assert plugin.wait(lambda: len(plugin.of("note-finished")) > mark)
        assert len(plugin.of("regions")) == 1 and plugin.of("note-written")
    text = note.read_text(encoding="utf-8")
    assert "<!-- vault-runner:output code=" in text and "hello from the kernel" in text
    assert text.startswith("---\nvault-runner: true\n---\n# Held\n")


def test_a_set_outlives_its_stream_only_for_the_grace_period_then_the_file_is_written(api) -> None:
    server, _runner, app, root = api
    registry: EditorRegistry = app.fastapi.state.editors
    registry.grace = 1.0
    note = root / "Folder" / "slow.md"
    try:
        with stream(server):
            assert editors(server, ["Folder/slow.md"])["open"] == ["Folder/slow.md"]
        # The stream dropped: the set holds while a reconnect may come...
        assert registry.is_held("Folder/slow.md")
        before = digest(note)
        with client_for(server, **ORIGIN) as http:
            answer = http.post("/api/v1/run", json={"note": "Folder/slow.md"})
        # ...and no reconnect came, so the run wrote the file as today once the grace period ran out.
        assert answer.status_code == 200, answer.text
        assert answer.json()["report"]["written"] is True
        assert digest(note) != before and "slept" in note.read_text(encoding="utf-8")
        assert not registry.is_held("Folder/slow.md")
    finally:
        registry.grace = 10.0
        editors(server, [])


def test_fifty_queued_run_alls_of_a_note_coalesce_into_at_most_two_runs(api) -> None:
    server, runner, _app, _root = api
    note = "Folder/coalesce.md"
    with stream(server, client=None) as reader, client_for(server) as http:
        for _ in range(50):
            answer = http.post("/api/v1/run-all", json={"note": note, "wait": False})
            assert answer.status_code == 202, answer.text
        last_request = time.monotonic()
        assert runner.wait_idle(WAIT)
        time.sleep(0.3)  # the last events cross the stream
        started = [d for _, d in reader.of("note-started") if d["note"] == note]
        done_early = [t for t, d in reader.of("note-finished") if d["note"] == note and t < last_request]
    # At any moment one run runs and at most one waits, serving every request made meanwhile: the
    # one running when the requests came, and one queued (plus one per run that ended before the
    # last request was sent, on a machine slow enough to send 50 requests in 4 s).
    assert 1 <= len(started) <= 2 + len(done_early), f"{len(started)} runs for 50 identical requests"


def test_the_registry_forgets_a_client_after_the_grace_period() -> None:
    now = [0.0]
    registry = EditorRegistry(grace=10.0, clock=lambda: now[0])
    registry.set_open("c1", ["a.md"])
    assert registry.is_held("a.md") and not registry.holders("a.md", connected_only=True)
    registry.stream_opened("c1")
    now[0] = 100.0
    assert registry.holders("a.md", connected_only=True) == {"c1"}, "a connected client holds for ever"
    registry.stream_closed("c1")
    now[0] = 109.0
    assert registry.is_held("a.md") and registry.wait_for_holder("b.md") is False
    now[0] = 111.0
    assert not registry.is_held("a.md")
    registry.stream_opened("c1")  # a late reconnect does not bring the set back: a new POST does
    assert not registry.is_held("a.md")
    registry.set_open("c1", ["a.md"])
    assert registry.holders("a.md", connected_only=True) == {"c1"}
    registry.set_open("c1", [])
    assert not registry.is_held("a.md")


def test_a_save_of_a_held_note_runs_it_and_its_regions_go_to_the_editor_not_the_file(api) -> None:
    """The watcher still runs a held note when it is saved; the write-back goes to the plugin, and
    an editor's save without the outputs is not "repaired" behind its back (PROTOCOL.md §5)."""
    server, runner, _app, root = api
    note = root / "Folder" / "saved.md"
    watcher = VaultWatcher(runner, debounce=0.1)
    watcher.start()
    try:
        with stream(server) as plugin:
            editors(server, ["Folder/saved.md"])
            saved = note.read_text(encoding="utf-8").replace('print("first")', 'print("second")')
            note.write_text(saved, encoding="utf-8")  # Obsidian's autosave of the code just typed
            assert plugin.wait(lambda: bool(plugin.of("regions")))
            [(_, regions)] = plugin.of("regions")
            assert "second" in regions["data"]["updates"][0]["region"]
            assert plugin.wait(lambda: bool(plugin.of("note-finished")))
            assert note.read_text(encoding="utf-8") == saved, "the server wrote a note an editor holds"

            # The editor applies the regions and saves: the watcher runs nothing, writes nothing.
            applied = apply_like_the_plugin(saved, regions["data"]["updates"])
            note.write_text(applied, encoding="utf-8")
            assert watcher.wait_quiet(WAIT) and runner.wait_idle(WAIT)
            # The editor saves a copy without the outputs (an undo): left as the editor has it.
            note.write_text(saved, encoding="utf-8")
            time.sleep(0.5)
            assert watcher.wait_quiet(WAIT) and runner.wait_idle(WAIT)
            assert note.read_text(encoding="utf-8") == saved
            assert len(plugin.of("regions")) == 1 and not plugin.of("note-written")
    finally:
        editors(server, [])
        watcher.stop()


def test_the_old_figure_goes_once_the_editor_saved_the_new_one_and_acknowledged(api) -> None:
    server, _runner, app, root = api
    note = root / "Folder" / "figure.md"
    original = note.read_text(encoding="utf-8")
    app.fastapi.state.runner.delegation.disk_wait = 10.0

    def run_held() -> dict:
        with stream(server) as plugin:
            editors(server, ["Folder/figure.md"])
            with client_for(server, **ORIGIN) as http:
                answer = http.post("/api/v1/run", json={"note": "Folder/figure.md"})
            assert answer.status_code == 200 and answer.json()["error"] is None, answer.text
            assert plugin.wait(lambda: bool(plugin.of("regions"))), (answer.json(), [k for _, k, _ in plugin.events])
            return plugin.of("regions")[0][1]["data"]

    def figures() -> set[str]:
        return {p.name for p in root.rglob("figure-*-vr-*.png")}

    try:
        note.write_text(original.replace("RED", "10"), encoding="utf-8")
        first = run_held()
        [one] = figures()  # the attachment is written by the server, beside the note
        note.write_text(apply_like_the_plugin(note.read_text(encoding="utf-8"), first["updates"]), encoding="utf-8")
        with client_for(server, **ORIGIN) as http:
            ack = {"client": CLIENT, "note": "Folder/figure.md", "run": first["run"], "via": "editor"}
            assert http.post("/api/v1/regions-applied", json=ack).json()["accepted"] is True

        # The figure changes: the old file stays while the note on disk still links it...
        text = note.read_text(encoding="utf-8")
        note.write_text(text.replace("png(10)", "png(200)"), encoding="utf-8")
        second = run_held()
        assert len(figures()) == 2 and one in figures()
        # ...and goes once the editor saved the new region and acknowledged it.
        note.write_text(apply_like_the_plugin(note.read_text(encoding="utf-8"), second["updates"]), encoding="utf-8")
        with client_for(server, **ORIGIN) as http:
            ack = {"client": CLIENT, "note": "Folder/figure.md", "run": second["run"], "via": "editor"}
            assert http.post("/api/v1/regions-applied", json=ack).json()["accepted"] is True
        deadline = time.monotonic() + WAIT
        while one in figures() and time.monotonic() < deadline:
            time.sleep(0.05)
        [two] = figures()
        assert two != one and two in note.read_text(encoding="utf-8")
    finally:
        editors(server, [])
        note.write_text(original, encoding="utf-8")


def test_the_editor_endpoints_pass_the_same_checks_as_every_request(api) -> None:
    server, _runner, _app, _root = api
    preflight = {**ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with client_for(server, token=None) as anonymous:
        for path in ("/api/v1/editors", "/api/v1/regions-applied", "/api/v1/events"):
            answer = anonymous.options(path, headers=preflight)
            assert answer.status_code == 204, path
            allowed = answer.headers["access-control-allow-headers"]
            assert {"Authorization", "Content-Type", "Last-Event-ID"} <= set(allowed.replace(" ", "").split(","))
        refused = anonymous.post("/api/v1/editors", json={"client": CLIENT, "open": []}, headers=ORIGIN)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    with client_for(server) as http:
        foreign = http.post("/api/v1/editors", json={"client": CLIENT, "open": []}, headers={"Origin": "https://a.b"})
        assert foreign.json()["error"]["code"] == "forbidden_origin"
        too_many = http.post("/api/v1/editors", json={"client": CLIENT, "open": [f"n{i}.md" for i in range(1001)]})
        assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "invalid_request"
        bad_client = http.post("/api/v1/editors", json={"client": "x", "open": []})
        assert bad_client.json()["error"]["code"] == "invalid_request"
        assert http.get("/api/v1/events", params={"client": "no spaces!"}).status_code == 422
        ack = {"client": CLIENT, "note": "../x.md", "run": "r-1", "via": "none"}
        outside = http.post("/api/v1/regions-applied", json=ack)
        assert outside.status_code == 400 and outside.json()["error"]["code"] == "invalid_path"
        unknown = http.post("/api/v1/regions-applied", json={**ack, "note": "held.md", "run": "r-999999"})
        assert unknown.json() == {"note": "held.md", "run": "r-999999", "accepted": False}


def test_an_explicit_run_puts_back_through_the_editor_the_outputs_it_never_applied(api) -> None:
    server, _runner, _app, root = api
    note = root / "Folder" / "lost.md"
    before = digest(note)
    try:
        with stream(server) as plugin, client_for(server, **ORIGIN) as http:
            editors(server, ["Folder/lost.md"])
            assert http.post("/api/v1/run", json={"note": "Folder/lost.md"}).json()["error"] is None
            assert plugin.wait(lambda: len(plugin.of("regions")) == 1)
            # The plugin never applied it (reloaded meanwhile, say): "Run note" puts the output back
            # from what ran in the kernel, without running it again, through the editor.
            again = http.post("/api/v1/run", json={"note": "Folder/lost.md"}).json()
            assert again["error"] is None and again["report"]["written"] is False
            assert plugin.wait(lambda: len(plugin.of("regions")) == 2)
            first, second = (d["data"]["updates"] for _, d in plugin.of("regions"))
            assert second == first and "kept in the kernel" in second[0]["region"]
            assert len([d for _, d in plugin.of("block-started") if d["note"] == "Folder/lost.md"]) == 1
        assert digest(note) == before
    finally:
        editors(server, [])
