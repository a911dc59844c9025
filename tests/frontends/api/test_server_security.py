"""The API's security on a real uvicorn server: token, Host, Origin, bodies, paths, trust.

The vault's notes would leave a marker file if they ever ran, and the server keeps no
warm kernel (spares=0), so "nothing executed" is checked three ways: the marker files do
not exist, the target files are byte-identical, and the kernel pool never started one.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_note_vault, using_config_dir
from tests.frontends.api.test_server import TOKEN, client_for, serving
from vault_runner.disk import trust
from vault_runner.disk.vault import load_vault
from vault_runner.frontends.api.app import ApiServer
from vault_runner.frontends.api.security import (
    PathRefused,
    load_or_create_token,
    normalize_origin,
    resolve_note,
    token_matches,
)
from vault_runner.live.runner import Runner

EXTRA_ORIGIN = "http://localhost:5173"


def marker_note(marker: str) -> str:
    return f"""
        ---
        vault-runner: true
        ---
        ```python
        import pathlib
        pathlib.Path({marker!r}).write_text("it ran")
        ```
        """


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("security")
    outside = base / "outside"
    make_note_vault(outside, {"secret.md": marker_note(str(base / "outside-ran.txt"))})
    root = make_note_vault(base / "vault", {"victim.md": marker_note(str(base / "victim-ran.txt"))})
    (root / "link.md").symlink_to(outside / "secret.md")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    with using_config_dir(tmp_path_factory.mktemp("config")):
        with serving(root, allowed_origins=(EXTRA_ORIGIN,), spares=0) as (server, runner, app):
            yield {"server": server, "runner": runner, "app": app, "root": root, "base": base, "outside": outside}


@pytest.fixture(autouse=True)
def _trusted(request: pytest.FixtureRequest, _isolated_config: None) -> None:
    if "secured" in request.fixturenames:
        trust.trust(request.getfixturevalue("secured")["root"])


def snapshot(ctx: dict[str, Any]) -> dict[str, bytes]:
    return {
        "victim": (ctx["root"] / "victim.md").read_bytes(),
        "secret": (ctx["outside"] / "secret.md").read_bytes(),
    }


def assert_nothing_ran(ctx: dict[str, Any], before: dict[str, bytes]) -> None:
    assert snapshot(ctx) == before
    assert not (ctx["base"] / "victim-ran.txt").exists()
    assert not (ctx["base"] / "outside-ran.txt").exists()
    status = ctx["runner"].status()
    assert status["pool"]["kernels"] == 0 and status["pool"]["starting"] == 0, status
    assert status["notes"] == [], status


def raw_request(server: ApiServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        return client.request(method, path, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert response.headers.get("access-control-allow-origin") != "*"


AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUN = {"note": "victim.md"}


# -- the token ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-" + "y" * 32},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"X-Api-Token": TOKEN},
    ],
    ids=["none", "wrong", "truncated", "basic-scheme", "no-scheme", "other-header"],
)
def test_without_the_right_token_nothing_runs(secured, headers: dict[str, str]) -> None:
    before = snapshot(secured)
    server = secured["server"]
    response = raw_request(server, "POST", "/api/v1/run", json=RUN, headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")
    for path in ("/api/v1/status", "/openapi.json", f"/api/v1/results?note=victim.md&token={TOKEN}"):
        assert_error(raw_request(server, "GET", path, headers=headers), 401, "unauthorized")
    assert_nothing_ran(secured, before)


def test_the_token_passes(secured) -> None:
    response = raw_request(secured["server"], "GET", "/api/v1/status", headers=AUTH)
    assert response.status_code == 200 and response.json()["trusted"] is True


# -- Host (DNS rebinding) -------------------------------------------------------------------
@pytest.mark.parametrize(
    "host",
    ["evil.example:{port}", "evil.example", "127.0.0.1", "localhost", "127.0.0.1:1", "localhost.evil:{port}", ""],
)
def test_a_foreign_host_header_is_refused(secured, host: str) -> None:
    before = snapshot(secured)
    server = secured["server"]
    headers = {**AUTH, "Host": host.format(port=server.port)}
    assert_error(raw_request(server, "POST", "/api/v1/run", json=RUN, headers=headers), 403, "forbidden_host")
    assert_error(raw_request(server, "GET", "/api/v1/status", headers=headers), 403, "forbidden_host")
    assert_nothing_ran(secured, before)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST:{port}"])
def test_the_loopback_host_names_pass(secured, host: str) -> None:
    server = secured["server"]
    headers = {**AUTH, "Host": host.format(port=server.port)}
    assert raw_request(server, "GET", "/api/v1/status", headers=headers).status_code == 200


# -- Origin and CORS ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://127.0.0.1:8000", "app://obsidian.md.evil.example", "https://obsidian.md"],
)
def test_a_foreign_origin_is_refused_even_with_the_token(secured, origin: str) -> None:
    before = snapshot(secured)
    server = secured["server"]
    headers = {**AUTH, "Origin": origin}
    response = raw_request(server, "POST", "/api/v1/run", json=RUN, headers=headers)
    assert_error(response, 403, "forbidden_origin")
    assert "access-control-allow-origin" not in response.headers
    preflight = raw_request(
        server,
        "OPTIONS",
        "/api/v1/run",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert_error(preflight, 403, "forbidden_origin")
    assert "access-control-allow-origin" not in preflight.headers
    assert_nothing_ran(secured, before)


@pytest.mark.parametrize("origin", ["app://obsidian.md", EXTRA_ORIGIN])
def test_obsidian_and_configured_origins_get_cors_headers_that_echo_them(secured, origin: str) -> None:
    server = secured["server"]
    preflight = raw_request(
        server,
        "OPTIONS",
        "/api/v1/run",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
            "Access-Control-Request-Private-Network": "true",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert preflight.headers["vary"] == "Origin"
    response = raw_request(server, "GET", "/api/v1/status", headers={**AUTH, "Origin": origin})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == origin
    # The token is still required from an allowed origin.
    no_token = raw_request(server, "GET", "/api/v1/status", headers={"Origin": origin})
    assert_error(no_token, 401, "unauthorized")
    assert no_token.headers["access-control-allow-origin"] == origin  # so the plugin can read why


def test_origins_are_checked_when_configured() -> None:
    assert normalize_origin("HTTP://LocalHost:5173/") == "http://localhost:5173"
    for bad in ("*", "localhost:5173", "http://", "http://a/b", "null"):
        with pytest.raises(ValueError):
            normalize_origin(bad)


# -- bodies ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        ('{"note": "victim.md"}', "text/plain"),
        ("note=victim.md", "application/x-www-form-urlencoded"),
        ('{"note": "victim.md"}', "multipart/form-data; boundary=x"),
        ('{"note": "victim.md"}', None),
    ],
)
def test_only_json_bodies_are_accepted(secured, content: str, content_type: str | None) -> None:
    before = snapshot(secured)
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = raw_request(secured["server"], "POST", "/api/v1/run", content=content, headers=headers)
    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_ran(secured, before)


def test_a_body_over_the_limit_is_refused(secured) -> None:
    before = snapshot(secured)
    server = secured["server"]
    big = '{"note": "victim.md", "pad": "' + "x" * 70_000 + '"}'
    headers = {**AUTH, "Content-Type": "application/json"}
    assert_error(raw_request(server, "POST", "/api/v1/run", content=big, headers=headers), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        data = big.encode()
        for start in range(0, len(data), 8192):
            yield data[start : start + 8192]

    chunked = raw_request(server, "POST", "/api/v1/run", content=chunks(), headers=headers)
    assert_error(chunked, 413, "payload_too_large")
    assert_nothing_ran(secured, before)


@pytest.mark.parametrize(
    "body",
    ['{"note": ', "[]", '{"note": "victim.md", "extra": 1}', '{"note": 5}', '{"note": "victim.md", "wait": "no"}'],
)
def test_malformed_json_is_a_clear_422(secured, body: str) -> None:
    before = snapshot(secured)
    headers = {**AUTH, "Content-Type": "application/json"}
    response = raw_request(secured["server"], "POST", "/api/v1/run", content=body, headers=headers)
    assert_error(response, 422, "invalid_request")
    assert "JSON decode error" not in response.text
    assert_nothing_ran(secured, before)


@pytest.mark.parametrize(
    ("path", "body", "said"),
    [
        ("/api/v1/run-block", {"note": "victim.md", "index": -1}, "`index` must be greater than or equal to 0"),
        ("/api/v1/run-block", {"note": "victim.md", "line": 0}, "`line` must be greater than or equal to 1"),
        ("/api/v1/run-block", {"note": "victim.md"}, "give `index` or `line`"),
        ("/api/v1/run-block", {"note": "victim.md", "index": "1"}, "`index` must be a valid integer"),
        ("/api/v1/run-block", [1, 2], 'the request body must be a JSON object such as {"note": "a.md"}'),
        ("/api/v1/run", {"note": "victim.md", "wait": "no"}, "`wait` must be a valid boolean"),
        ("/api/v1/run", {"note": "victim.md", "extra": 1}, "`extra` is not a field of this request"),
    ],
)
def test_an_invalid_request_says_what_to_fix_in_the_requests_words(secured, path: str, body: object, said: str) -> None:
    """Issue 15 review: messages named pydantic models (`BlockByIndex.index: ...`) and said
    `Input should be a valid dictionary` of a list."""
    before = snapshot(secured)
    headers = {**AUTH, "Content-Type": "application/json"}
    response = raw_request(secured["server"], "POST", path, content=json.dumps(body), headers=headers)
    assert_error(response, 422, "invalid_request")
    message = response.json()["error"]["message"]
    assert message == f"invalid request: {said}", message
    assert_nothing_ran(secured, before)


def test_unknown_routes_and_methods_answer_in_the_error_shape(secured) -> None:
    server = secured["server"]
    assert_error(raw_request(server, "GET", "/api/v1/nope", headers=AUTH), 404, "not_found")
    assert_error(raw_request(server, "GET", "/api/v1/run", headers=AUTH), 405, "method_not_allowed")
    assert_error(raw_request(server, "GET", "/docs", headers=AUTH), 404, "not_found")  # no Swagger UI


# -- paths ----------------------------------------------------------------------------------
BAD_PATHS = [
    "../outside/secret.md",
    "victim.md/../../outside/secret.md",
    "{outside}/secret.md",  # absolute
    "/victim.md",
    "link.md",  # a symlink in the vault pointing out of it
    "linkdir/secret.md",  # through a symlinked folder
    ".obsidian/app.md",
    "./victim.md",
    "victim.md\x00.md",
    "C:/Windows/x.md",
    ".hidden/x.md",
    "a//b.md",
    "..\\outside\\secret.md",
    "victim",
    "",
]


@pytest.mark.parametrize("raw", BAD_PATHS, ids=range(len(BAD_PATHS)))
def test_paths_outside_the_vault_are_refused_and_nothing_runs(secured, raw: str) -> None:
    before = snapshot(secured)
    server = secured["server"]
    note = raw.format(outside=secured["outside"])
    with client_for(server) as client:
        for path, body in [
            ("/api/v1/run", {"note": note}),
            ("/api/v1/run-all", {"note": note}),
            ("/api/v1/run-block", {"note": note, "index": 0}),
            ("/api/v1/interrupt", {"note": note}),
            ("/api/v1/restart", {"note": note}),
            ("/api/v1/cancel", {"note": note}),
        ]:
            response = client.post(path, json=body)
            # The documented code the plugin branches on (issue 9.9), in words, not a regex.
            assert response.status_code == 400, (path, response.text)
            assert response.json()["error"]["code"] == "invalid_path", (path, response.text)
            assert "pattern" not in response.json()["error"]["message"], response.text
        for path in ("/api/v1/results", "/api/v1/events"):
            response = client.get(path, params={"note": note})
            assert 400 <= response.status_code < 500, (path, response.text)
    assert_nothing_ran(secured, before)


def test_resolve_note_keeps_paths_inside_the_vault(secured) -> None:
    vault = load_vault(secured["root"])
    assert resolve_note(vault, "victim.md") == secured["root"].resolve() / "victim.md"
    for raw in BAD_PATHS:
        with pytest.raises(PathRefused) as refused:
            resolve_note(vault, raw.format(outside=secured["outside"]))
        assert refused.value.code == "invalid_path", raw
    with pytest.raises(PathRefused) as missing:
        resolve_note(vault, "Nowhere/missing.md")
    assert missing.value.code == "unknown_note"


# -- trust ----------------------------------------------------------------------------------
def test_an_untrusted_vault_runs_nothing(secured) -> None:
    before = snapshot(secured)
    trust.untrust(secured["root"])
    try:
        for path, body in [
            ("/api/v1/run", RUN),
            ("/api/v1/run-all", RUN),
            ("/api/v1/run-block", {**RUN, "index": 0}),
        ]:
            response = raw_request(secured["server"], "POST", path, json=body, headers=AUTH)
            assert_error(response, 403, "vault_not_trusted")
            assert "vault-runner trust" in response.json()["error"]["message"]
        status = raw_request(secured["server"], "GET", "/api/v1/status", headers=AUTH)
        assert status.json()["trusted"] is False
    finally:
        trust.trust(secured["root"])
    assert_nothing_ran(secured, before)


def test_a_runner_on_an_untrusted_vault_does_not_start(tmp_path: Path) -> None:
    from vault_runner.errors import UntrustedVault

    root = make_note_vault(tmp_path / "vault", {"victim.md": marker_note(str(tmp_path / "ran.txt"))})
    runner = Runner(load_vault(root), spares=0)
    try:
        with pytest.raises(UntrustedVault):
            runner.start()
    finally:
        runner.close()


def test_refusals_are_counted_in_status(secured) -> None:
    server = secured["server"]
    before = raw_request(server, "GET", "/api/v1/status", headers=AUTH).json()["refused"]
    raw_request(server, "GET", "/api/v1/status", headers={**AUTH, "Origin": "http://evil.example"})
    after = raw_request(server, "GET", "/api/v1/status", headers=AUTH).json()["refused"]
    assert after.get("forbidden_origin", 0) == before.get("forbidden_origin", 0) + 1


# -- the token file -------------------------------------------------------------------------
def test_the_token_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "config" / "api-token"
    token, where = load_or_create_token(path)
    assert where == path and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path)[0] == token
    os.chmod(path, 0o644)  # someone loosened it: narrowed again
    assert load_or_create_token(path)[0] == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")  # garbage: replaced by a fresh token
    fresh, _ = load_or_create_token(path)
    assert fresh != token and len(fresh) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_token_is_compared_whole() -> None:
    token = "a" * 43
    assert token_matches(f"Bearer {token}", token)
    assert token_matches(f"bearer {token}", token)
    assert not token_matches(f"Bearer {token}a", token)
    assert not token_matches(f"Bearer {token[:-1]}", token)
    assert not token_matches("Bearer ", token)
    assert not token_matches(None, token)
    assert not token_matches(f"Bearer {'é' * 43}", token)


def test_an_origin_sent_in_capitals_is_echoed_in_its_canonical_form(secured) -> None:
    response = raw_request(secured["server"], "GET", "/api/v1/status", headers={**AUTH, "Origin": "APP://OBSIDIAN.MD"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "app://obsidian.md"
