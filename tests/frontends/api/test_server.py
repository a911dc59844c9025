"""The plugin API on a real uvicorn server on 127.0.0.1, driven with httpx, with real kernels.

One server (and its kernels) is shared by the tests of this module where sharing does not
weaken them; every server, runner and stream is stopped in a `finally`, also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, make_note_vault, using_config_dir
from vault_runner.disk import trust
from vault_runner.disk.vault import load_vault
from vault_runner.frontends.api.app import ApiApp, ApiServer, create_app
from vault_runner.live.runner import Runner

pytestmark = pytest.mark.kernel

WAIT = 120.0  # a guard against hanging, not a speed requirement
TOKEN = "test-token-" + "x" * 32


@contextmanager
def serving(
    root: Path,
    *,
    token: str = TOKEN,
    allowed_origins: tuple[str, ...] = (),
    max_kernels: int = 2,
    spares: int = 0,
    heartbeat: float = 0.2,
) -> Iterator[tuple[ApiServer, Runner, ApiApp]]:
    """A real Runner and a real uvicorn server for the vault at `root` (trusted), stopped on exit."""
    trust.trust(root)
    runner = Runner(load_vault(root), max_kernels=max_kernels, spares=spares, check_interval=0.5)
    server: ApiServer | None = None
    try:
        runner.start()
        app = create_app(runner, runner.vault, token, allowed_origins, heartbeat=heartbeat)
        server = ApiServer(app, port=0)
        server.start()
        yield server, runner, app
    finally:
        if server is not None:
            server.stop()
        runner.close()


def client_for(server: ApiServer, token: str | None = TOKEN, **headers: str) -> httpx.Client:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=server.url, headers=headers, timeout=WAIT)


class EventReader:
    """Reads the SSE stream in a thread; events are (arrival time, kind, data)."""

    def __init__(self, server: ApiServer, note: str | None = None) -> None:
        self.client = client_for(server)
        self.params = {"note": note} if note else {}
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.stop_flag = threading.Event()
        self.status: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        kind = "message"
        try:
            with self.client.stream("GET", "/api/v1/events", params=self.params) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if self.stop_flag.is_set():
                        return  # the keep-alive comments wake us often enough to notice
                    if line.startswith("event: "):
                        kind = line[len("event: ") :]
                    elif line.startswith("data: "):
                        with self.cond:
                            self.events.append((time.monotonic(), kind, json.loads(line[len("data: ") :])))
                            self.cond.notify_all()
        except httpx.HTTPError:
            pass
        finally:
            with self.cond:
                self.stop_flag.set()
                self.cond.notify_all()

    def start(self) -> EventReader:
        self.thread.start()
        assert self.wait(lambda: any(k == "ready" for _, k, _ in self.events)), "the stream never said ready"
        return self

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.stop_flag.is_set() and not predicate()):
                    return predicate()
                self.cond.wait(min(remaining, 0.2))
            return True

    def of(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        with self.cond:
            return [(t, d) for t, k, d in self.events if k == kind]

    def close(self) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=30)
        self.client.close()


@contextmanager
def reading(server: ApiServer, note: str | None = None) -> Iterator[EventReader]:
    reader = EventReader(server, note)
    try:
        yield reader.start()
    finally:
        reader.close()


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


class Call(threading.Thread):
    """A request in the background (runs that block until they finish)."""

    def __init__(self, server: ApiServer, path: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.server, self.path, self.body = server, path, body
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with client_for(self.server) as client:
                self.response = client.post(self.path, json=self.body)
        except BaseException as exc:
            self.error = exc

    def result(self) -> httpx.Response:
        self.join(WAIT)
        assert self.error is None, self.error
        assert self.response is not None, "the request never answered"
        return self.response


NOTES = {
    "quick.md": """
        ---
        vault-runner: true
        ---
        # Quick

        ```python
        print("hello")
        ```

        ```python
        1 + 1
        ```
        """,
    "counter.md": """
        ---
        vault-runner: true
        ---
        ```python
        counter = []
        ```

        Some prose.

        ```python
        counter.append(1)
        len(counter)
        ```
        """,
    "long.md": """
        ---
        vault-runner: true
        ---
        ```python
        import time
        print("first", flush=True)
        time.sleep(1)
        print("second")
        ```
        """,
    "loop.md": """
        ---
        vault-runner: true
        ---
        ```python
        import time
        print("started", flush=True)
        while True:
            time.sleep(0.05)
        ```

        ```python
        print("after the loop")
        ```
        """,
    "Sub/napping.md": """
        ---
        vault-runner: true
        ---
        ```python
        import time
        print("napping", flush=True)
        time.sleep(3)
        ```
        """,
    "Sub/dozing.md": """
        ---
        vault-runner: true
        ---
        ```python
        import time
        print("dozing", flush=True)
        time.sleep(3)
        ```
        """,
    "faults.md": """
        ---
        vault-runner: true
        ---
        ```python
        raise ValueError("bad input")
        ```
        """,
    "slow.md": """
        ---
        vault-runner: true
        ---
        ```python
        #| timeout: 1
        import time
        time.sleep(60)
        ```
        """,
    "dies.md": """
        ---
        vault-runner: true
        ---
        ```python
        import os
        os._exit(1)
        ```
        """,
    "private.md": """
        # Not opted in

        ```python
        open("ran-private.txt", "w").write("it ran")
        ```
        """,
}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, Runner, Path]]:
    root = make_note_vault(tmp_path_factory.mktemp("vault"), NOTES)
    with using_config_dir(tmp_path_factory.mktemp("config")):
        with serving(root) as (server, runner, _app):
            yield server, runner, root


@pytest.fixture(autouse=True)
def _trusted(request: pytest.FixtureRequest, _isolated_config: None) -> None:
    """Each test gets a fresh config dir (conftest): trust the shared vault in it too."""
    if "api" in request.fixturenames:
        trust.trust(request.getfixturevalue("api")[2])


def post(server: ApiServer, path: str, body: dict[str, Any]) -> httpx.Response:
    with client_for(server) as client:
        return client.post(path, json=body)


def block_outputs(response: httpx.Response) -> list[list[dict[str, Any]]]:
    return [b["outputs"] for b in response.json()["report"]["blocks"]]


# -- runs -----------------------------------------------------------------------------------
def test_run_note_writes_outputs_into_the_note_and_returns_them(api) -> None:
    server, _runner, root = api
    response = post(server, "/api/v1/run", {"note": "quick.md"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "finished" and body["error"] is None
    report = body["report"]
    assert report["note"] == "quick.md" and report["status"] == "ran" and report["written"] is True
    assert [b["status"] for b in report["blocks"]] == ["ok", "ok"]
    printed, result = block_outputs(response)
    # A print may come as several stream chunks, as Jupyter sends them.
    assert {o["type"] for o in printed} == {"stream"} and "".join(o["text"] for o in printed) == "hello\n"
    assert result == [{"type": "execute_result", "mime": ["text/plain"], "text": "2"}]
    text = (root / "quick.md").read_text(encoding="utf-8")
    assert "vault-runner:output" in text and "\nhello\n" in text and "\n2\n" in text

    with client_for(server) as client:
        results = client.get("/api/v1/results", params={"note": "quick.md"})
    assert results.status_code == 200, results.text
    data = results.json()
    assert data["source"] == "last-run" and data["up_to_date"] is True and data["opted_in"] is True
    assert data["report"] == report


def test_results_before_any_run_come_from_the_note(api) -> None:
    server, _runner, root = api
    with client_for(server) as client:
        response = client.get("/api/v1/results", params={"note": "private.md"})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["source"] == "note" and data["opted_in"] is False and data["up_to_date"] is False
    assert [b["status"] for b in data["report"]["blocks"]] == ["stale"]
    assert not (root / "ran-private.txt").exists()


def test_run_block_by_index_and_by_line_reuses_the_warm_kernel_and_run_all_starts_fresh(api) -> None:
    server, _runner, root = api
    first = post(server, "/api/v1/run", {"note": "counter.md"})
    assert first.status_code == 200, first.text
    assert block_outputs(first)[1] == [{"type": "execute_result", "mime": ["text/plain"], "text": "1"}]

    again = post(server, "/api/v1/run-block", {"note": "counter.md", "index": 1})
    assert again.status_code == 200, again.text
    assert again.json()["report"]["blocks"][1]["outputs"][0]["text"] == "2"  # same kernel: state kept

    lines = (root / "counter.md").read_text(encoding="utf-8").split("\n")
    line = next(n for n, text in enumerate(lines, 1) if text == "len(counter)")
    by_line = post(server, "/api/v1/run-block", {"note": "counter.md", "line": line})
    assert by_line.status_code == 200, by_line.text
    assert by_line.json()["report"]["blocks"][1]["outputs"][0]["text"] == "3"
    assert "\n3\n" in (root / "counter.md").read_text(encoding="utf-8")

    fresh = post(server, "/api/v1/run-all", {"note": "counter.md"})
    assert fresh.status_code == 200, fresh.text
    assert [b["status"] for b in fresh.json()["report"]["blocks"]] == ["ok", "ok"]
    assert fresh.json()["report"]["blocks"][1]["outputs"][0]["text"] == "1"  # a new kernel, from the top


def test_asking_for_a_block_that_is_not_there(api) -> None:
    server, _runner, _root = api
    by_index = post(server, "/api/v1/run-block", {"note": "quick.md", "index": 7})
    assert by_index.status_code == 404 and by_index.json()["error"]["code"] == "unknown_block"
    by_line = post(server, "/api/v1/run-block", {"note": "quick.md", "line": 1})
    assert by_line.status_code == 404 and by_line.json()["error"]["code"] == "unknown_block"
    neither = post(server, "/api/v1/run-block", {"note": "quick.md"})
    assert neither.status_code == 422 and neither.json()["error"]["code"] == "invalid_request"


def test_a_note_that_does_not_opt_in_is_refused_and_not_run(api) -> None:
    server, runner, root = api
    before = (root / "private.md").read_bytes()
    response = post(server, "/api/v1/run", {"note": "private.md"})
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "not_opted_in" and "vault-runner: true" in error["message"]
    assert (root / "private.md").read_bytes() == before
    assert not (root / "ran-private.txt").exists()
    assert "private.md" not in json.dumps(runner.status())


@pytest.mark.parametrize(
    ("note", "code", "status", "words"),
    [
        ("faults.md", "block_error", "error", "ValueError: bad input"),
        ("slow.md", "timeout", "timeout", "timeout"),
        ("dies.md", "kernel_died", "dead", "kernel died"),
    ],
)
def test_a_run_that_goes_wrong_answers_its_report_with_a_stable_error_code(
    api, note: str, code: str, status: str, words: str
) -> None:
    server, _runner, root = api
    response = post(server, "/api/v1/run-all", {"note": note})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["report"]["blocks"][0]["status"] == status
    assert body["error"]["code"] == code
    assert body["error"]["message"].startswith(f"{note}:") and words in body["error"]["message"]
    assert "vault-runner:output" in (root / note).read_text(encoding="utf-8")  # the note says so too


def test_unknown_note(api) -> None:
    server, _runner, _root = api
    response = post(server, "/api/v1/run", {"note": "Nowhere/missing.md"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_note"
    assert "missing.md" in response.json()["error"]["message"]


# -- the event stream -----------------------------------------------------------------------
def test_event_stream_shows_a_long_blocks_output_before_it_finishes_and_edits_made_meanwhile_are_kept(
    api,
) -> None:
    server, runner, root = api
    note = root / "long.md"
    with reading(server, note="long.md") as events:
        queued = post(server, "/api/v1/run", {"note": "long.md", "wait": False})
        assert queued.status_code == 202, queued.text
        assert queued.json() == {"note": "long.md", "state": "queued", "report": None, "error": None}

        def printed(word: str) -> bool:
            return any(d["data"].get("text", "").startswith(word) for _, d in events.of("output"))

        assert events.wait(lambda: printed("first")), events.events
        # The user keeps typing while the block runs: prose added now must survive the write-back.
        with open(note, "a", encoding="utf-8") as handle:
            handle.write("\nTyped while it ran.\n")
        assert events.wait(lambda: bool(events.of("note-finished"))), events.events

    first_at = next(t for t, d in events.of("output") if d["data"]["text"].startswith("first"))
    second_at = next(t for t, d in events.of("output") if "second" in d["data"]["text"])
    finished_at, finished = events.of("block-finished")[0]
    assert events.of("block-started")[0][0] <= first_at < second_at <= finished_at
    # "first" arrived while the block still slept: a second before it finished, not with it.
    assert finished_at - first_at >= 0.5
    assert finished["data"]["status"] == "ok" and finished["note"] == "long.md" and finished["index"] == 0
    kinds = [k for _, k, _ in events.events]
    assert kinds.index("note-written") < kinds.index("note-finished")
    assert all(d["note"] == "long.md" for _, k, d in events.events if k not in ("ready",))
    runner.wait_idle(WAIT)
    text = note.read_text(encoding="utf-8")
    assert "Typed while it ran." in text and "first\nsecond" in text


def test_a_client_that_drops_the_stream_mid_run_leaves_the_server_healthy(api) -> None:
    server, _runner, _root = api
    with client_for(server) as client:
        with client.stream("GET", "/api/v1/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            # run-block: it runs even though an earlier test left the note's outputs current.
            queued = post(server, "/api/v1/run-block", {"note": "long.md", "index": 0, "wait": False})
            assert queued.status_code == 202
            for line in response.iter_lines():
                assert not line.startswith("event: note-finished"), "the run ended without any output"
                if line.startswith("event: output"):
                    break  # drop it mid-run, in the middle of a block's output
        # The server notices the client is gone and forgets the stream.
        wait_until(lambda: client.get("/api/v1/status").json()["streams"] == 0, "the dropped stream to be closed")
        status = client.get("/api/v1/status")
        assert status.status_code == 200
        run = client.post("/api/v1/run-block", json={"note": "quick.md", "index": 0})
        assert run.status_code == 200 and run.json()["report"]["blocks"][0]["status"] == "ok"


# -- stopping runs --------------------------------------------------------------------------
def test_interrupt_stops_a_running_block_and_cancel_drops_queued_runs(api) -> None:
    server, runner, root = api
    with reading(server, note="loop.md") as events:
        running = Call(server, "/api/v1/run", {"note": "loop.md"})
        running.start()
        assert events.wait(lambda: bool(events.of("output"))), events.events
        # Two identical runs queue behind it, as one run (issue 9.11): one answered at once (202),
        # one waiting for its result.
        assert post(server, "/api/v1/run-all", {"note": "loop.md", "wait": False}).status_code == 202
        waiting = Call(server, "/api/v1/run-all", {"note": "loop.md"})
        waiting.start()
        wait_until(lambda: _queued_requests(runner, "loop.md") == [2], "the second run to join the queued one")

        cancel = post(server, "/api/v1/cancel", {"note": "loop.md"})
        assert cancel.status_code == 200 and cancel.json() == {"note": "loop.md", "cancelled": True}
        cancelled = waiting.result()
        assert cancelled.status_code == 409 and cancelled.json()["error"]["code"] == "cancelled"
        assert running.response is None  # the block running still runs: cancel only drops what waits

        stop = post(server, "/api/v1/interrupt", {"note": "loop.md"})
        assert stop.status_code == 200 and stop.json() == {"note": "loop.md", "interrupted": True}
        response = running.result()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["error"]["code"] == "interrupted"
    blocks = body["report"]["blocks"]
    assert blocks[0]["status"] == "error"
    assert any(o.get("ename") == "KeyboardInterrupt" for o in blocks[0]["outputs"])
    assert blocks[1]["status"] == "skipped"
    runner.wait_idle(WAIT)
    text = (root / "loop.md").read_text(encoding="utf-8")
    assert "KeyboardInterrupt" in text
    assert text.count("after the loop") == 1  # only its code: the block after the loop never ran

    nothing = post(server, "/api/v1/interrupt", {"note": "loop.md"})
    assert nothing.json() == {"note": "loop.md", "interrupted": False}


def _queued_requests(runner: Runner, note: str) -> list[int]:
    # Runner.status() says "running" for a note with a run and a queue; the queue itself is
    # only in its session (session.py), read here for the test's sake: per queued run, the
    # number of requests it serves.
    for session in list(runner._sessions.values()):
        if session.relative() == note:
            return [len(request.futures) for request in list(session.queue)]
    return []


def test_restart_shuts_the_notes_kernel_down(api) -> None:
    server, runner, _root = api
    assert post(server, "/api/v1/run-block", {"note": "counter.md", "index": 1}).status_code == 200
    assert any(a["note"] == "counter.md" for a in runner.status()["pool"]["assigned"])
    response = post(server, "/api/v1/restart", {"note": "counter.md"})
    assert response.status_code == 200 and response.json() == {"note": "counter.md", "restarted": True}
    assert not any(a["note"] == "counter.md" for a in runner.status()["pool"]["assigned"])
    # Its next run starts from the top: `counter` no longer exists until block 0 runs again.
    after = post(server, "/api/v1/run-block", {"note": "counter.md", "index": 1})
    assert after.json()["report"]["blocks"][1]["outputs"][0]["text"] == "1"


def test_different_notes_run_in_parallel(api) -> None:
    server, runner, _root = api
    notes = {"Sub/napping.md", "Sub/dozing.md"}
    seen_together = False
    with client_for(server) as client:
        for note in sorted(notes):
            assert client.post("/api/v1/run-all", json={"note": note, "wait": False}).status_code == 202
        deadline = time.monotonic() + WAIT
        while not seen_together and time.monotonic() < deadline:
            status = client.get("/api/v1/status").json()
            seen_together = {r["note"] for r in status["running"]} == notes
            time.sleep(0.05)
    runner.wait_idle(WAIT)
    assert seen_together, "the two notes never ran at the same time"


def test_status_reports_kernels_sandbox_devices_and_versions(api) -> None:
    server, _runner, root = api
    with client_for(server) as client:
        status = client.get("/api/v1/status").json()
    assert status["vault"] == str(root.resolve()) and status["trusted"] is True
    assert status["kernels"]["max_kernels"] == 2
    assert status["sandbox"]["tier"] in {"bubblewrap", "landlock", "plain"}
    assert status["versions"]["vault_runner"] and status["versions"]["fastapi"]
    assert isinstance(status["devices"]["gpus"], list)


def test_the_committed_openapi_document_is_the_served_one(api) -> None:
    server, _runner, _root = api
    with client_for(server) as client:
        served = client.get("/openapi.json")
    assert served.status_code == 200
    committed = json.loads((REPO / "docs" / "openapi.json").read_text(encoding="utf-8"))
    assert served.json() == committed, (
        "docs/openapi.json is out of date: python -m vault_runner.frontends.api.app > docs/openapi.json"
    )


# -- the command ----------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_announces_its_port_and_token_file_and_cleans_up_on_signal(tmp_path: Path, sig: int) -> None:
    root = make_note_vault(tmp_path / "vault", {"a.md": NOTES["quick.md"]})
    config = Path(os.environ["VAULT_RUNNER_CONFIG_DIR"])
    trust.trust(root)
    env = {**os.environ, "VAULT_RUNNER_CONFIG_DIR": str(config)}
    process = subprocess.Popen(
        [sys.executable, "-m", "vault_runner", "serve", str(root), "--port", "0", "--warm", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        info = json.loads(line)
        server_file = Path(info["server_file"])
        assert server_file.parent == config / "servers"
        assert json.loads(server_file.read_text(encoding="utf-8")) == info
        assert info["pid"] == process.pid and info["url"] == f"http://127.0.0.1:{info['port']}"
        token_file = Path(info["token_file"])
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text(encoding="ascii").strip()
        with httpx.Client(base_url=info["url"], timeout=WAIT) as client:
            assert client.get("/api/v1/status").status_code == 401
            status = client.get("/api/v1/status", headers={"Authorization": f"Bearer {token}"})
        assert status.status_code == 200 and status.json()["watching"] is True
        process.send_signal(sig)
        assert process.wait(WAIT) == 0
        assert not server_file.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_serve_refuses_an_untrusted_vault(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "vault", {"a.md": NOTES["quick.md"]})
    done = subprocess.run(
        [sys.executable, "-m", "vault_runner", "serve", str(root), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 2
    assert "not trusted" in done.stderr and "vault-runner trust" in done.stderr
    assert not (Path(os.environ["VAULT_RUNNER_CONFIG_DIR"]) / "servers").exists()
