"""The security of the localhost API (frontends/api): who may call it, and what it may touch.

A server on 127.0.0.1 that executes code is reachable by every web page the user opens
(a page's script can send requests to 127.0.0.1) and, through DNS rebinding, by any
host name an attacker points at 127.0.0.1. So every request passes, in this order:

1. Host header allow-list: `127.0.0.1:PORT`, `localhost:PORT`, `[::1]:PORT`, nothing
   else (a rebound name such as `evil.example:PORT` gets 403 `forbidden_host`).
2. Origin: when a request carries one (browsers always add it to cross-origin requests),
   it must be `app://obsidian.md` or one the user configured (403 `forbidden_origin`).
   CORS headers only ever echo an allowed origin, never `*`.
3. CORS preflights from an allowed origin are answered here (they carry no token).
4. Bearer token: a random secret created on first start, stored with mode 0600 in the
   user's config dir, compared in constant time (401 `unauthorized`).
5. Bodies: JSON only (415 `unsupported_media_type`), at most MAX_BODY_BYTES (413
   `payload_too_large`). Cross-site HTML forms can only send form or text bodies, and a
   page's script can only send JSON after a preflight, which step 2 refuses.

Paths: `resolve_note` turns a note path from a request into a file inside the vault or
refuses it: no absolute paths, no `..`, no symlink that leads out of the vault.
"""

from __future__ import annotations

import errno
import hmac
import json
import os
import re
import secrets
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, MutableMapping
from pathlib import Path, PurePosixPath
from typing import Any

from vault_runner.disk.trust import config_dir
from vault_runner.disk.vault import Vault
from vault_runner.errors import PathRefused
from vault_runner.frontends.api.codes import error_json, http_status

__all__ = (
    "ASGIApp",
    "MAX_BODY_BYTES",
    "MAX_PATH_CHARS",
    "OBSIDIAN_ORIGIN",
    "TOKEN_FILE_NAME",
    "PathRefused",
    "SecurityMiddleware",
    "allowed_hosts",
    "allowed_origin_set",
    "error_body",
    "load_or_create_token",
    "normalize_origin",
    "resolve_note",
    "token_matches",
    "token_path",
)

OBSIDIAN_ORIGIN = "app://obsidian.md"
MAX_BODY_BYTES = 64 * 1024
MAX_PATH_CHARS = 1024
TOKEN_FILE_NAME = "api-token"
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{32,256}$")
_ORIGIN_RE = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#]+$")
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# -- the token ------------------------------------------------------------------------------
def token_path() -> Path:
    return config_dir() / TOKEN_FILE_NAME


def load_or_create_token(path: Path | None = None) -> tuple[str, Path]:
    """The API token and its file; created (mode 0600, folder 0700) on first start.

    A token file that others can read is narrowed to 0600; an unreadable or malformed
    one is replaced with a fresh token.
    """
    path = path or token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _attempt in range(3):
        try:
            info = path.stat()
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                os.chmod(path, 0o600)
            token = path.read_text(encoding="ascii").strip()
            if _TOKEN_RE.match(token):
                return token, path
            path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError):
            path.unlink(missing_ok=True)
        token = secrets.token_urlsafe(32)
        try:
            # O_EXCL: two servers starting at once agree on the first one's token.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(token + "\n")
        return token, path
    raise OSError(f"{path}: the API token file could not be created; check that folder's permissions")


def token_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), token.encode("ascii"))


