"""Reports of `check` and `test`: plain `path:line: message` lines, GitHub workflow
annotations, JUnit XML, JSON, and a rich summary.

Lines meant for tools (findings, failures, annotations, JSON) go to stdout unwrapped; the
rich summary goes to stderr, so piping stdout into another tool stays clean.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from vault_runner.ci.check import Finding
from vault_runner.model import NOTE_FAILED, TEST_FAILED

if TYPE_CHECKING:
    from vault_runner.ci.testing import NoteResult
from vault_runner.engine import BlockReport

MAX_ANNOTATION_LINES = 30


# -- GitHub workflow commands ------------------------------------------------------------
def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotation(path: str, line: int | None, title: str, message: str, level: str = "error") -> str:
    """`::error file=...,line=...,title=...::message`, escaped as the runner expects."""
    props = [f"file={_escape_property(path)}"]
    if line:
        props.append(f"line={line}")
    props.append(f"title={_escape_property(title)}")
    return f"::{level} {','.join(props)}::{_escape_data(message)}"


def _clip(text: str, lines: int = MAX_ANNOTATION_LINES) -> str:
    parts = text.rstrip("\n").split("\n")
    if len(parts) <= lines:
        return "\n".join(parts)
    return "\n".join(parts[:lines] + [f"[… {len(parts) - lines} more lines]"])


def warning_place(warning: str, note: str, shown: str) -> tuple[str, int | None, str]:
    """A note's warning (`note:line: warning: message`, the note vault-relative, as
    engine/loading.py words it) as (the note as shown, its line or None, the message).
    A warning that names no place of the note (the sandbox's) is the note's, without a line."""
    if not warning.startswith(note + ":"):
        return shown, None, warning
    rest = warning[len(note) + 1 :]
    head, sep, message = rest.partition(": ")
    if sep and head.isdigit():
        return shown, int(head), message.removeprefix("warning: ")
    return shown, None, rest.strip().removeprefix("warning: ")


def warning_github(warning: str, note: str, shown: str, command: str) -> str:
    """A note's warning as a `::warning file=...,line=...::` annotation."""
    path, line, message = warning_place(warning, note, shown)
    return github_annotation(path, line, f"vault-runner {command}: warning", message, level="warning")


# -- check ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class NoteWarning:
    """A warning `check` heard while reading a note: the text (vault-relative) and the note."""

    text: str
    note: str  # vault-relative
    shown: str  # the note as the user can paste it

    def one_line(self) -> str:
        return located(self.text, self.note, self.shown)


def findings_github(
    findings: Sequence[Finding], errors: Sequence[str], warnings: Sequence[NoteWarning] = ()
) -> list[str]:
    out = [github_annotation(f.path, f.line, f"vault-runner check: {f.kind}", f.message) for f in findings]
    for error in errors:
        path, line, message = _split_one_line(error)
        out.append(github_annotation(path, line, "vault-runner check: cannot read note", message))
    out += [warning_github(w.text, w.note, w.shown, "check") for w in warnings]
    return out


def findings_json(
    findings: Sequence[Finding], checked: int, errors: Sequence[str], warnings: Sequence[NoteWarning] = ()
) -> dict[str, Any]:
    return {
        "checked_notes": checked,
        "findings": [f.to_json() for f in findings],
        "errors": list(errors),
        "warnings": [w.text for w in warnings],  # vault-relative, as every JSON report names notes
        "passed": not findings and not errors,
    }


def findings_junit(findings: Sequence[Finding], checked_notes: Sequence[str], errors: Sequence[str]) -> str:
    """One test case per checked note; its findings are the failure."""
    by_note: dict[str, list[Finding]] = {}
    for finding in findings:
        by_note.setdefault(finding.path, []).append(finding)
    suites = ET.Element("testsuites", name="vault-runner check")
    suite = ET.SubElement(suites, "testsuite", name="vault-runner check")
    failures = 0
    for note in checked_notes:
        case = ET.SubElement(suite, "testcase", classname=note, name="outputs are current", file=note)
        found = by_note.get(note)
        if found:
            failures += 1
            case.set("line", str(found[0].line))
            failure = ET.SubElement(case, "failure", message=found[0].one_line(), type=found[0].kind)
            failure.text = "\n".join(f.one_line() for f in found)
    for error in errors:
        path, line, _message = _split_one_line(error)
        case = ET.SubElement(suite, "testcase", classname=path, name="note can be read", file=path)
        if line:
            case.set("line", str(line))
        ET.SubElement(case, "error", message=error, type="input").text = error
    _set_counts(suite, len(checked_notes) + len(errors), failures, len(errors), 0, 0.0)
    _set_counts(suites, len(checked_notes) + len(errors), failures, len(errors), 0, 0.0)
    return _xml(suites)


def print_check_summary(
    console: Console, findings: Sequence[Finding], checked: int, errors: int, seconds: float
) -> None:
    kinds = Counter(f.kind for f in findings)
    notes = len({f.path for f in findings})
    if not findings and not errors:
        console.print(f"[green]✓[/] {checked} note(s) checked in {seconds:.2f} s: every output is current")
        return
    part = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "no findings"
    error_part = f"; {errors} note(s) refused (see above)" if errors else ""
    console.print(
        f"[red]✗[/] {checked} note(s) checked in {seconds:.2f} s: {len(findings)} finding(s) in "
        f"{notes} note(s) ({part}){error_part}"
    )


# -- run, render, watch: one note's report as text -------------------------------------------
# Block statuses of a block that executed in this run (the others: kept, skipped, left alone).
EXECUTED: frozenset[str] = frozenset({"ok", "raised", "error", "timeout", "dead", "unwritten", "mismatch"})


def outcome(status: str, block_statuses: Sequence[str]) -> str:
    """A note's status as text summaries count it: `ran` only when one of its blocks ran (a note
    whose only news is a region edited by hand ran nothing)."""
    if status != "ran" or any(s in EXECUTED for s in block_statuses):
        return status
    return "hand-edited" if "hand-edited" in block_statuses else "current"


def located(text: str, note: str, shown: str) -> str:
    """A report line that starts `note:` (reports name notes vault-relative) with the note
    as the user can paste it instead, so no line names its note twice or in two styles."""
    return shown + text[len(note) :] if text.startswith(note + ":") else text


def block_line(note: str, shown: str, line: int, status: str, detail: str) -> str:
    """`path:line: status: detail`, or the detail alone when it names its own place already."""
    if detail.startswith(note + ":"):
        return located(detail, note, shown)
    return f"{shown}:{line}: {status}: {detail}"


# -- test ----------------------------------------------------------------------------------
def case_name(block: BlockReport) -> str:
    name = f"line {block.line}"
    return f"{name} ({block.label})" if block.label else name


def failure_text(result: NoteResult, block: BlockReport) -> str:
    """What a failed block shows: its code with note line numbers, then the traceback or diff."""
    return block_failure_text(result.path, block, result.code.get(block.index, ""), result.details.get(block.index))


def block_failure_text(path: str, block: BlockReport, code: str, detail: str | None) -> str:
    lines = code.rstrip("\n").split("\n") if code else []
    width = len(str(block.line + len(lines)))
    numbered = [f"{block.line + 1 + i:>{width}} | {line}" for i, line in enumerate(lines)]
    parts = [f"{path}:{block.line}: {block.status}: {block_message(block)}"]
    if numbered:
        parts += ["", *numbered]
    if detail:
        parts += ["", detail.rstrip("\n")]
    return "\n".join(parts)


def block_message(block: BlockReport) -> str:
    if block.message:
        return block.message
    errors = [o for o in block.outputs if o.get("type") == "error"]
    if errors:
        return f"{errors[0].get('ename')}: {errors[0].get('evalue')}"
    return block.status


def results_github(results: Sequence[NoteResult]) -> list[str]:
    out = []
    for result in results:
        report = result.report
        out += [warning_github(w, report.note, result.path, "test") for w in report.warnings]
        if report.status in NOTE_FAILED:
            path, line, message = _split_one_line(report.message or f"{result.path}: failed")
            out.append(
                github_annotation(
                    path if report.status == "refused" else result.path, line, "vault-runner test", message
                )
            )
        for block in report.blocks:
            if block.status in TEST_FAILED:
                out.append(
                    github_annotation(
                        result.path,
                        block.line,
                        f"vault-runner test: {block.status}",
                        _clip(failure_text(result, block)),
                    )
                )
    return out


def results_junit(results: Sequence[NoteResult]) -> str:
    """A test suite per note, a test case per runnable block (classname: the note, name: its line)."""
    suites = ET.Element("testsuites", name="vault-runner test")
    totals = Counter[str]()
    total_time = 0.0
    for result in results:
        report = result.report
        suite = ET.SubElement(suites, "testsuite", name=result.path, file=result.path)
        counts = Counter[str]()
        if report.device:
            props = ET.SubElement(suite, "properties")
            ET.SubElement(props, "property", name="device", value=report.device)
        if report.status in NOTE_FAILED:
            case = ET.SubElement(suite, "testcase", classname=result.path, name="note", file=result.path)
            _path, line, _message = _split_one_line(report.message or "")
            if line:
                case.set("line", str(line))
            ET.SubElement(
                case, "error", message=report.message or report.status, type=report.status
            ).text = report.message
            counts["tests"] += 1
            counts["errors"] += 1
        for block in report.blocks:
            if block.status == "not-run":
                continue  # eval: false: not a test
            case = ET.SubElement(
                suite,
                "testcase",
                classname=result.path,
                name=case_name(block),
                file=result.path,
                line=str(block.line),
                time=f"{block.duration:.3f}",
            )
            counts["tests"] += 1
            if block.status in TEST_FAILED:
                counts["failures"] += 1
                failure = ET.SubElement(case, "failure", message=block_message(block), type=block.status)
                failure.text = failure_text(result, block)
            elif block.status == "skipped":
                counts["skipped"] += 1
                ET.SubElement(case, "skipped", message=block.message or "skipped")
        seconds = sum(b.duration for b in report.blocks)
        total_time += seconds
        _set_counts(suite, counts["tests"], counts["failures"], counts["errors"], counts["skipped"], seconds)
        totals.update(counts)
    _set_counts(suites, totals["tests"], totals["failures"], totals["errors"], totals["skipped"], total_time)
    return _xml(suites)


def print_result(out: IO[str], result: NoteResult) -> None:
    """The plain lines of one note's failures and option warnings (nothing for a clean pass)."""
    report = result.report
    for warning in report.warnings:
        print(located(warning, report.note, result.path), file=out)
    if report.status in NOTE_FAILED:
        print(report.message or f"{result.path}: {report.status}", file=out)
    for block in report.blocks:
        if block.status in TEST_FAILED:
            text = failure_text(result, block)
            head, _, rest = text.partition("\n")
            print(head, file=out)
            if rest.strip():
                print("\n".join("    " + line if line else "" for line in rest.strip("\n").split("\n")), file=out)


def print_test_summary(console: Console, results: Sequence[NoteResult], seconds: float) -> None:
    table = Table(title=None, show_edge=False, pad_edge=False)
    table.add_column("note", no_wrap=True)
    table.add_column("blocks", justify="right")
    table.add_column("passed", justify="right", style="green")
    table.add_column("failed", justify="right", style="red")
    table.add_column("skipped", justify="right", style="yellow")
    table.add_column("time", justify="right")
    table.add_column("device")
    totals = Counter[str]()
    for result in results:
        report = result.report
        blocks = [b for b in report.blocks if b.status != "not-run"]
        failed = sum(1 for b in blocks if b.status in TEST_FAILED) + (report.status in NOTE_FAILED)
        skipped = sum(1 for b in blocks if b.status == "skipped")
        passed = len(blocks) - skipped - sum(1 for b in blocks if b.status in TEST_FAILED)
        totals.update(blocks=len(blocks), passed=passed, failed=failed, skipped=skipped)
        mark = "[red]✗[/]" if result.failed else "[green]✓[/]"
        table.add_row(
            f"{mark} {result.path}",
            str(len(blocks)),
            str(passed),
            str(failed or ""),
            str(skipped or ""),
            f"{report.duration:.2f} s",
            report.device or "",
        )
    if results:
        console.print(table)
    failed_notes = sum(1 for r in results if r.failed)
    verdict = "[red]✗ failed[/]" if failed_notes else "[green]✓ passed[/]"
    console.print(
        f"{verdict}: {len(results)} note(s), {totals['blocks']} block(s): {totals['passed']} passed, "
        f"{totals['failed']} failed, {totals['skipped']} skipped in {seconds:.2f} s"
    )


def results_json(results: Sequence[NoteResult]) -> dict[str, Any]:
    return {"notes": [r.to_json() for r in results], "passed": not any(r.failed for r in results)}


# -- helpers -------------------------------------------------------------------------------
def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2)


def _set_counts(element: ET.Element, tests: int, failures: int, errors: int, skipped: int, seconds: float) -> None:
    element.set("tests", str(tests))
    element.set("failures", str(failures))
    element.set("errors", str(errors))
    element.set("skipped", str(skipped))
    element.set("time", f"{seconds:.3f}")


_XML_INVALID_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_safe(text: str) -> str:
    # XML 1.0 cannot hold most control characters (a traceback may carry some).
    return _XML_INVALID_RE.sub("\ufffd", text)


def _xml(root: ET.Element) -> str:
    for element in root.iter():
        if element.text:
            element.text = _xml_safe(element.text)
        for key, value in element.attrib.items():
            element.set(key, _xml_safe(value))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _split_one_line(text: str) -> tuple[str, int | None, str]:
    """Split `path:line: message` (or `path: message`) as VaultError.one_line() writes it."""
    head, sep, message = text.partition(": ")
    if not sep:
        return "", None, text
    path, colon, line = head.rpartition(":")
    if colon and line.isdigit():
        return path, int(line), message
    return head, None, message
