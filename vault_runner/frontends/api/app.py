"""The localhost API an Obsidian plugin drives: the app, its error answers, its OpenAPI document.

`create_app` puts the routes (routes.py) behind the security middleware (security.py):
every request passes the token, Host and Origin checks, JSON-only bodies and note paths
kept inside the vault before it reaches a route. `ApiServer` serves the app with uvicorn on
127.0.0.1 in a background thread.

Errors are JSON `{"error": {"code": ..., "message": ...}}` with a stable code (codes.py)
and a one-line message a plugin can show as it is.

`python -m vault_runner.frontends.api.app` prints the OpenAPI document (docs/openapi.json).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from vault_runner import __version__
from vault_runner.disk.vault import Vault
from vault_runner.errors import ApiError
from vault_runner.frontends.api import schemas
from vault_runner.frontends.api.codes import error_json, http_status
from vault_runner.frontends.api.editors import EditorRegistry, editors_router
from vault_runner.frontends.api.events import HEARTBEAT_SECONDS, MAX_STREAMS, EventHub
from vault_runner.frontends.api.routes import router, versions
from vault_runner.frontends.api.security import SecurityMiddleware
from vault_runner.live.runner import Runner

__all__ = ("ApiApp", "ApiServer", "create_app", "main", "openapi_spec")


# The request models, whose names pydantic puts in the place of a field when a body may be
# one of several (run-block: by index or by line); a client never sees those names.
_MODELS = frozenset(
    name for name, value in vars(schemas).items() if isinstance(value, type) and issubclass(value, BaseModel)
)
_MISFIT = ("missing", "extra_forbidden")  # the body is another shape, rather than a wrong value


def validation_problems(errors: Sequence[Any]) -> list[str]:
    """What is wrong with a request, in the request's own words: its fields, never a model.

    A body that may be one of several shapes is judged as the shape it comes closest to
    (fewest missing or unknown fields); when several are as close, the fields each misses
    are offered as alternatives (`give `index` or `line``)."""
    shapes: dict[str, list[tuple[str, Any]]] = {}
    for error in errors:
        where = [str(part) for part in error.get("loc", ()) if part not in ("body", "query")]
        shape = where.pop(0) if where and where[0] in _MODELS else ""
        shapes.setdefault(shape, []).append((".".join(where), error))
    misfits = {shape: sum(e.get("type") in _MISFIT for _, e in found) for shape, found in shapes.items()}
    closest = [found for shape, found in shapes.items() if misfits[shape] == min(misfits.values())]
    problems: list[str] = []
    alternatives: list[str] = []
    for found in closest:
        for where, error in found:
            if error.get("type") == "missing" and len(closest) > 1:
                alternatives.append(f"`{where}`")
                continue
            problem = _problem(where, error)
            if problem not in problems:
                problems.append(problem)
    if alternatives:
        problems.append("give " + " or ".join(dict.fromkeys(alternatives)))
    return problems[:3]


def _problem(where: str, error: Any) -> str:
    kind, said = error.get("type"), str(error.get("msg", "is not valid"))
    if not where:
        return 'the request body must be a JSON object such as {"note": "a.md"}'
    if kind == "missing":
        return f"`{where}` is missing"
    if kind == "extra_forbidden":
        return f"`{where}` is not a field of this request"
    if said.startswith("Input should be "):
        return f"`{where}` must be {said.removeprefix('Input should be ')}"
    return f"`{where}`: {said}"


def _handlers(app: FastAPI) -> None:
    def reply(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_json(code, message), status_code=http_status(code), headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return reply(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        for error in errors:
            if error.get("type") == "json_invalid":
                return reply(
                    "invalid_request", 'the request body is not valid JSON; send a JSON object such as {"note": "a.md"}'
                )
            if tuple(error.get("loc", ()))[-1:] == ("note",) and isinstance(error.get("input"), str):
                # The schema's pattern is for machines; a note-taker gets the documented code and words.
                return reply(
                    "invalid_path",
                    f"{error['input'][:200]!r}: is not a note path; give the note's path inside the vault, "
                    "relative and /-separated, ending in .md (no `..`, no hidden folder, no backslash)",
                )
        return reply("invalid_request", "invalid request: " + "; ".join(validation_problems(errors)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            return reply("method_not_allowed", f"{request.method} is not allowed here", headers)
        if exc.status_code == 404:
            return reply("not_found", f"{request.url.path}: there is no such endpoint; see /openapi.json", headers)
        return reply("invalid_request", str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return reply("internal_error", f"vault-runner failed on this request ({exc!r}); please report it")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with our error shape for 422 and the bearer scheme declared."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    spec = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses["422"] = {
                "description": "invalid_request, invalid_note",
                "content": {"application/json": {"schema": error_ref}},
            }
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    spec["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "The token in the file named by `token_file` in the server file "
            "(<config dir>/servers/<vault hash>.json).",
        }
    }
    spec["security"] = [{"bearer": []}]
    app.openapi_schema = spec
    return spec


_DESCRIPTION = (
    "The localhost API of `vault-runner serve VAULT`, for the Obsidian plugin. Bound to 127.0.0.1 only. "
    "Every request needs `Authorization: Bearer <token>`, a Host of `127.0.0.1:PORT`, `localhost:PORT` "
    "or `[::1]:PORT`, and, when it has an Origin, `app://obsidian.md` or an origin given with "
    '`--allow-origin`. Bodies are JSON (at most 64 KiB). Errors are `{"error": {"code", "message"}}`.'
)


def _make_app() -> FastAPI:
    app = FastAPI(
        title="vault-runner",
        version=__version__,
        description=_DESCRIPTION,
        docs_url=None,  # Swagger UI loads scripts from a CDN: not on a server that runs code
        redoc_url=None,
        openapi_tags=[
            {"name": "notes", "description": "run notes and blocks, stop them, read their results"},
            {"name": "server", "description": "status and the live event stream"},
            {"name": "editors", "description": "notes a plugin holds open: their regions go to its editor"},
        ],
    )
    app.router.redirect_slashes = False  # a redirect would only hand a refused request a second path
    app.include_router(router)
    app.include_router(editors_router)
    _handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI document, as served at /openapi.json and committed as docs/openapi.json."""
    return _make_app().openapi()


