"""pytest plugin: the runnable blocks of a vault's opted-in notes as test items.

    pytest --vault DIR            (or, in the ini file:  vault = DIR)

Each opted-in note is a collector (nodeid: the note's path) and each runnable block an
item named `line N` (or its `label`), so `PyTorch/01 Tensores.md::line 23`. A note's
blocks share one kernel, started by the note's first item and shut down after its last
one; all items of a note share the note's nodeid part, so `pytest-xdist --dist loadfile`
keeps a note on one worker (the plugin switches plain `-n N` to loadfile by itself when a
vault is given). Running a subset of a note's blocks runs the blocks above them first,
because notebook blocks depend on the code above them.

Execution goes through the engine only (start_kernel / prepare / execute with start_at);
this module never reads markdown or talks to a kernel itself. Nothing is written back.
Importing it is cheap: pytest loads it in every run, vault or not.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vault_runner.errors import BlockFailed, VaultCollectError

if TYPE_CHECKING:
    from vault_runner.core.render import CellSource
    from vault_runner.disk.vault import Vault
    from vault_runner.engine import Engine, Kernel, Loaded


class VaultOptionWarning(UserWarning):
    """An option of a note that is ignored (unknown, or note-level in a `#|` line); it fails nothing."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vault-runner", "run the python blocks of Obsidian notes")
    group.addoption(
        "--vault",
        action="append",
        default=[],
        metavar="DIR",
        help="collect the runnable blocks of the opted-in notes of this vault (folder or notes) as tests",
    )
    group.addoption(
        "--vault-compare",
        action="store_true",
        default=False,
        help="also compare each block's text output with the output stored in the note (after sanitizers)",
    )
    parser.addini("vault", "vault folders (or notes) whose opted-in notes are collected as tests", type="paths")


def _vault_paths(config: pytest.Config) -> list[Path]:
    given = config.getoption("vault", default=None) or []
    if given:
        return [config.invocation_params.dir / p for p in given]
    return [Path(p) for p in config.getini("vault") or []]


def _dist_given(config: pytest.Config) -> bool:
    sources = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))]
    try:
        sources += list(config.getini("addopts"))
    except ValueError:
        pass
    return any(str(a).startswith(("--dist", "-d")) and not str(a).startswith("-dd") for a in sources)


def _vault_only(config: pytest.Config) -> bool:
    """`pytest --vault V` with no test paths collects the vault only, not the current folder's tests."""
    if not config.getoption("vault", default=None):
        return False
    sources = getattr(pytest.Config, "ArgsSource", None)
    return sources is not None and getattr(config, "args_source", None) != sources.ARGS


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    return True if _vault_only(config) else None


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    # `-n N` means `--dist load`, which would split a note's blocks over workers, each then
    # re-running the blocks above its share. Notes are cheaper whole: ask for loadfile,
    # unless the user chose a mode.
    if getattr(config.option, "dist", "no") == "load" and _vault_paths(config) and not _dist_given(config):
        config.option.dist = "loadfile"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: our items must exist before `-k`/`-m` deselection and other plugins see the list.
    paths = _vault_paths(config)
    if not paths:
        return
    for collector in _note_collectors(session, paths):
        items.extend(session.genitems(collector))


def _note_collectors(session: pytest.Session, paths: list[Path]) -> Iterator[VaultNote]:
    from vault_runner.engine import select
    from vault_runner.engine.targets import notes_under
    from vault_runner.errors import VaultError

    seen: set[Path] = set()
    try:
        found = notes_under(paths)
    except VaultError as exc:
        raise pytest.UsageError(f"--vault: {exc.one_line()}") from None
    for vault, path in found:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        error = None
        loaded = None
        try:
            loaded = select(vault, path).loaded
            if loaded is None or not loaded.runnable:
                continue
        except VaultError as exc:
            error = exc.one_line()
        yield VaultNote.from_parent(
            session, path=resolved, nodeid=_nodeid(session, resolved), vault=vault, loaded=loaded, error=error
        )


def _nodeid(session: pytest.Session, path: Path) -> str:
    try:
        return path.relative_to(session.config.rootpath).as_posix()
    except ValueError:
        return path.as_posix()


