"""Run notes on a Ray cluster: workers compute, the driver writes (DESIGN.md, addition 13).

`RayCluster` is a run's connection to Ray (a local instance it starts, a cluster at an
address, or the one this process is already connected to) and its outstanding tasks.
`RayEngine` is the Engine with one thing changed: `execute` sends the note to a Ray task
(engine/ray_worker.py) and waits for its Run. Everything else is the local engine on the
driver: which notes are current, the compare-and-swap write-back, attachment naming and
stale-file cleanup, the reports.

A note is one task: one CPU, and the GPUs its options ask for (`gpu_need`), which Ray
reserves and hands to the task in CUDA_VISIBLE_DEVICES. A task is not retried: a note's
code may have side effects outside the vault and may run for hours, so a worker lost
mid-note fails that note, with a message saying so, and the other notes go on.

Ray is an optional extra (`pip install 'vault-runner[ray]'`), imported only here and only
when a command asks for `--executor ray`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from vault_runner.core.images import checked_image
from vault_runner.core.render import IMAGE_TYPES, Attachment, attachment_name
from vault_runner.disk.vault import Vault
from vault_runner.engine.loading import Loaded
from vault_runner.engine.ray_worker import WorkerResult, run_on_worker
from vault_runner.engine.run import BlockResult, Engine, Run, attachment_stem
from vault_runner.engine.shipping import max_vault_bytes, pack, worker_path
from vault_runner.errors import VaultError
from vault_runner.model import Event, NoteReport

__all__ = ("RAY_MISSING", "RayCluster", "RayEngine", "RaySettings", "gpu_need", "parse_path_map")

RAY_MISSING = (
    "--executor ray needs Ray, which is not installed; install the extra with `pip install 'vault-runner[ray]'`"
)
VaultFiles = Literal["ship", "shared"]


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local Ray instance (or use the one already connected)
    vault_files: VaultFiles = "ship"  # how a note's files reach its worker (engine/shipping.py)
    path_map: tuple[tuple[str, str], ...] = ()  # shared filesystem: driver path prefix -> worker path prefix


def parse_path_map(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`DRIVER=WORKER` items (`--ray-path-map`), as (driver, worker) pairs of absolute paths."""
    pairs = []
    for item in items:
        driver, sep, worker = item.partition("=")
        if not sep or not driver or not worker:
            raise VaultError(Path(item), "is not a path mapping: write --ray-path-map DRIVER_PATH=WORKER_PATH")
        pairs.append((str(Path(driver).expanduser().absolute()), worker))
    return tuple(pairs)


def gpu_need(options: Mapping[str, Any]) -> float:
    """The GPUs a note reserves: its `gpus` option; else one for `device: cuda` (or cuda:N),
    none for the rest (a note on `auto` runs on CPU unless it says `gpus:`)."""
    if options.get("gpus") is not None:
        return float(options["gpus"])
    return 1.0 if str(options.get("device", "auto")).startswith("cuda") else 0.0


