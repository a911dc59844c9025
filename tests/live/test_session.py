"""NoteSession and Runner with real kernels: incremental runs, restart, supersede, interrupt.

No watcher here: the tests call the Runner the way the watcher and the API do.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Recorder, make_note_vault
from vault_runner.core import note as notes
from vault_runner.disk import trust
from vault_runner.disk.vault import load_vault
from vault_runner.engine import load
from vault_runner.errors import UntrustedVault
from vault_runner.kernel.fork.common import fork_disabled_reason
from vault_runner.live.runner import Runner

pytestmark = pytest.mark.kernel

WAIT = 120.0  # a guard against hanging, not a speed requirement


NOTES = {
    "incremental.md": """
        ---
        vault-runner: true
        ---
        # Incremental

        ```python
        runs = globals().get("runs", 0) + 1
        a = 1
        ```

        Some prose.

        ```python
        print("b", a + 1, "runs", runs)
        ```

        ```python
        print("c")
        ```
        """,
    "hidden.md": """
        ---
        vault-runner: true
        ---
        ```python
        x = 41
        ```

        ```python
        print("answer", x + 1)
        ```
        """,
    "blocks.md": """
        ---
        vault-runner: true
        ---
        ```python
        calls = []
        ```

        ```python
        calls.append("one")
        print(len(calls))
        ```

        ```python
        print("last")
        ```
        """,
    "slow.md": """
        ---
        vault-runner: true
        ---
        ```python
        import time
        ```

        ```python
        time.sleep(600)
        print("old")
        ```

        ```python
        print("after")
        ```
        """,
    "runaway.md": """
        ---
        vault-runner: true
        ---
        ```python
        while True:
            pass
        ```

        ```python
        print("after the loop")
        ```
        """,
    "dies.md": """
        ---
        vault-runner: true
        ---
        ```python
        x = 1
        ```

        ```python
        import os
        os._exit(1)
        ```

        ```python
        print("third")
        ```
        """,
    "restore.md": """
        ---
        vault-runner: true
        ---
        ```python
        print("kept output")
        ```
        """,
    "optout.md": """
        ---
        vault-runner: true
        ---
        ```python
        print("opted in")
        ```
        """,
    "seeded.md": """
        ---
        vault-runner: true
        execute:
          seed: 1
        ---
        ```python
        import torch
        print("value", round(torch.rand(1).item(), 6))
        ```
        """,
    "par_a.md": """
        ---
        vault-runner: true
        ---
        ```python
        print("a")
        ```
        """,
    "par_b.md": """
        ---
        vault-runner: true
        ---
        ```python
        print("b")
        ```
        """,
}


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Runner, Recorder]]:
    root = make_note_vault(tmp_path_factory.mktemp("session") / "vault", NOTES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAULT_RUNNER_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
        trust.trust(root)
        runner = Runner(load_vault(root), max_kernels=2, spares=1, check_interval=0.3)
        recorder = Recorder()
        runner.subscribe(recorder)
        try:
            runner.start()
            yield root, runner, recorder
        finally:
            runner.close()


def rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def region_of(path: Path, index: int) -> str | None:
    region = notes.parse_note(path.read_text(encoding="utf-8")).blocks[index].region
    return None if region is None else region.body


def all_current(root: Path, path: Path) -> bool:
    loaded = load(load_vault(root), path)
    return all(p.block.region is not None and p.block.region.code_hash == p.code_hash for p in loaded.runnable)


def executing(runner: Runner, name: str, index: int) -> Callable[[], bool]:
    """The block is in the kernel now (not just announced)."""
    return lambda: any(n["note"] == name and n["executing"] == index for n in runner.status()["notes"])


def statuses(report) -> list[str]:  # type: ignore[no-untyped-def]
    return [b.status for b in report.blocks]


def test_an_edit_runs_from_the_changed_block_and_keeps_the_blocks_above(vault) -> None:
    root, runner, _ = vault
    note = root / "incremental.md"
    first = runner.run_note(note).result(WAIT)
    assert statuses(first) == ["ok", "ok", "ok"]
    assert "b 2 runs 1" in (region_of(note, 1) or "")
    # The warm pool's kernels are forked where this machine can: the report says how.
    assert first.kernel == ("forked" if fork_disabled_reason() is None else "started")

    block0 = region_of(note, 0)
    rewrite(note, 'print("b", a + 1, "runs", runs)', 'print("B", a + 10, "runs", runs)')
    report = runner.note_changed(note).result(WAIT)
    assert statuses(report) == ["current", "ok", "ok"]
    # Block 0 did not run again: `runs` is still 1 in the warm kernel, and its region is as it was.
    assert "B 11 runs 1" in (region_of(note, 1) or "")
    assert region_of(note, 0) == block0
    assert all_current(root, note)

    # Prose only: nothing runs, nothing is written.
    rewrite(note, "Some prose.", "Some prose, edited.")
    stamp = note.stat().st_mtime_ns
    report = runner.note_changed(note).result(WAIT)
    assert report.status == "current"
    assert note.stat().st_mtime_ns == stamp


def test_hidden_state_stays_until_restart_and_run_all(vault) -> None:
    root, runner, _ = vault
    note = root / "hidden.md"
    assert statuses(runner.run_note(note).result(WAIT)) == ["ok", "ok"]
    # Delete the block that defines x: the warm kernel still has x (Jupyter's hidden state).
    rewrite(note, "```python\nx = 41\n```\n", "")
    text = note.read_text(encoding="utf-8")
    start = text.index("<!-- vault-runner:output")
    end = text.index("-->", text.index("<!-- vault-runner:end")) + 3
    note.write_text(text[:start] + text[end + 1 :], encoding="utf-8")  # and its output region
    report = runner.note_changed(note).result(WAIT)
    assert statuses(report) == ["ok"]
    assert "answer 42" in (region_of(note, 0) or "")
    # Restart and run all: the fresh top-to-bottom truth.
    report = runner.run_note(note, restart=True).result(WAIT)
    assert statuses(report) == ["error"]
    assert "NameError" in (region_of(note, 0) or "")


def test_run_block_runs_that_block_only(vault) -> None:
    root, runner, _ = vault
    note = root / "blocks.md"
    assert statuses(runner.run_note(note).result(WAIT)) == ["ok", "ok", "ok"]
    stamp_last = region_of(note, 2)
    report = runner.run_block(note, 1).result(WAIT)
    assert [(b.index, b.status) for b in report.blocks] == [(0, "current"), (1, "ok")]
    assert region_of(note, 1) is not None and "2" in (region_of(note, 1) or "")  # ran again: 2 calls
    assert region_of(note, 2) == stamp_last
    refused = runner.run_block(note, 7).result(WAIT)
    assert refused.status == "refused" and "blocks.md: there is no block 7" in (refused.message or "")


def test_a_newer_save_cuts_the_running_block_and_runs_the_new_code(vault) -> None:
    root, runner, recorder = vault
    note = root / "slow.md"
    mark = recorder.mark()
    first = runner.run_note(note)
    assert recorder.wait(lambda: any(e.index == 1 for e in recorder.kinds("block-started", "slow.md", mark)))
    rewrite(note, 'time.sleep(600)\nprint("old")', 'print("new")')
    second = runner.note_changed(note)
    cut = first.result(WAIT)
    assert [b.status for b in cut.blocks] == ["ok", "skipped", "skipped"]
    assert "newer save" in (cut.blocks[1].message or "")
    assert recorder.kinds("superseded", "slow.md", mark)
    report = second.result(WAIT)
    assert [b.status for b in report.blocks] == ["current", "ok", "ok"]
    text = note.read_text(encoding="utf-8")
    assert "KeyboardInterrupt" not in text
    assert "new" in (region_of(note, 1) or "") and "after" in (region_of(note, 2) or "")
    assert all_current(root, note)


def test_interrupt_stops_a_runaway_block_and_a_prose_save_does_not_restart_it(vault) -> None:
    root, runner, recorder = vault
    note = root / "runaway.md"
    mark = recorder.mark()
    future = runner.run_note(note)
    assert recorder.wait(executing(runner, "runaway.md", 0))
    assert runner.interrupt(note)
    report = future.result(WAIT)
    assert [b.status for b in report.blocks] == ["error", "skipped"]
    assert "KeyboardInterrupt" in (region_of(note, 0) or "")
    assert region_of(note, 1) is None
    mark = recorder.mark()
    note.write_text(note.read_text(encoding="utf-8") + "\nA line of prose.\n", encoding="utf-8")
    assert runner.note_changed(note).result(WAIT).status == "current"
    assert not recorder.kinds("block-started", "runaway.md", mark)
    assert not runner.interrupt(note)  # nothing runs now


def test_cancel_drops_what_is_queued(vault) -> None:
    root, runner, recorder = vault
    note = root / "runaway.md"
    running = runner.run_note(note, restart=True)
    assert recorder.wait(executing(runner, "runaway.md", 0))
    queued = runner.run_block(note, 1)
    assert runner.cancel(note)
    assert queued.cancelled()
    assert runner.interrupt(note)
    assert [b.status for b in running.result(WAIT).blocks] == ["error", "skipped"]


def test_a_kernel_that_dies_shows_in_the_note_and_the_next_run_starts_fresh(vault) -> None:
    root, runner, recorder = vault
    note = root / "dies.md"
    report = runner.run_note(note).result(WAIT)
    assert statuses(report) == ["ok", "dead", "skipped"]
    assert "KernelDied" in (region_of(note, 1) or "")
    rewrite(note, "import os\nos._exit(1)", "print('x is', x)")
    report = runner.note_changed(note).result(WAIT)
    assert statuses(report) == ["ok", "ok", "ok"]  # from the top: block 0 ran again
    assert "x is 1" in (region_of(note, 1) or "")


def test_a_kernel_killed_while_idle_is_replaced_and_the_note_is_told(vault) -> None:
    root, runner, recorder = vault
    note = root / "incremental.md"
    runner.run_note(note).result(WAIT)
    session = runner._existing(note)
    assert session is not None and session.slot is not None
    slot = session.slot
    assert slot.pid is not None
    os.kill(slot.pid, signal.SIGKILL)
    assert recorder.wait(lambda: slot.closed)
    rewrite(note, 'print("c")', 'print("c", "again")')
    report = runner.note_changed(note).result(WAIT)
    assert statuses(report) == ["ok", "ok", "ok"]
    assert any("stopped while the note was idle" in w for w in report.warnings)
    assert all_current(root, note)


def test_outputs_an_editor_dropped_are_put_back_without_running(vault) -> None:
    root, runner, recorder = vault
    note = root / "restore.md"
    runner.run_note(note).result(WAIT)
    with_outputs = note.read_text(encoding="utf-8")
    note.write_text(notes.strip_regions(notes.parse_note(with_outputs)), encoding="utf-8")
    mark = recorder.mark()
    report = runner.note_changed(note).result(WAIT)
    assert report.written
    assert not recorder.kinds("block-started", "restore.md", mark)
    assert note.read_text(encoding="utf-8") == with_outputs


def test_opting_out_gives_the_kernel_back(vault) -> None:
    root, runner, recorder = vault
    note = root / "optout.md"
    runner.run_note(note).result(WAIT)
    assert any(k["note"] == "optout.md" for k in runner.status()["pool"]["assigned"])
    rewrite(note, "vault-runner: true", "vault-runner: false")
    report = runner.note_changed(note).result(WAIT)
    assert report.status == "not-opted-in"
    assert recorder.kinds("note-dropped", "optout.md")
    assert not any(k["note"] == "optout.md" for k in runner.status()["pool"]["assigned"])


def test_a_new_seed_prepares_the_kernel_again_and_runs_all(vault) -> None:
    import torch

    root, runner, _ = vault
    note = root / "seeded.md"
    runner.run_note(note).result(WAIT)
    torch.manual_seed(1)
    assert f"value {round(torch.rand(1).item(), 6)}" in (region_of(note, 0) or "")
    rewrite(note, "seed: 1", "seed: 2")
    report = runner.note_changed(note).result(WAIT)
    assert statuses(report) == ["ok"]
    torch.manual_seed(2)
    assert f"value {round(torch.rand(1).item(), 6)}" in (region_of(note, 0) or "")


def test_one_note_runs_one_request_at_a_time_and_two_notes_run_in_parallel(vault) -> None:
    root, runner, recorder = vault
    a, b = root / "par_a.md", root / "par_b.md"
    runner.run_note(a).result(WAIT)
    runner.run_note(b).result(WAIT)  # both have a kernel now
    rewrite(a, 'print("a")', 'import time\ntime.sleep(1.5)\nprint("a")')
    rewrite(b, 'print("b")', 'import time\ntime.sleep(1.5)\nprint("b")')
    mark = recorder.mark()
    futures = [runner.note_changed(a), runner.run_block(a, 0), runner.note_changed(b)]
    for future in futures:
        assert future.result(WAIT).status == "ran"

    def spans(note: str) -> list[tuple[float, float]]:
        events = [(t, kind) for t, kind in recorder.timed(note, mark) if kind in {"note-started", "note-finished"}]
        kinds = [kind for _, kind in events]
        assert kinds == ["note-started", "note-finished"] * (len(kinds) // 2), f"runs of {note} overlapped: {kinds}"
        return [(events[i][0], events[i + 1][0]) for i in range(0, len(events), 2)]

    a_spans, b_spans = spans("par_a.md"), spans("par_b.md")
    assert len(a_spans) == 2 and len(b_spans) == 1
    assert any(s1 < e2 and s2 < e1 for s1, e1 in a_spans for s2, e2 in b_spans), "the two notes did not overlap"


def test_an_untrusted_vault_runs_nothing(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "vault", {"n.md": NOTES["restore.md"]})
    runner = Runner(load_vault(root), spares=0)
    try:
        with pytest.raises(UntrustedVault, match="vault-runner trust"):
            runner.start()
    finally:
        runner.close()


def test_untrust_while_running_stops_the_kernels_and_runs_nothing_more(tmp_path: Path) -> None:
    """Issue 9.4: the API answered 403 after untrust, but a save still ran the note's code."""
    # In a folder: under Landlock a note at the vault root cannot create files beside itself (issue 10.14).
    marker = tmp_path / "vault" / "Notas" / "ran.txt"
    note_text = (
        "---\nvault-runner: true\n---\n```python\nfrom pathlib import Path\n"
        "n = len(Path('ran.txt').read_text()) if Path('ran.txt').exists() else 0\n"
        "Path('ran.txt').write_text('x' * (n + 1))\n```\n"
    )
    root = make_note_vault(tmp_path / "vault", {"Notas/n.md": note_text})
    trust.trust(root)
    runner = Runner(load_vault(root), spares=1)
    recorder = Recorder()
    runner.subscribe(recorder)
    try:
        runner.start()
        first = runner.run_note(root / "Notas" / "n.md").result(timeout=WAIT)
        assert first is not None and first.status == "ran" and marker.read_text() == "x"
        assert runner.status()["pool"]["kernels"], runner.status()
        trust.untrust(root)
        refused = runner.run_note(root / "Notas" / "n.md").result(timeout=WAIT)
        assert refused is not None and refused.status == "refused" and refused.reason == "untrusted"
        assert "vault-runner trust" in (refused.message or "")
        assert marker.read_text() == "x"  # nothing ran after untrust
        assert recorder.wait(lambda: not runner.status()["pool"]["kernels"]), runner.status()
        trust.trust(root)
        again = runner.run_note(root / "Notas" / "n.md", restart=True).result(timeout=WAIT)
        assert again is not None and again.status == "ran" and marker.read_text() == "xx"
    finally:
        runner.close()
