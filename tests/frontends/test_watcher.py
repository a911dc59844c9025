"""The watcher on real folders: watchdog observer, warm kernels, write-back, faults, soak.

Every test starts a real Runner (real kernels) and a real watchdog observer on a tmp
copy of a vault, and stops both in a `finally`, also when the test fails.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Recorder, copy_sample_vault, make_note_vault
from vault_runner.core import note as notes
from vault_runner.disk import trust
from vault_runner.disk.atomic import swap_note
from vault_runner.disk.vault import load_vault
from vault_runner.engine import load
from vault_runner.errors import WriteConflict
from vault_runner.frontends.watcher import VaultWatcher
from vault_runner.live.runner import Runner

pytestmark = pytest.mark.kernel

WAIT = 120.0  # a guard against hanging, not a speed requirement


@contextmanager
def watching(root: Path, **options: object) -> Iterator[tuple[Runner, VaultWatcher, Recorder]]:
    trust.trust(root)
    settings = {"max_kernels": 2, "spares": 1, "check_interval": 0.5}
    settings.update(options.pop("runner", {}))  # type: ignore[arg-type]
    runner = Runner(load_vault(root), **settings)  # type: ignore[arg-type]
    recorder = Recorder()
    runner.subscribe(recorder)
    watcher = VaultWatcher(runner, health_interval=0.5, **options)  # type: ignore[arg-type]
    try:
        runner.start()
        watcher.start()
        yield runner, watcher, recorder
    finally:
        watcher.stop()
        runner.close()


def settle(runner: Runner, watcher: VaultWatcher, quiet: float = 0.3) -> None:
    """Wait until no event is pending and no run is queued or running, for `quiet` seconds."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        assert watcher.wait_quiet(WAIT) and runner.wait_idle(WAIT)
        time.sleep(quiet)
        if watcher.wait_quiet(0) and runner.wait_idle(0):
            return
    raise AssertionError("the watcher never settled")


def edit(path: Path, old: str, new: str) -> None:
    """Save like Obsidian does: rewrite the file in place."""
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace(old, new, 1))


def regions_current(path: Path, vault_root: Path) -> bool:
    loaded = load(load_vault(vault_root), path)
    return all(p.block.region is not None and p.block.region.code_hash == p.code_hash for p in loaded.runnable)


# -- watching a copy of sample_vault ------------------------------------------------------
@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Runner, VaultWatcher, Recorder]]:
    root = copy_sample_vault(tmp_path_factory.mktemp("sample") / "vault")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAULT_RUNNER_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
        with watching(root) as (runner, watcher, recorder):
            yield root, runner, watcher, recorder


def test_editing_a_block_writes_its_new_output_and_then_the_note_stays_still(sample) -> None:
    root, runner, watcher, recorder = sample
    note = root / "PyTorch" / "01 Tensores.md"
    relative = "PyTorch/01 Tensores.md"
    mark = recorder.mark()
    edit(note, 'print(f"ndim: {escalar.ndim}")', 'print(f"dimensiones: {escalar.ndim}")')
    assert recorder.wait(lambda: bool(recorder.kinds("note-written", relative, since=mark)))
    settle(runner, watcher)
    text = note.read_text(encoding="utf-8")
    assert "dimensiones: 0" in text
    assert regions_current(note, root)

    # No self-triggered loop: after the write-back the file stays as it is.
    before = (note.stat().st_mtime_ns, text)
    runs = len(recorder.kinds("note-started", since=mark))
    time.sleep(2.5)
    settle(runner, watcher)
    assert (note.stat().st_mtime_ns, note.read_text(encoding="utf-8")) == before
    assert len(recorder.kinds("note-started", since=mark)) == runs

    # A second edit of a later block runs from that block on, in the warm kernel.
    mark = recorder.mark()
    edit(note, "print(unos.dtype)", "print('tipo:', unos.dtype)")
    assert recorder.wait(lambda: bool(recorder.kinds("note-finished", relative, since=mark)))
    settle(runner, watcher)
    finished = recorder.kinds("note-finished", relative, since=mark)[-1]
    ran = [b for b in finished.data["report"]["blocks"] if b["status"] == "ok"]
    kept = [b for b in finished.data["report"]["blocks"] if b["status"] == "current"]
    assert ran and kept, "an incremental run keeps the blocks above the edit"
    assert min(b["line"] for b in ran) > max(b["line"] for b in kept)
    assert "tipo: torch.float32" in note.read_text(encoding="utf-8")