class VaultNote(pytest.File):
    """One opted-in note: collects its runnable blocks and owns their kernel."""

    def __init__(self, *, vault: Vault, loaded: Loaded | None, error: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vault = vault
        self.loaded = loaded
        self.error = error
        self.engine: Engine | None = None
        self.kernel: Kernel | None = None
        self.device: str | None = None
        self.sources: dict[int, CellSource] = {}
        self.next_index = 0  # first block index not yet run in this kernel
        self.stop_reason: str | None = None

    # -- collection --------------------------------------------------------------------
    def collect(self) -> Iterator[VaultBlock]:
        if self.loaded is None:
            raise VaultCollectError(self.error or f"{self.path}: cannot be read")
        self._warn_options(self.loaded)
        runnable = self.loaded.runnable
        labels = [p.options["label"] for p in runnable]
        for planned in runnable:
            label = planned.options["label"]
            line = planned.block.fence_line
            name = label if label and labels.count(label) == 1 else f"line {line}"
            yield VaultBlock.from_parent(self, name=name, index=planned.block.index, line=line)

    def _warn_options(self, loaded: Loaded) -> None:
        """Each option warning through pytest's warnings, at the option's own line: the run's
        warnings summary shows it as `note:line: VaultOptionWarning: ...`."""
        from vault_runner.ci.reports import warning_place
        from vault_runner.errors import shown_path

        for warning in loaded.warnings:
            path, line, message = warning_place(warning, loaded.relative, shown_path(self.path))
            warnings.warn_explicit(message, VaultOptionWarning, filename=path, lineno=line or 1)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, VaultCollectError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    # -- the note's kernel ---------------------------------------------------------------
    def setup(self) -> None:
        """Start and prepare the kernel: runs before the note's first item."""
        from vault_runner.engine import Engine
        from vault_runner.errors import KernelDied, KernelSetupError

        assert self.loaded is not None
        self.engine = Engine(self.vault)
        try:
            self.kernel = self.engine.start_kernel(self.loaded)
            self.device = self.engine.prepare(self.kernel, self.loaded)
        except (KernelSetupError, KernelDied) as exc:
            self.teardown()
            raise BlockFailed(f"{self.nodeid}: the kernel could not be started: {exc}") from None
        self.next_index = 0
        self.sources = {}
        self.stop_reason = None

    def teardown(self) -> None:
        """Shut the kernel down: runs after the note's last item, also on failure or interrupt."""
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            kernel.shutdown()

    def run_block(self, index: int) -> tuple[Any, str, str | None, str | None]:
        """Run the blocks from the last one run up to `index`.

        Returns (block report, rendered body, comparison diff, note about failed blocks above).
        """
        from vault_runner.ci.testing import FAILING, MISMATCH
        from vault_runner.core.compare import compare_bodies, compile_sanitizers
        from vault_runner.core.stopping import stop_message, stops_the_note

        assert self.engine is not None and self.loaded is not None
        if self.kernel is None:
            self.setup()
        if index < self.next_index:
            # Asked to run a block again (a rerun plugin): only a fresh kernel gives the
            # state the block expects.
            self.teardown()
            self.setup()
        loaded = self.loaded
        upto = dataclasses.replace(loaded, plan=loaded.plan[: index + 1])
        run = self.engine.execute(upto, self.kernel, device=self.device, start_at=self.next_index, sources=self.sources)
        first = self.next_index
        self.next_index = index + 1
        by_index = {b.index: b for b in run.report.blocks}
        if run.report.status == "failed":
            self.stop_reason = run.report.message or "the kernel failed"
            self.teardown()
            raise BlockFailed(self.stop_reason)
        above: list[str] = []
        for planned in loaded.plan[first : index + 1]:
            report = by_index.get(planned.block.index)
            if report is None or report.status not in FAILING:
                continue
            if planned.block.index < index:
                above.append(f"line {planned.block.fence_line} ({report.status})")
            if stops_the_note(planned, report.status, kernel_restarted=False):
                self.stop_reason = stop_message(planned, report.status, kernel_restarted=False)
        if run.kernel_restarted:
            self.stop_reason = (
                "not run: the kernel was restarted (a timeout or a crash) in an earlier block; "
                "fix it and run the note again"
            )
        report = by_index[index]
        result = run.results.get(index)
        body = result.rendered.body if result is not None and result.rendered is not None else ""
        diff = None
        planned = loaded.plan[index]
        region = planned.block.region
        compare = self.config.getoption("vault_compare") or planned.options["compare"]
        if compare and region is not None and report.status not in FAILING:
            diff = compare_bodies(region.body, body, compile_sanitizers(self.vault.config.sanitizers))
            if diff is not None:
                report.status = MISMATCH
                report.message = "its output differs from the output stored in the note"
        note_above = f"blocks above it failed: {', '.join(above)}" if above else None
        return report, body, diff, note_above


class VaultBlock(pytest.Item):
    """One runnable block of a note."""

    def __init__(self, *, index: int, line: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index
        self.line = line

    @property
    def note(self) -> VaultNote:
        assert isinstance(self.parent, VaultNote)
        return self.parent

    def runtest(self) -> None:
        from vault_runner.ci.reports import block_failure_text
        from vault_runner.ci.testing import FAILING

        note = self.note
        if note.stop_reason is not None:
            pytest.skip(note.stop_reason)
        report, body, diff, above = note.run_block(self.index)
        if report.status == "skipped":
            pytest.skip(report.message or "skipped")
        if report.status in FAILING:
            assert note.loaded is not None
            code = note.loaded.plan[self.index].block.code
            text = block_failure_text(self._shown_path(), report, code, diff if diff is not None else body)
            if above:
                text += f"\n\n(note: {above}; this block depends on them)"
            raise BlockFailed(text)

    def _shown_path(self) -> str:
        from vault_runner.ci.check import shown_path

        return shown_path(self.path)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, BlockFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        relative = self.note.loaded.relative if self.note.loaded is not None else self.path.name
        return self.path, self.line - 1, f"{relative}:{self.line}"
