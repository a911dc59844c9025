"""`vault-runner check` and `vault-runner test`: CI on notes.

Exit codes (both commands):
  0  everything passed
  1  findings (check) or failing blocks (test)
  2  usage or input error: a note that cannot be read or parsed, a bad vault config

`check` executes nothing and starts no kernel: it reads the hashes that output regions
record. `test` runs each opted-in note top to bottom in a fresh kernel and writes nothing
unless `--update` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from vault_runner.ci import check as checks
from vault_runner.ci import reports
from vault_runner.core.freshness import stored_failures
from vault_runner.engine.loading import select
from vault_runner.engine.targets import notes_under
from vault_runner.errors import VaultError
from vault_runner.frontends.cli.executor import add_executor_options, executor
from vault_runner.frontends.cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, default_target, number


def _err_console() -> Console:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # CI logs are not terminals; rich would fold note paths at 80 columns.
        console.width = 160
    return console


def cmd_check(args: argparse.Namespace) -> int:
    started = time.monotonic()
    findings: list[checks.Finding] = []
    errors: list[str] = []
    checked: list[str] = []
    diffs: list[str] = []
    failures = 0
    warnings: list[reports.NoteWarning] = []
    for vault, path in notes_under(default_target(args.paths)):
        try:
            loaded = select(vault, path, all_notes=args.all).loaded
        except VaultError as exc:
            errors.append(exc.one_line())
            continue
        if loaded is None:
            continue
        shown = checks.shown_path(path)
        checked.append(shown)
        found = checks.find(loaded, shown)
        findings.extend(found)
        warnings.extend(reports.NoteWarning(w, loaded.relative, shown) for w in loaded.warnings)
        failures += len(stored_failures(loaded.plan))
        if args.diff and found:
            diff = checks.render_diff(loaded, shown)
            if diff:
                diffs.append(diff)
    seconds = time.monotonic() - started

    if args.json:
        data_out = reports.findings_json(findings, len(checked), errors, warnings)
        if args.diff:
            data_out["diff"] = "".join(diffs)
        print(reports.dumps(data_out))
    else:
        if args.format == "github":
            lines = reports.findings_github(findings, errors, warnings)
        else:
            lines = [f.one_line() for f in findings] + errors
        for line in lines:
            print(line)
        if diffs:
            sys.stdout.write("".join(diffs))
        if args.format != "github":  # there, each is an annotation above
            for warning in warnings:
                print(warning.one_line(), file=sys.stderr)
        reports.print_check_summary(_err_console(), findings, len(checked), len(errors), seconds)
        if failures:
            _err_console().print(
                f"{failures} block(s) hold a stored failure (an error, a timeout or an interrupt); "
                "`vault-runner render --failed` runs their notes again"
            )
    if args.junit_xml:
        reports.write_text(Path(args.junit_xml), reports.findings_junit(findings, checked, errors))
    sys.stdout.flush()
    if errors:
        return EXIT_USAGE
    return EXIT_FAILED if findings else EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    jobs = args.jobs or os.cpu_count() or 1
    started = time.monotonic()
    console = _err_console()
    candidates = notes_under(default_target(args.paths))
    from vault_runner.ci.testing import NoteResult, NoteTestOptions, run_notes  # starts kernels

    options = NoteTestOptions(compare=args.compare, update=args.update, all_notes=args.all)
    quiet = args.json

    def done(result: NoteResult) -> None:
        if quiet or not result.counted:
            return
        if args.format == "github":
            for line in reports.results_github([result]):
                print(line, flush=True)
        else:
            reports.print_result(sys.stdout, result)
            sys.stdout.flush()
        if not result.refused:
            mark = "[red]✗[/]" if result.failed else "[green]✓[/]"
            blocks = sum(1 for b in result.report.blocks if b.status != "not-run")
            console.print(f"{mark} {result.path} · {blocks} block(s) · {result.report.duration:.2f} s")

    with executor(args) as where:  # here, or a Ray cluster (--executor ray)
        on_ray = args.executor == "ray"
        jobs = where.in_flight(len(candidates), jobs)
        ran = run_notes(candidates, options, jobs=jobs, on_result=done, make_engine=where.engine if on_ray else None)
    results = [r for r in ran if r.counted]
    seconds = time.monotonic() - started
    if args.json:
        print(reports.dumps(reports.results_json(results)))
    else:
        reports.print_test_summary(console, results, seconds)
    if args.junit_xml:
        reports.write_text(Path(args.junit_xml), reports.results_junit(results))
    if any(r.refused for r in results):
        return EXIT_USAGE
    return EXIT_FAILED if any(r.failed for r in results) else EXIT_OK


def _add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="vaults, folders of a vault or notes (default: the vault the current folder is in, else ./sample_vault)",
    )
    parser.add_argument(
        "--format",
        choices=("text", "github"),
        default="text",
        help="text: `path:line: message` lines; github: workflow annotations (::error file=...,line=...::)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--junit-xml", metavar="PATH", help="also write a JUnit XML report to PATH")
    parser.add_argument("--all", action="store_true", help="ignore opt-in: every note with python blocks")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    epilog = "exit codes: 0 passed, 1 findings or failures, 2 usage or input error"
    check = sub.add_parser(
        "check",
        help="fail when an output region is missing, stale or edited by hand (runs nothing)",
        description=(
            "Check that every opted-in block has a current output region, without running anything: "
            "a region records a hash of the code (and options) that made it, and a checksum of itself."
        ),
        epilog=epilog,
    )
    _add_report_options(check)
    check.add_argument(
        "--diff",
        action="store_true",
        help="also show what `render` would change, as a unified diff; the new outputs are only known "
        "after running, so a regenerated region shows its new marker and a placeholder line",
    )
    check.set_defaults(func=cmd_check)

    test = sub.add_parser(
        "test",
        help="run every opted-in note in a fresh kernel and fail on an unexpected error (writes nothing)",
        description=(
            "Run each opted-in note top to bottom in a fresh kernel. A block fails when it raises, unless "
            "its `raises` option names that exception. With --compare (or the `compare` option) its text "
            "output must also match the stored output after sanitizers."
        ),
        epilog=epilog,
    )
    _add_report_options(test)
    test.add_argument(
        "-j",
        "--jobs",
        type=number(int, minimum=0),
        default=1,
        metavar="N",
        help="run N notes at a time (0: one per CPU)",
    )
    test.add_argument(
        "--compare",
        action="store_true",
        help="compare text outputs with the stored ones (after sanitizers; images only by count)",
    )
    test.add_argument("--update", action="store_true", help="write the fresh outputs into the notes, as render does")
    add_executor_options(test)
    test.set_defaults(func=cmd_test)