def test_editing_prose_only_runs_nothing(sample) -> None:
    root, runner, watcher, recorder = sample
    note = root / "PyTorch" / "02 Operaciones con tensores.md"
    relative = "PyTorch/02 Operaciones con tensores.md"
    # Its outputs are current (the first save runs it if the copy was not rendered).
    text = note.read_text(encoding="utf-8")
    note.write_text(text + "\n", encoding="utf-8")
    time.sleep(0.5)
    settle(runner, watcher)
    assert regions_current(note, root)

    mark = recorder.mark()
    lines = note.read_text(encoding="utf-8").split("\n")
    prose = next(i for i, line in enumerate(lines) if line and line[0].isalpha() and "`" not in line)
    lines[prose] = lines[prose] + " (una frase más)"
    note.write_text("\n".join(lines), encoding="utf-8")
    stamp = note.stat().st_mtime_ns
    time.sleep(1.0)
    settle(runner, watcher)
    assert not recorder.kinds("note-started", relative, since=mark)
    assert not recorder.kinds("block-started", relative, since=mark)
    assert note.stat().st_mtime_ns == stamp


# -- the soak test ---------------------------------------------------------------------------
SOAK_NOTE = """\
---
vault-runner: true
---
# Soak

Prose marker: v0

```python
import time
counter = 0
```

Some prose between blocks.

```python
print("block2 v0")
```

```python
time.sleep(0.03)
counter += 1
print("slept", counter > 0)
```

## Appended
"""


class Editor:
    """An editor saving a note every 20-50 ms, in place, the way Obsidian saves.

    It re-reads the file before each edit (as Obsidian reloads a file changed on disk),
    so our outputs become part of what it saves. It keeps `model`: the note's text with
    no output regions, with every edit applied. Nothing may ever lose one of its edits.
    """

    def __init__(self, path: Path, iterations: int, seed: int = 7) -> None:
        self.path = path
        self.iterations = iterations
        self.random = random.Random(seed)
        self.model = notes.strip_regions(notes.parse_note(path.read_text(encoding="utf-8")))
        self.written: list[str] = []  # every text it saved
        self.snapshots: list[str] = []  # every text it read
        self.block_value = 0

    @staticmethod
    def apply(text: str, operation: int, n: int) -> str:
        if operation == 0:  # type a new line at the end
            return text + f"appended line {n}\n"
        if operation == 1:  # edit prose
            return re.sub(r"Prose marker: v\d+", f"Prose marker: v{n}", text)
        return re.sub(r'print\("block2 v\d+"\)', f'print("block2 v{n}")', text)  # edit a block

    def run(self) -> None:
        for n in range(1, self.iterations + 1):
            operation = n % 3 if n <= 3 else self.random.randrange(3)
            if operation == 2:
                self.block_value = n
            current = self.path.read_text(encoding="utf-8")
            self.snapshots.append(current)
            new = self.apply(current, operation, n)
            self.model = self.apply(self.model, operation, n)
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.write(new)
            self.written.append(new)
            time.sleep(self.random.uniform(0.02, 0.05))


def _hashes_by_code(texts: list[str], scratch: Path) -> dict[tuple[int, str], set[str]]:
    """For each (block position, block code): every chained hash it had in some saved text."""
    vault = load_vault(scratch)
    valid: dict[tuple[int, str], set[str]] = {}
    for i, text in enumerate(texts):
        path = scratch / f"v{i}.md"
        path.write_text(text, encoding="utf-8")
        for position, planned in enumerate(load(vault, path).runnable):
            valid.setdefault((position, planned.block.code), set()).add(str(planned.code_hash))
        path.unlink()
    return valid


