"""The `vault-runner` command line. Thin: it turns arguments into engine calls.

Exit codes (README): 0 every block ran as expected, 1 a block failed (or a region was
edited by hand), 2 a usage or input error (a note that cannot be processed safely).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from vault_runner import __version__
from vault_runner.ci.reports import EXECUTED, block_line, block_message, located, outcome
from vault_runner.disk.vault import CONFIG_NAME, Vault, find_root
from vault_runner.engine.clean import clean_note
from vault_runner.engine.targets import notes_under
from vault_runner.errors import VaultError, shown_path
from vault_runner.frontends.cli.executor import add_executor_options, executor
from vault_runner.model import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Event, NoteReport

CommandAdder = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)  # a finding is never wrapped (path:line: ...)


def default_target(paths: Sequence[str]) -> list[Path]:
    """What a command runs on: the paths given; else the vault the current folder is in (it or
    a folder above holds `.obsidian/` or `vault-runner.toml`); else ./sample_vault."""
    if paths:
        return [Path(p) for p in paths]
    here = Path.cwd()
    if any((folder / ".obsidian").is_dir() or (folder / CONFIG_NAME).is_file() for folder in (here, *here.parents)):
        return [here]
    if Path("sample_vault").is_dir():
        return [Path("sample_vault")]
    raise VaultError(
        here,
        "is not inside a vault (no .obsidian folder here or above) and no vault was given; pass a vault folder "
        "or notes (e.g. `vault-runner render sample_vault`)",
    )


VAULT_HELP = "the vault folder (default: the vault the current folder is in, else ./sample_vault)"


def vault_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, *, vault_help: str = VAULT_HELP, **kw: Any
) -> argparse.ArgumentParser:
    """A subcommand of one vault, VAULT (`default_vault` when it is left out)."""
    parser = sub.add_parser(name, **kw)
    parser.add_argument("vault", nargs="?", metavar="VAULT", help=vault_help)
    return parser


def default_vault(given: str | None) -> str:
    """The VAULT of `watch`, `serve`, `trust`, `untrust` and `obsidian install`: the one given;
    else, by default_target's rule, the root of the vault the current folder is in (or
    ./sample_vault)."""
    if given is not None:
        return given
    [target] = default_target(())
    return str(find_root(target))


# -- numbers on the command line: one rule, for every command --------------------------------
def add_number(
    parser: argparse.ArgumentParser,
    flag: str,
    kind: type[int] | type[float],
    metavar: str,
    what: str,
    *,
    default: float,
    minimum: float,
    maximum: float | None = None,
) -> None:
    """A number option within bounds (see `number`); its help is `what` and the default."""
    parser.add_argument(
        flag,
        type=number(kind, minimum=minimum, maximum=maximum),
        default=default,
        metavar=metavar,
        help=f"{what} (default {default:g})",
    )


def number(kind: type[int] | type[float], *, minimum: float, maximum: float | None = None) -> Any:
    """An argparse type: a number within bounds, or a usage error (exit 2) that says which."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if math.isnan(value):  # NaN would pass every bound below, as no comparison holds
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum:g}" if maximum is None else f"between {minimum:g} and {maximum:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bounds}")
        return value

    return parse


class Progress:
    """Engine events as a rich progress bar (notes done, current note and block) on a terminal."""

    def __init__(self, console: Console, enabled: bool, total: int) -> None:
        self.console = console
        self.bar: RichProgress | None = None
        if enabled and console.is_terminal:
            self.bar = RichProgress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def __call__(self, event: Event) -> None:
        if self.bar is None:
            return
        if event.kind == "note-started":
            self.bar.update(self.task, description=f"{escape(event.note)} · starting kernel")
        elif event.kind == "block-started":
            self.bar.update(self.task, description=f"{escape(event.note)} · block at line {event.line}")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


ICONS = {  # a block status as one glyph, for text output
    "ok": "[green]✓[/]",
    "raised": "[green]✓[/]",
    "error": "[red]✗[/]",
    "timeout": "[red]⏱[/]",
    "dead": "[red]☠[/]",
    "skipped": "[yellow]·[/]",
    "not-run": "[dim]·[/]",
    "hand-edited": "[yellow]✎[/]",
    "unwritten": "[yellow]↻[/]",
}


