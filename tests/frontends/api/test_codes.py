"""The API's error-code table and the mapping of a finished run to its `error`: no kernel, no server."""

from __future__ import annotations

import pytest

from vault_runner.frontends.api.codes import CODES, ERROR_CODES, RUN_ERROR_CODES, http_status, run_error
from vault_runner.frontends.api.schemas import ErrorBody
from vault_runner.model import BlockReport, NoteReport


def block(status: str, *, reason: str | None = None, message: str | None = None, outputs=None) -> BlockReport:
    return BlockReport(
        note="a.md", index=0, line=3, first_line="x = 1", label=None, status=status, message=message,
        outputs=outputs or [], reason=reason,
    )  # fmt: skip


def code_of(report: NoteReport) -> str | None:
    found = run_error(report)
    return None if found is None else found.code


def test_every_code_is_in_the_openapi_enum_in_table_order() -> None:
    enum = ErrorBody.model_json_schema()["properties"]["code"]["enum"]
    assert enum == list(CODES)
    assert set(RUN_ERROR_CODES) <= set(CODES) and set(ERROR_CODES) <= set(CODES)


def test_status_comes_from_the_table_and_run_only_codes_have_none() -> None:
    assert http_status("unauthorized") == 401 and http_status("cancelled") == 409
    with pytest.raises(ValueError):
        http_status("conflict")  # only in a run's result (HTTP 200)


@pytest.mark.parametrize(
    ("reason", "code"),
    [("write_conflict", "conflict"), ("outside_vault", "run_failed"), (None, "run_failed")],
)
def test_a_failed_note_is_mapped_by_its_reason_not_its_message(reason: str | None, code: str) -> None:
    for message in ("the note kept changing", "something else"):
        report = NoteReport(note="a.md", status="failed", message=message, reason=reason)
        assert code_of(report) == code


@pytest.mark.parametrize(
    ("reason", "code"),
    [("cancelled", "cancelled"), ("superseded", "conflict"), ("interrupted", None), (None, None)],
)
def test_a_skipped_block_is_mapped_by_its_reason_not_its_message(reason: str | None, code: str | None) -> None:
    for message in ("not run: a newer save", "not run: the run was cancelled", "reworded"):
        report = NoteReport(note="a.md", status="ran", blocks=[block("skipped", reason=reason, message=message)])
        assert code_of(report) == code


def test_the_most_serious_problem_wins() -> None:
    interrupt = [{"type": "error", "ename": "KeyboardInterrupt", "evalue": ""}]
    report = NoteReport(
        note="a.md",
        status="ran",
        blocks=[block("unwritten"), block("error", outputs=[{"type": "error", "ename": "E", "evalue": "v"}]),
                block("timeout", message="timed out after 1 s"), block("dead")],
    )  # fmt: skip
    assert code_of(report) == "kernel_died"
    report.blocks.pop()
    assert code_of(report) == "timeout"
    report.blocks.pop()
    found = run_error(report)
    assert found is not None and (found.code, found.message) == ("block_error", "a.md:3: E: v")
    report.blocks.pop()
    assert code_of(report) == "conflict"
    report.blocks = [block("error", outputs=interrupt)]
    assert code_of(report) == "interrupted"
    report.blocks = [block("skipped", outputs=interrupt, reason="superseded")]
    assert code_of(report) == "cancelled"
    report.blocks = [block("ok")]
    assert code_of(report) is None