def _misplaced(text: str, before: str, valid: dict[tuple[int, str], set[str]]) -> list[str]:
    """Regions vault-runner wrote (in `text`, not in `before`) that sit under code that did not make them.

    A region records the chained hash of the code that produced it. Once written, the
    editor may change the code above or inside its block: the region is then visibly
    stale (older), which is fine. What must never happen is that vault-runner writes a
    region under code other than the code that ran: its hash must be a hash that this
    block, with its code as it is in `text`, had in some version of the note.
    """
    previous = {
        (position, block.region.code_hash, block.region.body)
        for position, block in enumerate(notes.parse_note(before).blocks)
        if block.region is not None
    }
    wrong = []
    for position, block in enumerate(notes.parse_note(text).blocks):
        region = block.region
        if region is None or (position, region.code_hash, region.body) in previous:
            continue
        if region.code_hash not in valid.get((position, block.code), set()):
            wrong.append(f"block {position} ({block.code.splitlines()[0]!r}) got region {region.code_hash}")
    return wrong


def test_soak_an_editor_saving_every_few_ms_never_loses_an_edit(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "vault", {"soak.md": SOAK_NOTE})
    note = root / "soak.md"
    scratch = make_note_vault(tmp_path / "scratch", {})
    with watching(root) as (runner, watcher, recorder):
        assert runner.pool.wait_for_spares(WAIT)
        editor = Editor(note, iterations=300)
        thread = threading.Thread(target=editor.run)
        thread.start()
        thread.join()
        written_during = len(recorder.kinds("note-written", "soak.md"))
        superseded = len(recorder.kinds("superseded", "soak.md"))
        settle(runner, watcher, quiet=0.5)
        final = note.read_text(encoding="utf-8")

    # 1. Every edit of the editor is in the file, and nothing else changed outside regions.
    assert notes.strip_regions(notes.parse_note(final)) == editor.model
    # 2. Runs finished while the editor typed: outputs were written back during the soak.
    assert written_during >= 3, f"only {written_during} write-backs during the soak"
    print(f"soak: {len(editor.written)} saves, {written_during} write-backs, {superseded} runs cut by a newer save")
    # 3. Never misplaced: in every state the editor saw, and at the end, each region's hash is
    #    the chained hash its block's current code had in some version of the note.
    valid = _hashes_by_code([*editor.written, final], scratch)
    befores = [SOAK_NOTE, *editor.written]
    for snapshot, before in zip([*editor.snapshots, final], befores, strict=True):
        assert _misplaced(snapshot, before, valid) == []
    # 4. Settled: every block has the output of its current code (and the code above it).
    assert regions_current(note, root)
    region = notes.parse_note(final).blocks[1].region
    assert region is not None and f"block2 v{editor.block_value}" in region.body


def test_the_swap_never_loses_an_in_place_save_that_lands_during_it(tmp_path: Path) -> None:
    """The write-back's compare-and-swap against an editor saving in place every few ms.

    An in-place save that opens the note between the compare and the rename writes into
    the replaced file; vault.swap_note holds a read lease on it, so the save is put back (no kernel here).
    """
    path = tmp_path / "note.md"
    path.write_bytes(b"start\n")
    stop = threading.Event()
    typed: list[str] = []

    def editor() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            text = path.read_text(encoding="utf-8")
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + f"edit {n}\n")
            typed.append(f"edit {n}\n")
            time.sleep(0.005)

    swaps = 0

    def write_backs() -> None:
        nonlocal swaps
        while not stop.is_set():
            current = path.read_bytes()
            if not current:
                continue
            try:
                swap_note(path, current, current)  # same bytes: any loss is the editor's
                swaps += 1
            except WriteConflict:
                pass

    threads = [threading.Thread(target=editor), threading.Thread(target=write_backs)]
    for thread in threads:
        thread.start()
    # Enough overlapping saves and swaps, however loaded the machine (bounded).
    deadline = time.monotonic() + 60.0
    while (swaps < 150 or len(typed) < 150) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join()
    final = path.read_text(encoding="utf-8")
    assert swaps > 100 and len(typed) > 100
    assert [edit for edit in typed if edit not in final] == []


# -- notes that appear, move, go, opt in and out; what is ignored ---------------------------
NEW_NOTE = """\
---
vault-runner: true
---
# Nueva

```python
print("nueva nota")
```
"""