class RayCluster:
    """A run's Ray connection, its shipped vaults and its outstanding tasks.

    Leaving it on an exception (Ctrl+C) cancels every outstanding task, which kills the
    workers and their kernels; a local instance it started is shut down on leaving.
    """

    def __init__(self, settings: RaySettings = RaySettings()) -> None:
        self.settings = settings
        self.limit = max_vault_bytes()
        self._ray: Any = None
        self._task: Any = None
        self._started = False
        self._lock = threading.Lock()
        self._shipped: dict[Path, Any] = {}  # vault root -> ObjectRef of its zip
        self._outstanding: set[Any] = set()

    def __enter__(self) -> RayCluster:
        try:
            import ray
        except ModuleNotFoundError as exc:
            if exc.name != "ray":
                raise
            raise VaultError(Path.cwd(), RAY_MISSING) from None
        self._ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if self.settings.address is not None:
                kwargs["address"] = self.settings.address
            try:
                ray.init(log_to_driver=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.settings.address or "a local instance"
                raise VaultError(Path.cwd(), f"could not connect to the Ray cluster at {where}: {exc}") from None
            self._started = True
        self._task = ray.remote(run_on_worker)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            self.cancel()
        self._shipped.clear()
        if self._started:
            self._ray.shutdown()

    def cancel(self) -> None:
        """Cancel every outstanding task (force: the worker and the note's kernel are killed)."""
        with self._lock:
            outstanding = list(self._outstanding)
        for ref in outstanding:
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # already finished, or the cluster is gone: nothing to cancel
                pass

    def engine(self, vault: Vault, **kwargs: Any) -> RayEngine:
        return RayEngine(vault, cluster=self, **kwargs)

    # -- one note ----------------------------------------------------------------------------
    def _files(self, vault: Vault) -> Any:
        if self.settings.vault_files == "shared":
            return str(worker_path(vault.root, self.settings.path_map))
        with self._lock:
            if vault.root not in self._shipped:
                self._shipped[vault.root] = self._ray.put(pack(vault.root, self.limit))
            return self._shipped[vault.root]

    def run(self, vault: Vault, loaded: Loaded) -> WorkerResult | NoteReport:
        """Run a note on the cluster: its WorkerResult, or the failed report of a task that
        returned none (`reason`: cancelled, worker_failed, worker_lost)."""
        gpus = gpu_need(loaded.note_options.values)
        task = self._task.options(
            name=f"vault-runner: {loaded.relative}", num_cpus=1, num_gpus=gpus, max_retries=0, retry_exceptions=False
        )
        ref = task.remote(vault, loaded, self._files(vault), self.limit, gpus)
        with self._lock:
            self._outstanding.add(ref)
        errors = self._ray.exceptions
        try:
            result: WorkerResult = self._ray.get(ref)
            return result
        except errors.TaskCancelledError:
            return _failed(loaded, "cancelled", "cancelled before it finished (its Ray task was cancelled)")
        except errors.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return _failed(
                loaded, "worker_failed", f"vault-runner failed on its Ray worker ({type(cause).__name__}: {cause})"
            )
        except errors.RayError as exc:  # the worker or its node died, an object was lost
            return _failed(
                loaded,
                "worker_lost",
                f"the Ray worker running this note was lost mid-note ({type(exc).__name__}: {_first_line(exc)}); "
                "the other notes went on",
            )
        finally:
            with self._lock:
                self._outstanding.discard(ref)


class RayEngine(Engine):
    """The Engine whose fresh-kernel runs happen on a Ray worker; write-back stays here."""

    def __init__(self, vault: Vault, *, cluster: RayCluster, **kwargs: Any) -> None:
        super().__init__(vault, **kwargs)
        self.cluster = cluster

    def execute_fresh(self, loaded: Loaded) -> Run:
        """Run the whole note on a Ray worker; only what a local run would write comes back."""
        self.on_event(Event("note-started", loaded.relative, data={"blocks": len(loaded.runnable)}))
        result = self.cluster.run(self.vault, loaded)
        if isinstance(result, NoteReport):
            return Run(loaded, result, {})
        result.report.node = result.node
        stem = attachment_stem(loaded)
        for block in result.results.values():
            for attachment in block.rendered.attachments if block.rendered else ():
                if not _is_ours(attachment, stem):
                    # Only the driver writes, and only what a local run would have written.
                    refused = _failed(
                        loaded, "worker_failed", "its Ray worker sent back a file vault-runner would not write"
                    )
                    return Run(loaded, refused, {})
        return Run(
            loaded,
            result.report,
            {index: self._here(block, loaded) for index, block in result.results.items()},
            result.kernel_restarted,
            result.sources,
        )

    def _here(self, result: BlockResult, loaded: Loaded) -> BlockResult:
        """A block's result pointed at this vault and note. The worker rendered it for its
        scratch copy, which has the vault's layout, so links are already as a local run
        writes them; an error's tracebacks are re-rendered here, when write-back relines them."""
        if result.rerender is None:
            return result
        return replace(result, rerender=replace(result.rerender, vault=self.vault, note=loaded.path))


def _is_ours(attachment: Attachment, stem: str) -> bool:
    """An attachment as a local run names and checks it: its name is the hash of its bytes
    under this note's stem (so no folder, no other file's name), its bytes are the image it claims."""
    extension = IMAGE_TYPES.get(attachment.mime)
    return (
        extension is not None
        and attachment.name == attachment_name(stem, attachment.data, extension)
        and checked_image(attachment.mime, attachment.data)[0] == attachment.data
    )


def _failed(loaded: Loaded, reason: str, what: str) -> NoteReport:
    report = NoteReport(note=loaded.relative, status="failed", message=f"{loaded.relative}: {what}; run it again")
    report.reason = reason
    report.warnings = list(loaded.warnings)
    return report


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"
