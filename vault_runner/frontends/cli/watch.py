"""`vault-runner watch VAULT`: re-run notes on save in warm kernels, with live feedback.

A front end only: it builds a Runner and a VaultWatcher and shows their events, as rich
lines on the terminal or, with `--json`, one JSON object per line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape

from vault_runner.ci.reports import EXECUTED, block_line, located
from vault_runner.disk.trust import is_trusted, untrusted_message
from vault_runner.disk.vault import Vault, load_vault
from vault_runner.engine import Event, close_default_kernels
from vault_runner.errors import UntrustedVault, VaultError, shown_path
from vault_runner.frontends.cli.main import ICONS as _ICONS
from vault_runner.frontends.cli.main import add_number, default_vault, vault_command
from vault_runner.frontends.watcher import DEBOUNCE, VaultWatcher
from vault_runner.live.runner import Runner
from vault_runner.live.session import SUPERSEDE_POLICIES
from vault_runner.model import BLOCK_FAILED, EXIT_OK, EXIT_USAGE, NOTE_FAILED

_LEVELS = {"error": "red", "warning": "yellow", "info": "cyan"}


class Feedback:
    """Shows runner events: rich lines and a live status on a terminal, or JSON lines."""

    def __init__(self, console: Console, as_json: bool, out: TextIO | None = None, root: Path | None = None) -> None:
        self.console = console
        self.as_json = as_json
        self.root = root  # notes are shown as the user can paste them (errors.shown_path)
        self.out = out or sys.stdout
        self.lock = threading.Lock()
        self.running: dict[str, str] = {}
        self.status: Any = None

    def __call__(self, event: Event) -> None:
        with self.lock:
            if self.as_json:
                self.out.write(json.dumps(event.to_json(), ensure_ascii=False, default=str) + "\n")
                self.out.flush()
                return
            self._show(event)

    def say(self, kind: str, **data: Any) -> None:
        """A watcher-level event (watching, stopped) in the same stream."""
        if self.as_json:
            self(Event(kind, "", data=data))
        else:
            with self.lock:
                self.console.print(escape(str(data.get("message", kind))))

    def _show(self, event: Event) -> None:
        kind = event.kind
        if kind == "note-started":
            self.running[event.note] = "starting"
        elif kind == "block-started":
            self.running[event.note] = f"block at line {event.line}"
        elif kind == "note-finished":
            self.running.pop(event.note, None)
            self._print_finished(event)
        elif kind == "superseded":
            where = f"the block at line {event.line}" if event.line else "the changed block"
            self.console.print(
                f"[dim]↻ {escape(self._shown(event.note))}: saved again while it ran; the run stops at {where}[/]"
            )
        elif kind == "log":
            level = str(event.data.get("level", "info"))
            color = _LEVELS.get(level, "white")
            message = self._paths_shown(str(event.data.get("message", "")))
            self.console.print(f"[{color}]{level}[/] {escape(message)}")
        elif kind == "kernel-stopped" and event.data.get("died"):
            self.console.print(f"[yellow]kernel[/] {escape(event.note)}: {escape(str(event.data.get('reason')))}")
        elif kind == "kernel-evicted":
            self.console.print(f"[dim]{escape(event.note)}: {escape(str(event.data.get('reason')))}[/]")
        self._update_status()

    def _paths_shown(self, message: str) -> str:
        """A log line `PATH: what` whose path the watcher gave absolute, as the user can paste it."""
        if self.root is None or not message.startswith(str(self.root)):
            return message
        path, sep, rest = message.partition(": ")
        return shown_path(path) + sep + rest

    def _shown(self, note: str) -> str:
        return shown_path(self.root / note) if self.root is not None and note else note

    def _print_finished(self, event: Event) -> None:
        data = event.data
        report = data.get("report") or {}
        shown = self._shown(event.note)
        note = escape(shown)
        clock = time.strftime("%H:%M:%S")
        status = data.get("status")
        if status in NOTE_FAILED and not report.get("blocks"):
            message = located(str(report.get("message") or shown), event.note, shown)
            self.console.print(f"[red]✗[/] {clock} {escape(message)}")
            return
        written = "written" if data.get("written") else "unchanged"
        blocks = report.get("blocks", [])
        ran = sum(1 for block in blocks if block.get("status") in EXECUTED)
        if ran == 0 and data.get("restored"):
            self.console.print(f"[cyan]↺[/] {clock} [bold]{note}[/] · {data['restored']} output(s) put back")
            return
        hand_edited = any(block.get("status") == "hand-edited" for block in blocks)
        if ran == 0 and not hand_edited and not data.get("written") and not report.get("message"):
            # A run cut before its first block (saved again at once): the next run says what happened.
            for warning in report.get("warnings", []):
                self.console.print(f"  [yellow]![/] {escape(located(warning, event.note, shown))}")
            return
        if ran == 0:
            self.console.print(f"{_ICONS['hand-edited']} {clock} [bold]{note}[/] · nothing run · {written}")
        else:
            icon = "[red]✗[/]" if data.get("failed") else "[green]✓[/]"
            where = f" from line {data['from_line']}" if data.get("from_line") else ""
            self.console.print(
                f"{icon} {clock} [bold]{note}[/] · {ran} block(s){where} in "
                f"{data.get('duration', 0.0):.2f} s · {report.get('device') or '?'} · {written}"
            )
        for block in blocks:
            block_status = block.get("status")
            if block_status in BLOCK_FAILED | {"unwritten"} or (block_status == "skipped" and data.get("failed")):
                detail = block.get("message") or ""
                if block_status == "error" and not detail:
                    errors = [o for o in block.get("outputs", []) if o.get("type") == "error"]
                    detail = f"{errors[0].get('ename')}: {errors[0].get('evalue')}" if errors else "error"
                line = block_line(event.note, shown, int(block.get("line") or 0), str(block_status), detail)
                self.console.print(f"  {_ICONS.get(block_status, '?')} {escape(line)}")
        for warning in report.get("warnings", []):
            self.console.print(f"  [yellow]![/] {escape(located(warning, event.note, shown))}")
        if report.get("message"):
            self.console.print(f"  [red]{escape(located(str(report['message']), event.note, shown))}[/]")

    def _update_status(self) -> None:
        if not self.console.is_terminal:
            return
        if not self.running:
            if self.status is not None:
                self.status.stop()
                self.status = None
            return
        text = " · ".join(f"[bold]{escape(n)}[/] {escape(w)}" for n, w in self.running.items())
        if self.status is None:
            self.status = self.console.status(text)
            self.status.start()
        else:
            self.status.update(text)

    def stop(self) -> None:
        with self.lock:
            if self.status is not None:
                self.status.stop()
                self.status = None


def cmd_watch(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    vault = trusted_vault(default_vault(args.vault), "watch", console)
    if vault is None:
        return EXIT_USAGE
    runner = runner_from_args(vault, args)
    feedback = Feedback(console, args.json, root=vault.root)
    runner.subscribe(feedback)
    watcher = VaultWatcher(runner, debounce=args.debounce)
    with stop_on_signal() as stopping:
        try:
            if not start_runner(runner, console):
                return EXIT_USAGE
            watcher.start()
            feedback.say(
                "watching",
                vault=str(vault.root),
                kernels=args.kernels,
                warm=args.warm,
                message=f"watching {shown_path(vault.root)} · up to {args.kernels} kernel(s), {args.warm} kept warm · "
                "Ctrl+C to stop",
            )
            while not stopping.wait(0.5):
                pass
        finally:
            watcher.stop()
            close_runner(runner)
            feedback.stop()
            feedback.say("stopped", message="stopped; every kernel was shut down")
    return EXIT_OK


def close_runner(runner: Runner) -> None:
    """Shut the runner down on a thread of its own, which closes its asyncio loop after.

    jupyter_client's blocking calls (an interrupt of the running block, a shutdown) leave an
    event loop on each calling thread and never close it. A loop sits in a reference cycle,
    so one left over is freed only by the garbage collector, and if that is at interpreter
    exit, too late to go quietly ("Exception ignored in BaseEventLoop.__del__"). So: none on
    the main thread, and the worker threads' leftovers are collected now, while all is well.
    """

    def close() -> None:
        runner.close()
        close_default_kernels()  # the kernel templates and their spares: the command is done
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            return  # no loop was made on this thread
        if not loop.is_running():
            loop.close()

    closer = threading.Thread(target=close, name="vault-runner-close")
    closer.start()
    closer.join()
    gc.collect()


@contextmanager
def stop_on_signal() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT while the block runs; the old handlers come back after.

    Both by hand: a background job's SIGINT may be inherited as ignored.
    """
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopping
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def trusted_vault(given: str, command: str, console: Console) -> Vault | None:
    """The vault `watch` or `serve` was given; None (said on the console) when it is not trusted."""
    folder = Path(given)
    if not folder.exists():
        raise VaultError(folder, f"does not exist; pass the vault folder to {command}")
    if not folder.is_dir():
        raise VaultError(folder, f"is not a folder; pass the vault folder to {command}")
    vault = load_vault(folder)
    if not is_trusted(vault.root):
        console.print(f"[red]error[/] {escape(untrusted_message(vault.root))}")
        return None
    return vault