# -- hosts and origins ----------------------------------------------------------------------
def allowed_hosts(port: int) -> frozenset[str]:
    return frozenset({f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"})


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]`, lower case, no trailing slash. Raises ValueError otherwise."""
    text = origin.strip().rstrip("/").lower()
    if text == "*" or not _ORIGIN_RE.match(text):
        raise ValueError(
            f"{origin!r} is not an origin; give one like app://obsidian.md or http://localhost:5173 (no wildcards)"
        )
    return text


def allowed_origin_set(extra: Iterable[str]) -> frozenset[str]:
    return frozenset({OBSIDIAN_ORIGIN, *(normalize_origin(o) for o in extra)})


# -- note paths -----------------------------------------------------------------------------
def resolve_note(vault: Vault, raw: str, *, must_exist: bool = True) -> Path:
    """The vault file a request names (relative, `/`-separated), or PathRefused.

    Codes: `invalid_path` (absolute, `..`, a symlink out of the vault, not a note, in a
    folder vault-runner skips), `unknown_note` (no such note).
    """
    if not isinstance(raw, str) or not raw.strip():
        raise PathRefused(
            "invalid_path", "no note path given; pass the note's path inside the vault, e.g. Folder/Note.md"
        )
    shown = raw if len(raw) <= 200 else raw[:200] + "…"
    if len(raw) > MAX_PATH_CHARS or "\x00" in raw or "\\" in raw or any(ord(c) < 32 for c in raw):
        raise PathRefused("invalid_path", f"{shown!r}: is not a note path; use the note's path inside the vault with /")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise PathRefused(
            "invalid_path", f"{shown}: absolute paths are refused; give the note's path relative to the vault"
        )
    parts = raw.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise PathRefused(
            "invalid_path", f"{shown}: `..`, `.` and empty parts are refused; give the note's path inside the vault"
        )
    if not raw.lower().endswith(".md"):
        raise PathRefused("invalid_path", f"{shown}: is not a note (a .md file); give the path of a note")
    relative = PurePosixPath(*parts).as_posix()
    if vault.is_ignored(relative):
        raise PathRefused(
            "invalid_path", f"{relative}: is in a folder vault-runner skips (hidden, or excluded in Obsidian)"
        )
    candidate = vault.root.joinpath(*parts)
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError):
        raise PathRefused("invalid_path", f"{relative}: cannot be resolved (a symlink loop?); fix the link") from None
    if not resolved.is_relative_to(vault.root):
        raise PathRefused(
            "invalid_path",
            f"{relative}: leads outside the vault (a symbolic link?); vault-runner only runs notes inside the vault",
        )
    if resolved != candidate and not resolved.name.lower().endswith(".md"):
        raise PathRefused("invalid_path", f"{relative}: is a link to something that is not a note")
    if must_exist:
        try:
            info = resolved.stat()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                raise PathRefused(
                    "unknown_note", f"{shown}: there is no such note in the vault; check the path"
                ) from None
            # Permission denied on a folder, an I/O error...
            raise PathRefused("invalid_path", f"{shown}: cannot be opened ({exc.strerror or exc})") from None
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused("invalid_path", f"{shown}: is not a note file (a folder?)")
    return resolved


# -- the middleware -------------------------------------------------------------------------
def error_body(code: str, message: str) -> bytes:
    return json.dumps(error_json(code, message), ensure_ascii=False).encode("utf-8")


class SecurityMiddleware:
    """Steps 1 to 5 of the module doc, before any route runs. Pure ASGI, so streams stay streams."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str,
        allowed_origins: Iterable[str] = (),
        port: int | None = None,
        max_body: int = MAX_BODY_BYTES,
        json_routes: Collection[tuple[str, str]] | None = None,
    ) -> None:
        if not _TOKEN_RE.match(token):
            raise ValueError("the API token must be 32 to 256 URL-safe characters")
        self.app = app
        self.token = token
        self.origins = allowed_origin_set(allowed_origins)
        self.port = port
        self.max_body = max_body
        # (method, path) of the routes that take a body; None: every POST/PUT/PATCH/DELETE.
        # Other requests with those methods go on to the router, which answers 405 or 404.
        self.json_routes = None if json_routes is None else frozenset(json_routes)
        self.refusals: Counter[str] = Counter()  # for status and tests: what was refused, by code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        port = self.port if self.port is not None else _server_port(scope)
        host = headers.get("host", "").lower()
        if port is None or host not in allowed_hosts(port):
            await self._refuse(
                send,
                "forbidden_host",
                f"requests must be addressed to 127.0.0.1:{port} or localhost:{port}; "
                f"host {host[:100]!r} is refused (DNS rebinding protection)",
            )
            return
        origin = headers.get("origin")
        cors = None
        if origin is not None:
            if origin.lower() not in self.origins:
                await self._refuse(
                    send,
                    "forbidden_origin",
                    f"origin {origin[:100]!r} may not use this API; only Obsidian ({OBSIDIAN_ORIGIN}) and origins "
                    "given with `vault-runner serve --allow-origin` may",
                )
                return
            cors = origin.lower()  # echo the canonical form, not the case it was sent in
        method = scope["method"]
        if method == "OPTIONS" and cors is not None and "access-control-request-method" in headers:
            await self._preflight(send, cors, headers)
            return
        if not token_matches(headers.get("authorization"), self.token):
            await self._refuse(
                send,
                "unauthorized",
                "missing or wrong API token; send `Authorization: Bearer <token>` with the token from the file "
                "that `vault-runner serve` printed",
                cors,
                extra=[(b"www-authenticate", b'Bearer realm="vault-runner"')],
            )
            return
        if method in _BODY_METHODS and (self.json_routes is None or (method, scope["path"]) in self.json_routes):
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                await self._refuse(
                    send,
                    "unsupported_media_type",
                    "the request body must be JSON (Content-Type: application/json)",
                    cors,
                )
                return
        declared = headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body
            except ValueError:
                too_big = True
            if too_big:
                await self._refuse(send, "payload_too_large", f"the request body is over {self.max_body} bytes", cors)
                return
        body = b""
        more = method in _BODY_METHODS or declared is not None or "transfer-encoding" in headers
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await self._refuse(send, "payload_too_large", f"the request body is over {self.max_body} bytes", cors)
                return
            more = bool(message.get("more_body"))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]
                if cors is not None:
                    extra += [(b"access-control-allow-origin", cors.encode("latin-1")), (b"vary", b"Origin")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, replay, send_with_cors)

    async def _preflight(self, send: Send, origin: str, headers: dict[str, str]) -> None:
        response = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", b"GET, POST"),
            (b"access-control-allow-headers", b"Authorization, Content-Type, Last-Event-ID"),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin"),
            (b"content-length", b"0"),
        ]
        if headers.get("access-control-request-private-network") == "true":
            response.append((b"access-control-allow-private-network", b"true"))
        await send({"type": "http.response.start", "status": 204, "headers": response})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(
        self,
        send: Send,
        code: str,
        message: str,
        cors: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.refusals[code] += 1
        body = error_body(code, message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"cache-control", b"no-store"),
            *(extra or []),
        ]
        if cors is not None:
            headers += [(b"access-control-allow-origin", cors.encode("latin-1")), (b"vary", b"Origin")]
        await send({"type": "http.response.start", "status": http_status(code), "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _headers(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        name = key.decode("latin-1").lower()
        if name in found:
            # Two Host (or Origin, Authorization...) headers: keep an impossible value so it is refused.
            found[name] = "\x00duplicate"
        else:
            found[name] = value.decode("latin-1")
    return found


def _server_port(scope: Scope) -> int | None:
    server = scope.get("server")
    if server and len(server) >= 2 and isinstance(server[1], int):
        return int(server[1])
    return None
