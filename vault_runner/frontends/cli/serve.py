"""`vault-runner serve VAULT`: the watcher and the plugin API in one process, sharing one Runner.

The API listens on 127.0.0.1 only. At start the server writes a small JSON file the
Obsidian plugin reads to find it, and prints the same on stdout (one JSON line):

    <config dir>/servers/<first 16 hex digits of sha256(vault path)>.json
    {"vault": "/abs/vault", "url": "http://127.0.0.1:PORT", "host": "127.0.0.1",
     "port": PORT, "pid": PID, "token_file": "<config dir>/api-token",
     "version": "...", "started": UNIX_TIME, "server_file": "<this file>"}

The vault path hashed is the vault's absolute, symlink-resolved path, UTF-8. The config
dir is $VAULT_RUNNER_CONFIG_DIR, else the platform's (`~/.config/vault-runner` on
Linux). The file is removed when the server stops (SIGINT, SIGTERM).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from vault_runner import __version__
from vault_runner.disk.trust import config_dir
from vault_runner.errors import shown_path
from vault_runner.frontends.api.security import OBSIDIAN_ORIGIN, load_or_create_token, normalize_origin
from vault_runner.frontends.cli.main import default_vault, number, vault_command
from vault_runner.frontends.cli.watch import (
    Feedback,
    add_runner_options,
    close_runner,
    runner_from_args,
    start_runner,
    stop_on_signal,
    trusted_vault,
)
from vault_runner.frontends.watcher import VaultWatcher
from vault_runner.model import EXIT_OK, EXIT_USAGE

# Checked cheaply here so that `vault-runner` without them still offers its other commands
# and says what `serve` needs (cli.py), without importing them on every start.
for _package in ("fastapi", "uvicorn"):
    if importlib.util.find_spec(_package) is None:
        raise ModuleNotFoundError(f"No module named {_package!r}", name=_package)


def server_file(vault_root: Path) -> Path:
    """Where the server of a vault announces its port and token file (see the module doc)."""
    digest = hashlib.sha256(str(vault_root.resolve()).encode("utf-8")).hexdigest()[:16]
    return config_dir() / "servers" / f"{digest}.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_server(vault_root: Path) -> dict[str, Any] | None:
    """The server file of a vault whose process still runs, else None."""
    path = server_file(vault_root)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pid = info.get("pid") if isinstance(info, dict) else None
    if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
        return info
    return None


def write_server_file(path: Path, info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2)
        handle.write("\n")
    os.replace(temp, path)


def remove_server_file(path: Path) -> None:
    """Remove it only if it is still ours (another server may have taken over the vault)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(info, dict) and info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def cmd_serve(args: argparse.Namespace) -> int:
    # FastAPI and uvicorn cost ~0.35 s to import: only `serve` pays it, not every command.
    from vault_runner.frontends.api.app import ApiServer, create_app

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        origins = [normalize_origin(o) for o in args.allow_origin]
    except ValueError as exc:
        console.print(f"[red]error[/] --allow-origin: {escape(str(exc))}")
        return EXIT_USAGE
    vault = trusted_vault(default_vault(args.vault), "serve", console)
    if vault is None:
        return EXIT_USAGE
    other = running_server(vault.root)
    if other is not None:
        console.print(
            f"[red]error[/] {escape(shown_path(vault.root))}: a server for this vault already runs "
            f"(pid {other.get('pid')}, {escape(str(other.get('url')))}); stop it first"
        )
        return EXIT_USAGE
    try:
        token, token_file = load_or_create_token()
    except OSError as exc:
        console.print(f"[red]error[/] {escape(str(exc))}")
        return EXIT_USAGE
    runner = runner_from_args(vault, args)
    feedback = Feedback(console, as_json=False, root=vault.root)
    runner.subscribe(feedback)
    try:
        api = ApiServer(create_app(runner, vault, token, origins, watching=not args.no_watch), port=args.port)
    except OSError as exc:
        console.print(
            f"[red]error[/] 127.0.0.1:{args.port}: cannot listen there ({exc.strerror or exc}); "
            "pick another --port, or --port 0 for a free one"
        )
        return EXIT_USAGE
    # Pinned now that the port is known: the Host allow-list never depends on a header.
    api.app.security.port = api.port
    watcher = None if args.no_watch else VaultWatcher(runner)
    announce = server_file(vault.root)
    with stop_on_signal() as stopping:
        try:
            if not start_runner(runner, console):
                return EXIT_USAGE
            if watcher is not None:
                watcher.start()
            api.start()
            info = {
                "vault": str(vault.root),
                "url": api.url,
                "host": api.host,
                "port": api.port,
                "pid": os.getpid(),
                "token_file": str(token_file),
                "version": __version__,
                "started": round(time.time(), 3),
                "server_file": str(announce),
            }
            write_server_file(announce, info)
            print(json.dumps(info), flush=True)
            what = "watching and serving" if watcher is not None else "serving"
            origin_text = ", ".join([OBSIDIAN_ORIGIN, *origins])
            console.print(
                f"{what} {escape(shown_path(vault.root))} at {api.url} · token in {escape(shown_path(token_file))} · "
                f"server file {escape(shown_path(announce))} · origins {escape(origin_text)} · "
                f"up to {args.kernels} kernel(s) · Ctrl+C to stop"
            )
            while not stopping.wait(0.5):
                if api.error is not None:
                    console.print(f"[red]error[/] the API server stopped ({escape(repr(api.error))})")
                    break
        finally:
            remove_server_file(announce)
            if watcher is not None:
                watcher.stop()
            # Runs waiting in requests end (cancelled or interrupted) before the server closes.
            api.app.close()
            api.server.should_exit = True
            close_runner(runner)
            api.stop()
            feedback.stop()
            console.print("stopped; every kernel was shut down")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = vault_command(
        sub,
        "serve",
        help="the watcher and the localhost API for the Obsidian plugin (the vault must be trusted)",
        description="Serve a vault to the Obsidian plugin on 127.0.0.1: run notes and blocks, stop them, "
        "stream their progress; and (unless --no-watch) re-run notes when they are saved. One process, one "
        "kernel pool, one queue. The port and the token file are written to "
        "<config dir>/servers/<vault hash>.json and printed at start.",
    )
    serve.add_argument(
        "--port",
        type=number(int, minimum=0, maximum=65535),
        default=0,
        help="port on 127.0.0.1 (default 0: a free one)",
    )
    serve.add_argument("--no-watch", action="store_true", help="serve the API only; do not run notes on save")
    serve.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help=f"another origin allowed to call the API besides {OBSIDIAN_ORIGIN} (repeatable; no wildcards)",
    )
    add_runner_options(serve)
    serve.set_defaults(func=cmd_serve)