def print_note(console: Console, report: NoteReport, shown: str | None = None) -> None:
    """One note's report as text; `shown`: the note as the user can paste it (errors.shown_path)."""
    shown = shown or report.note
    if report.status == "refused":
        console.print(f"[red]error[/] {escape(report.message or '')}")
        return
    if report.status in {"not-opted-in", "no-blocks", "current"}:
        for warning in report.warnings:
            console.print(f"[yellow]{escape(located(warning, report.note, shown))}[/]")
        return
    written = "written" if report.written else "unchanged"
    ran = [b for b in report.blocks if b.status in EXECUTED]
    if not ran:  # only hand edits to report: nothing ran, so no time and no device
        console.print(f"[bold]{escape(shown)}[/] · nothing run · {written}")
    else:
        seconds = sum(b.duration for b in report.blocks)
        total = f", {report.duration:.1f} s with the kernel" if report.duration else ""
        console.print(
            f"[bold]{escape(shown)}[/] · {len(ran)} block(s) in {seconds:.2f} s{total} · {report.device or '?'} · {written}"
        )
    for block in report.blocks:
        if block.failed or block.status in {"skipped", "unwritten"}:
            where = block_line(report.note, shown, block.line, block.status, block_message(block))
            console.print(f"  {ICONS.get(block.status, '?')} {escape(where)}")
    if report.message:
        console.print(f"  [red]{escape(located(report.message, report.note, shown))}[/]")
    for warning in report.warnings:
        console.print(f"  [yellow]{escape(located(warning, report.note, shown))}[/]")


def summarize(console: Console, reports: Sequence[NoteReport]) -> None:
    if not reports:
        console.print("0 note(s): no note with python blocks here, so nothing ran; 0 note(s) written")
        return
    notes_by: dict[str, int] = {}
    blocks_by: dict[str, int] = {}
    for report in reports:
        status = outcome(report.status, [b.status for b in report.blocks])
        notes_by[status] = notes_by.get(status, 0) + 1
        for block in report.blocks:
            blocks_by[block.status] = blocks_by.get(block.status, 0) + 1
    written = sum(1 for r in reports if r.written)
    note_part = ", ".join(f"{n} {s}" for s, n in sorted(notes_by.items()))
    block_part = ", ".join(f"{n} {s}" for s, n in sorted(blocks_by.items())) or "no blocks"
    console.print(f"{len(reports)} note(s): {note_part}; blocks: {block_part}; {written} note(s) written")


def exit_code(reports: Sequence[NoteReport]) -> int:
    if any(r.status == "refused" for r in reports):
        return EXIT_USAGE
    if any(r.failed for r in reports):
        return EXIT_FAILED
    return EXIT_OK


def _run_notes(args: argparse.Namespace, require_opt_in: bool, paths: list[Path]) -> int:
    console = _err_console()
    candidates = notes_under(paths)
    progress = Progress(console, not args.json, len(candidates))
    reports: list[NoteReport] = []
    lock = threading.Lock()

    def run_one(item: tuple[Vault, Path]) -> NoteReport:
        vault, path = item
        engine = where.engine(vault, on_event=progress, force=args.force, failed=getattr(args, "failed", False))
        report = engine.run_note(path, require_opt_in=require_opt_in and not args.all)
        with lock:
            progress.advance()
            if not args.json:
                print_note(console, report, shown_path(path))
        return report

    try:
        with executor(args) as where:  # here, or a Ray cluster (--executor ray)
            jobs = where.in_flight(len(candidates), max(1, getattr(args, "jobs", 1)))
            if jobs == 1:
                reports = [run_one(item) for item in candidates]
            else:
                # One kernel per note, several notes at once; reports keep the vault's order.
                with ThreadPoolExecutor(max_workers=jobs) as pool:
                    try:
                        reports = list(pool.map(run_one, candidates))
                    except BaseException:
                        where.cancel()  # Ctrl+C: end what runs elsewhere, or the pool waits for it
                        raise
    finally:
        progress.stop()
        from vault_runner.engine import close_default_kernels

        close_default_kernels()  # the command is done: no kernel template outlives it
    reports = [r for r in reports if r.status != "no-blocks"]  # notes without code are not news
    if args.json:
        print(json.dumps({"notes": [r.to_json() for r in reports]}, ensure_ascii=False, indent=2))
    else:
        summarize(console, reports)
    return exit_code(reports)


def cmd_run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.notes]
    for path in paths:
        if path.is_dir():
            raise VaultError(path, "is a folder; `run` takes notes (use `render` for a vault)")
    return _run_notes(args, require_opt_in=False, paths=paths)


def cmd_render(args: argparse.Namespace) -> int:
    return _run_notes(args, require_opt_in=True, paths=default_target(args.paths))