def start_runner(runner: Runner, console: Console) -> bool:
    """Start the runner; False (said on the console) when the vault is not trusted."""
    try:
        runner.start()
    except UntrustedVault as exc:
        console.print(f"[red]error[/] {escape(str(exc))}")
        return False
    return True


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    watch = vault_command(
        sub,
        "watch",
        help="re-run notes when they are saved, in warm kernels (the vault must be trusted)",
        description="Watch a vault: each save of an opted-in note re-runs its changed blocks "
        "(and the blocks after them) in a warm kernel and writes the outputs back.",
    )
    watch.add_argument("--json", action="store_true", help="print one JSON event per line on stdout")
    add_runner_options(watch)
    add_number(
        watch,
        "--debounce",
        float,
        "SECONDS",
        "quiet time after a save before the note is read",
        default=DEBOUNCE,
        minimum=0.0,
        maximum=60.0,
    )
    watch.set_defaults(func=cmd_watch)


def add_runner_options(parser: argparse.ArgumentParser) -> None:
    """The kernel pool and supersede options that `watch` and `serve` share."""
    add_number(parser, "--kernels", int, "N", "most kernels at once", default=2, minimum=1)
    add_number(parser, "--warm", int, "N", "kernels kept warm for new notes", default=1, minimum=0)
    add_number(
        parser,
        "--idle-timeout",
        float,
        "SECONDS",
        "shut a note's kernel down after this long unused",
        default=600.0,
        minimum=1.0,
    )
    parser.add_argument(
        "--let-finish",
        action="store_true",
        help="when a note is saved again while it runs, let the running block finish instead of "
        f"interrupting it (policies: {', '.join(SUPERSEDE_POLICIES)})",
    )
    parser.set_defaults(validate=lambda args: check_runner_options(parser, args))


def check_runner_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options that only make sense together; a usage error before anything starts."""
    if args.warm > args.kernels:
        parser.error(
            f"--warm {args.warm} keeps more kernels warm than --kernels {args.kernels} allows; "
            "lower --warm or raise --kernels"
        )


def runner_from_args(vault: Vault, args: argparse.Namespace) -> Runner:
    return Runner(
        vault,
        max_kernels=args.kernels,
        spares=args.warm,
        idle_timeout=args.idle_timeout,
        supersede="finish" if args.let_finish else "interrupt",
    )