def test_a_created_note_runs_a_renamed_one_keeps_its_kernel_a_deleted_one_gives_it_back(sample) -> None:
    root, runner, watcher, recorder = sample
    created = root / "Borradores" / "Nueva.md"
    mark = recorder.mark()
    created.write_text(NEW_NOTE, encoding="utf-8")
    assert recorder.wait(lambda: bool(recorder.kinds("note-written", "Borradores/Nueva.md", since=mark)))
    assert "nueva nota" in created.read_text(encoding="utf-8")
    settle(runner, watcher)

    mark = recorder.mark()
    renamed = root / "Borradores" / "Renombrada.md"
    created.rename(renamed)
    settle(runner, watcher)
    assert not recorder.kinds("note-started", since=mark)
    notes_now = {n["note"]: n for n in runner.status()["notes"]}
    assert notes_now["Borradores/Renombrada.md"]["kernel"] and "Borradores/Nueva.md" not in notes_now

    mark = recorder.mark()
    renamed.unlink()
    assert recorder.wait(lambda: bool(recorder.kinds("note-dropped", "Borradores/Renombrada.md", since=mark)))
    settle(runner, watcher)
    assert "Borradores/Renombrada.md" not in {k["note"] for k in runner.status()["pool"]["assigned"]}


def test_hidden_trashed_attachment_and_excluded_files_are_ignored(sample) -> None:
    root, runner, watcher, recorder = sample
    app = root / ".obsidian" / "app.json"
    settings = json.loads(app.read_text(encoding="utf-8"))
    mark = recorder.mark()
    app.write_text(json.dumps({**settings, "userIgnoreFilters": ["Privado/"]}), encoding="utf-8")
    assert recorder.wait(lambda: any("settings reloaded" in m for m in recorder.logs(mark)))

    mark = recorder.mark()
    ignored = [".obsidian/plugin.md", ".trash/old.md", ".oculta/note.md", "Privado/secreto.md"]
    for relative in ignored:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(NEW_NOTE, encoding="utf-8")
    (root / "adjuntos" / "grafico.png").write_bytes(b"\x89PNG not really ```python")
    visible = root / "Visible" / "nota.md"
    visible.parent.mkdir()
    visible.write_text(NEW_NOTE, encoding="utf-8")  # the control: this one runs
    assert recorder.wait(lambda: bool(recorder.kinds("note-written", "Visible/nota.md", since=mark)))
    settle(runner, watcher)
    started = {e.note for e in recorder.kinds("note-started", since=mark)}
    assert started == {"Visible/nota.md"}
    for relative in ignored:
        assert "vault-runner:output" not in (root / relative).read_text(encoding="utf-8")


def test_a_note_that_opts_in_runs_and_one_that_opts_out_is_dropped(sample) -> None:
    root, runner, watcher, recorder = sample
    note = root / "Borradores" / "Ideas sin ejecutar.md"
    relative = "Borradores/Ideas sin ejecutar.md"
    mark = recorder.mark()
    edit(note, "type: knowledge\n", "type: knowledge\nvault-runner: true\n")
    assert recorder.wait(lambda: bool(recorder.kinds("note-written", relative, since=mark)))
    settle(runner, watcher)
    assert "NameError" in note.read_text(encoding="utf-8")  # its code is half-written, as it says

    mark = recorder.mark()
    edit(note, "vault-runner: true", "vault-runner: false")
    assert recorder.wait(lambda: bool(recorder.kinds("note-dropped", relative, since=mark)))
    settle(runner, watcher)
    assert relative not in {k["note"] for k in runner.status()["pool"]["assigned"]}


# -- faults ------------------------------------------------------------------------------------
FAULT_NOTES = {
    "a.md": NEW_NOTE,
    "b.md": NEW_NOTE.replace("nueva nota", "b runs"),
    "sub/c.md": "# plain note\n",
}