def cmd_clean(args: argparse.Namespace) -> int:
    """Clean every note given; a note that cannot be cleaned is reported and the rest go on."""
    console = _err_console()
    cleaned, code = 0, EXIT_OK
    for vault, path in notes_under(default_target(args.paths)):
        try:
            result = clean_note(vault, path, force=args.force)
        except VaultError as exc:
            _say(exc.one_line())
            code = EXIT_USAGE
            continue
        for line in result.kept:
            _say(line)
            code = max(code, EXIT_FAILED)
        if result.written:
            cleaned += 1
            console.print(f"cleaned {escape(shown_path(path))}")
    console.print(f"{cleaned} note(s) cleaned")
    return code


def _say(line: str) -> None:
    """A finding, on one line whatever the terminal width (CI log parsers jump to `path:line:`)."""
    print(line, file=sys.stderr, flush=True)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the per-block report as JSON on stdout")
    parser.add_argument(
        "--force", action="store_true", help="run even when outputs are current, and overwrite hand-edited regions"
    )
    parser.add_argument(
        "--failed",
        action="store_true",
        help="also re-run notes whose stored outputs are failures (an error, a timeout, an interrupt)",
    )


def add_core_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the named notes (opted in or not) and write their outputs")
    run.add_argument("notes", nargs="+", metavar="NOTE")
    _add_run_options(run)
    run.set_defaults(func=cmd_run, all=True)

    render = sub.add_parser("render", help="run every opted-in note of a vault whose outputs are not current")
    render.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="vaults, folders of a vault or notes (default: the vault the current folder is in, else ./sample_vault)",
    )
    render.add_argument("--all", action="store_true", help="ignore opt-in: run every note with python blocks")
    render.add_argument(
        "-j", "--jobs", type=number(int, minimum=1), default=1, metavar="N", help="run N notes at once (default 1)"
    )
    _add_run_options(render)
    add_executor_options(render)
    render.set_defaults(func=cmd_render)

    clean = sub.add_parser("clean", help="remove output regions and the attachments vault-runner made")
    clean.add_argument(
        "paths", nargs="*", metavar="PATH", help="vaults, folders of a vault or notes (default: as for render)"
    )
    clean.add_argument("--force", action="store_true", help="also remove output regions edited by hand")
    clean.set_defaults(func=cmd_clean)


COMMANDS: list[CommandAdder] = [add_core_commands]
# Each front end module offers `add_commands(subparsers)`; one module per front end, with the
# commands it adds, so that a front end whose optional dependency is missing (watchdog for
# `watch`, FastAPI for `serve`) leaves the other commands working and says what to install.
FRONT_ENDS: dict[str, tuple[str, ...]] = {
    "vault_runner.frontends.cli.ci": ("check", "test"),
    "vault_runner.frontends.cli.admin": ("doctor", "trust", "untrust"),
    "vault_runner.frontends.cli.watch": ("watch",),
    "vault_runner.frontends.cli.serve": ("serve",),
    "vault_runner.frontends.cli.obsidian": ("obsidian",),
}


def _front_end_adders() -> list[CommandAdder]:
    import importlib

    adders = list(COMMANDS)
    for name, commands in FRONT_ENDS.items():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that front end is not part of this build
            adders.append(_unavailable(commands, str(exc.name)))
            continue
        adders.append(module.add_commands)
    return adders


def _unavailable(commands: tuple[str, ...], missing: str) -> CommandAdder:
    def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        for command in commands:
            parser = sub.add_parser(command, help=f"(unavailable: needs the Python package {missing})")
            parser.add_argument("rest", nargs=argparse.REMAINDER)
            parser.set_defaults(func=lambda args, command=command: _missing(command, missing))

    return add


def _missing(command: str, package: str) -> int:
    _err_console().print(
        f"[red]error[/] `vault-runner {command}` needs the Python package {escape(package)}, which is not "
        f"installed; install vault-runner with its dependencies (`pip install vault-runner`) and try again"
    )
    return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vault-runner",
        description="Run the python blocks of Obsidian notes in a Jupyter kernel and write outputs back.",
    )
    parser.add_argument("--version", action="version", version=f"vault-runner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _front_end_adders():
        add(sub)
    _name_each_parser(sub)
    return parser


def _name_each_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Each (sub)command knows its parser, so a wrong flag shows that command's usage
    (`obsidian install --bogus`: the usage of `install`, not of `obsidian`)."""
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _name_each_parser(action)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # a typo in a subcommand's flag: that subcommand's usage, not the top-level one
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if (validate := getattr(args, "validate", None)) is not None:
        validate(args)  # usage errors exit 2 here, before any trust check or kernel
    try:
        return int(args.func(args))
    except VaultError as exc:
        _err_console().print(f"[red]error[/] {escape(exc.one_line())}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err_console().print("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