class ApiApp:
    """The ASGI app `create_app` returns: the FastAPI routes behind the security middleware."""

    def __init__(self, fastapi: FastAPI, security: SecurityMiddleware) -> None:
        self.fastapi = fastapi
        self.security = security

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.security(scope, receive, send)

    def close(self) -> None:
        """End every event stream (before the server shuts down); no note is held by an editor any more."""
        self.fastapi.state.editors.close()
        self.fastapi.state.hub.close()


def create_app(
    runner: Runner,
    vault: Vault,
    token: str,
    allowed_origins: Iterable[str] = (),
    *,
    port: int | None = None,
    watching: bool = False,
    heartbeat: float = HEARTBEAT_SECONDS,
    max_streams: int = MAX_STREAMS,
) -> ApiApp:
    """The API for one vault and its runner, as an ASGI app.

    `port` pins the Host allow-list; without it, the port each request came in on is used
    (the socket's own port, never a header). `allowed_origins` adds to `app://obsidian.md`.
    """
    if vault.root != runner.vault.root:
        raise ValueError("the runner serves another vault")
    app = _make_app()
    app.state.runner = runner
    app.state.watching = watching
    app.state.heartbeat = heartbeat
    app.state.versions = versions()
    app.state.editors = EditorRegistry()
    app.state.hub = EventHub(runner, max_streams, app.state.editors)
    runner.delegation.editors = app.state.editors  # held notes get regions, not writes (contract 11)
    json_routes = {
        (method, route.path)
        for route in [*router.routes, *editors_router.routes]  # app.routes holds the routers, not their routes
        if isinstance(route, APIRoute)
        for method in route.methods
        if method in {"POST", "PUT", "PATCH", "DELETE"}
    }
    security = SecurityMiddleware(app, token=token, allowed_origins=allowed_origins, port=port, json_routes=json_routes)
    app.state.security = security
    return ApiApp(app, security)


# -- serving ----------------------------------------------------------------------------------
class ApiServer:
    """uvicorn on 127.0.0.1 in a background thread, on a socket bound here (`port=0`: a free one)."""

    def __init__(self, app: ApiApp, port: int = 0, host: str = "127.0.0.1") -> None:
        self.app = app
        # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto says
        # TCP; with 0, each response's body waits ~40 ms for a delayed ACK (Nagle).
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        def serve() -> None:
            try:
                self.server.run(sockets=[self.socket])
            except BaseException as exc:  # reported by start() or stop()
                self.error = exc

        self._thread = threading.Thread(target=serve, name="vault-runner-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start ({self.error or 'no reason given'})")
            time.sleep(0.01)

    def stop(self) -> None:
        self.app.close()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self.socket.close()

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Print the OpenAPI document (`python -m vault_runner.frontends.api.app > docs/openapi.json`)."""
    sys.stdout.write(json.dumps(openapi_spec(), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