def test_faults_give_one_clear_line_and_the_watcher_keeps_serving(tmp_path: Path) -> None:
    root = make_note_vault(tmp_path / "vault", FAULT_NOTES)
    b = root / "b.md"
    with watching(root, burst_limit=25) as (runner, watcher, recorder):
        assert runner.pool.wait_for_spares(WAIT)

        def serves(marker: str) -> None:
            mark = recorder.mark()
            text = b.read_text(encoding="utf-8")
            b.write_text(re.sub(r'print\("[^"]*"\)', f'print("{marker}")', text), encoding="utf-8")
            assert recorder.wait(lambda: bool(recorder.kinds("note-written", "b.md", since=mark)))
            assert marker in b.read_text(encoding="utf-8")

        # A note replaced by a folder.
        a = root / "a.md"
        mark = recorder.mark()
        a.write_text(NEW_NOTE + "\n", encoding="utf-8")
        assert recorder.wait(lambda: bool(recorder.kinds("note-written", "a.md", since=mark)))
        settle(runner, watcher)
        a.unlink()
        a.mkdir()
        assert recorder.wait(lambda: any("a.md: the note was replaced by a folder" in m for m in recorder.logs(mark)))

        # Symlink loops: a note that points at itself, a folder that contains itself.
        os.symlink("loop.md", root / "loop.md")
        os.symlink(".", root / "sub" / "again")
        assert recorder.wait(lambda: any("loop.md: is a symbolic link that loops" in m for m in recorder.logs(mark)))

        # A 50 MB note.
        with open(root / "big.md", "wb") as handle:
            handle.write(b"```python\nprint(1)\n```\n" + b"x" * (50 * 2**20))
        big = re.compile(r"big\.md: is [\d.]+ MB, over the 10 MB limit for notes vault-runner runs; split it")
        assert recorder.wait(lambda: any(big.search(m) for m in recorder.logs(mark)))
        serves("after the faults")

        # 1,000 notes at once (a git checkout): one line, and not 1,000 runs.
        burst = root / "burst"
        burst.mkdir()
        for i in range(1000):
            (burst / f"n{i:04}.md").write_text(NEW_NOTE.replace("nueva nota", f"burst {i}"), encoding="utf-8")
        assert recorder.wait(lambda: any("many notes changed at once" in m for m in recorder.logs(mark)))
        settle(runner, watcher)
        assert recorder.wait(lambda: any("the burst is over" in m for m in recorder.logs(mark)))
        burst_runs = {e.note for e in recorder.kinds("note-started", since=mark) if e.note.startswith("burst/")}
        assert len(burst_runs) <= 25
        serves("after the burst")

        # No busy loop: idle, the process uses next to no CPU, and each fault was said once.
        settle(runner, watcher)
        assert recorder.wait(lambda: runner.pool.stats()["starting"] == 0)  # no kernel start while measured
        before = os.times()
        time.sleep(2.0)
        after = os.times()
        busy = (after.user + after.system) - (before.user + before.system)
        assert busy < 1.0, f"{busy:.2f} s of CPU in 2 s while idle: a busy loop"
        logs = recorder.logs(mark)
        for phrase in ("replaced by a folder", "loops back", "over the 10 MB limit", "many notes changed"):
            assert sum(phrase in m for m in logs) == 1, (phrase, logs)

        # The vault folder deleted, then back: watched again.
        mark = recorder.mark()
        saved = tmp_path / "saved"
        shutil.copytree(root, saved, symlinks=True, ignore=shutil.ignore_patterns("burst", "big.md"))
        shutil.rmtree(root)
        assert recorder.wait(lambda: any("the vault folder is gone" in m for m in recorder.logs(mark)))
        shutil.copytree(saved, root, symlinks=True)
        assert recorder.wait(lambda: any("the vault folder is back" in m for m in recorder.logs(mark)))
        serves("after the vault came back")


