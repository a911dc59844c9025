"""What a Ray task does on its worker: run one note in a fresh kernel, write nothing, return it all.

The task gets the note as the driver loaded it and the vault (its settings, and its files
shipped or on a shared filesystem: engine/shipping.py). It runs the same engine as a local
run, in a scratch copy of the vault, with the worker's own sandbox tier and the note's
options, and returns what the driver needs to write the note back itself: the report, each
block's rendered outputs with their attachment bytes, and the sources of its tracebacks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from vault_runner.core.render import CellSource
from vault_runner.disk.vault import Vault
from vault_runner.engine.loading import Loaded
from vault_runner.engine.run import BlockResult, Engine
from vault_runner.engine.shipping import materialize
from vault_runner.errors import VaultRunnerError
from vault_runner.model import NoteReport

__all__ = ("SCRATCH_PREFIX", "WorkerResult", "run_on_worker")

SCRATCH_PREFIX = "vault-runner-ray-"  # then the worker's pid: a killed worker's copy is found and removed


@dataclass
class WorkerResult:
    """A Run without its Loaded (the driver has its own), and where it ran."""

    report: NoteReport
    results: dict[int, BlockResult]
    kernel_restarted: bool = False
    sources: dict[int, CellSource] = field(default_factory=dict)
    node: str | None = None


def run_on_worker(vault: Vault, loaded: Loaded, files: bytes | str, limit: int, gpus: float) -> WorkerResult:
    """Run `loaded` in a scratch copy of `vault` (its files: a packed zip, or the vault's
    folder as this worker sees it) and return what ran; the copy is emptied afterwards."""
    node = _node_id()
    _remove_orphans()
    root = _scratch_root(vault)
    try:
        materialize(root, files if isinstance(files, bytes) else Path(files), limit)
        here = replace(vault, root=root)
        note = root / loaded.relative
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_bytes(loaded.data)  # the bytes the driver planned, whatever the copy held
        with _gpus_reserved(gpus):
            run = Engine(here).execute(replace(loaded, path=note))
        return WorkerResult(run.report, run.results, run.kernel_restarted, run.sources, node)
    except VaultRunnerError as exc:  # reported as the note's failure: our errors do not pickle
        message = f"{loaded.relative}: could not run on its Ray worker: {exc.one_line()}"
        report = NoteReport(note=loaded.relative, status="failed", message=message, reason="worker_failed")
        return WorkerResult(report, {}, node=node)
    except Exception as exc:  # a bug: its text reaches the driver, whatever the exception holds
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None
    finally:
        _empty(root)


_scratch: dict[Path, Path] = {}  # vault (as the driver names it) -> its scratch copy in this worker


def _scratch_root(vault: Vault) -> Path:
    """This worker process's scratch copy of a vault, empty. One folder per process and vault,
    kept from note to note: a kernel template is made per vault folder (kernel/fork), so
    the notes after the first are forked from it instead of each starting its own."""
    if vault.root not in _scratch or not _scratch[vault.root].is_dir():
        folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")).resolve()
        _scratch[vault.root] = folder / (vault.root.name or "vault")
        _scratch[vault.root].mkdir()
    root = _scratch[vault.root]
    _empty(root)
    return root


def _empty(root: Path) -> None:
    """Remove what a note left in the copy, keeping the folder (a template may sit in it)."""
    for entry in root.iterdir() if root.is_dir() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _remove_orphans() -> None:
    """Remove the scratch copies of workers that were killed mid-note (their `finally` never ran)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean
        return True
    return True


@contextmanager
def _gpus_reserved(gpus: float) -> Iterator[None]:
    """A note that reserved no GPU sees none (Ray only sets CUDA_VISIBLE_DEVICES for those
    that did), so `device: auto` cannot land on a GPU another task holds."""
    if gpus > 0:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _node_id() -> str | None:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside Ray (a test calling this directly): no node
        return None