# -- the `watch` command ---------------------------------------------------------------------
def _can_drop_root() -> bool:
    """Can we run the command as a user that file permissions apply to (root ignores them)?"""
    if os.geteuid() != 0:
        return True
    try:
        return subprocess.run(["unshare", "-U", "--map-user=1000", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


class Lines:
    """The JSON lines a subprocess prints, read on a thread."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.items: list[dict] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            with self.cond:
                self.items.append(json.loads(line))
                self.cond.notify_all()

    def wait(self, predicate: Callable[[dict], bool], timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = next((item for item in self.items if predicate(item)), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no such line; got {[i['kind'] for i in self.items]}"
                self.cond.wait(min(remaining, 0.2))


def test_the_watch_command_refuses_an_untrusted_vault_then_watches_and_stops_cleanly(tmp_path: Path) -> None:
    root = copy_sample_vault(tmp_path / "vault")
    command = [sys.executable, "-m", "vault_runner", "watch", str(root), "--json"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=WAIT)
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert f"vault-runner trust {root}" in refused.stderr and refused.stderr.strip().count("\n") == 0

    trust.trust(root)
    locked = root / "PyTorch" / "00 Fundamentos de deep learning.md"
    drop_root = _can_drop_root()
    prefix = ["unshare", "-U", "--map-user=1000"] if os.geteuid() == 0 and drop_root else []
    process = subprocess.Popen(prefix + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = Lines(process.stdout)
        lines.wait(lambda item: item["kind"] == "watching")
        lines.wait(lambda item: item["kind"] == "kernel-warm")
        note = root / "PyTorch" / "01 Tensores.md"
        edit(note, 'print(f"ndim: {escalar.ndim}")', 'print(f"dimensiones: {escalar.ndim}")')
        written = lines.wait(lambda item: item["kind"] == "note-written" and item["note"] == "PyTorch/01 Tensores.md")
        assert written["data"] == {}
        finished = lines.wait(lambda item: item["kind"] == "note-finished")
        assert finished["data"]["written"] and "dimensiones: 0" in note.read_text(encoding="utf-8")
        if drop_root:
            locked.chmod(0)
            os.utime(locked)
            line = lines.wait(lambda item: item["kind"] == "log" and "permission denied" in item["data"]["message"])
            assert line["data"]["message"].startswith(f"{locked}: cannot be read (permission denied)")
            assert line["note"] == "PyTorch/00 Fundamentos de deep learning.md"  # JSON: vault-relative
        process.send_signal(signal.SIGINT)
        assert process.wait(WAIT) == 0
        lines.thread.join(WAIT)
        assert lines.items[-1]["kind"] == "stopped"
    finally:
        locked.chmod(0o644)
        if process.poll() is None:
            process.kill()
            process.wait()
    # Every kernel it started is gone with it.
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(root).encode() in (proc / "cmdline").read_bytes():
                leftovers.append(proc.name)
        except OSError:
            continue
    assert leftovers == []


# -- a save read half-way (issue 10.12) ----------------------------------------------------------
def test_a_note_read_half_way_through_a_save_keeps_its_warm_kernel_and_runs_once_complete(tmp_path: Path) -> None:
    text = "---\nvault-runner: true\n---\n```python\nimport os\nprint('pid', os.getpid())\n```\n"
    root = make_note_vault(tmp_path / "v", {"n.md": text})
    note = root / "n.md"
    with watching(root) as (runner, watcher, recorder):
        os.utime(note)  # a save: the note gets its kernel
        assert recorder.wait(lambda: bool(recorder.kinds("note-written", "n.md")))
        settle(runner, watcher)
        [first_pid] = re.findall(r"^pid (\d+)$", note.read_text(encoding="utf-8"), re.MULTILINE)
        mark = recorder.mark()
        full = note.read_text(encoding="utf-8").replace("print('pid',", "print('pid again',")
        half = full[: full.index("true")]  # cut inside the properties: `---\nvault-runner: `
        with open(note, "w", encoding="utf-8") as handle:  # an editor writing in two goes
            handle.write(half)
            handle.flush()
            settle(runner, watcher)  # the watcher has read the half-written note meanwhile
            assert note.read_text(encoding="utf-8") == half
            handle.write(full[len(half) :])
        settle(runner, watcher)
        assert recorder.kinds("note-finished", "n.md", since=mark)
        assert not recorder.kinds("note-dropped", "n.md", since=mark)
        assert not recorder.kinds("kernel-assigned", "n.md", since=mark)  # no new kernel
        [again] = re.findall(r"^pid again (\d+)$", note.read_text(encoding="utf-8"), re.MULTILINE)
        assert again == first_pid  # the same warm kernel ran it


def test_a_superseded_run_says_the_line_where_it_stops(tmp_path: Path) -> None:
    text = "---\nvault-runner: true\n---\n```python\nimport time\ntime.sleep(4)\n```\n\n```python\nprint(1)\n```\n"
    root = make_note_vault(tmp_path / "v", {"n.md": text})
    note = root / "n.md"
    with watching(root) as (runner, watcher, recorder):
        os.utime(note)
        assert recorder.wait(lambda: bool(recorder.kinds("block-started", "n.md")))
        edit(note, "print(1)", "print(2)")
        assert recorder.wait(lambda: bool(recorder.kinds("superseded", "n.md")))
        [event] = recorder.kinds("superseded", "n.md")
        lines = note.read_text(encoding="utf-8").split("\n")
        assert event.line == lines.index("print(2)")  # the fence line, as the note reads now
        settle(runner, watcher)
