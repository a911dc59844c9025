"""Where `render` and `test` run their notes: here (`--executor local`) or on a Ray cluster.

The options of both commands, and the executor they give: which Engine runs a note, how
many notes are in flight, and how to cancel them on Ctrl+C. The Ray side lives in
engine/ray_executor.py; Ray itself is imported only when `--executor ray` is asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = ("MAX_IN_FLIGHT", "Executor", "add_executor_options", "executor")

# With Ray, every note is submitted at once and the cluster's resources decide what runs;
# each note in flight is a driver thread waiting on its task, so there is a ceiling.
MAX_IN_FLIGHT = 512


@dataclass
class Executor:
    engine: Callable[..., Any]  # Engine(vault, **kwargs), or a RayEngine on a cluster
    in_flight: Callable[[int, int], int]  # (notes, jobs asked for) -> notes run at once
    cancel: Callable[[], None]  # on Ctrl+C: stop what is still running elsewhere


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where notes run (README: Running on a Ray cluster)")
    group.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: kernels on this machine (default); ray: one Ray task per note on a cluster, "
        "the outputs written here (needs `pip install 'vault-runner[ray]'`)",
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster to use (`auto`, `HOST:PORT`, `ray://HOST:10001`); default: start a local Ray instance",
    )
    group.add_argument(
        "--ray-vault",
        choices=("ship", "shared"),
        default=None,
        help="how a note's files reach its worker: ship (a snapshot of the vault, default) or shared "
        "(the workers see the vault on a shared filesystem)",
    )
    group.add_argument(
        "--ray-path-map",
        metavar="DRIVER=WORKER",
        action="append",
        default=[],
        help="with a shared filesystem: the vault under DRIVER here is under WORKER on the workers "
        "(implies --ray-vault shared; repeatable)",
    )


@contextmanager
def executor(args: argparse.Namespace) -> Iterator[Executor]:
    """The executor a command's arguments ask for, for the time of the run."""
    kind = getattr(args, "executor", "local")
    if kind != "ray":
        from vault_runner.errors import VaultError

        given = [name for name in ("ray_address", "ray_vault") if getattr(args, name, None)]
        if given or getattr(args, "ray_path_map", None):
            raise VaultError(Path.cwd(), "the --ray-* options need --executor ray")
        from vault_runner.engine import Engine  # starts kernels: imported only by commands that run

        yield Executor(Engine, lambda notes, jobs: jobs, lambda: None)
        return
    from vault_runner.engine.ray_executor import RayCluster, RaySettings, parse_path_map

    path_map = parse_path_map(args.ray_path_map)
    if path_map and args.ray_vault == "ship":
        from vault_runner.errors import VaultError

        raise VaultError(Path.cwd(), "--ray-path-map is for a shared filesystem; it cannot go with --ray-vault ship")
    files = args.ray_vault or ("shared" if path_map else "ship")
    settings = RaySettings(address=args.ray_address, vault_files=files, path_map=path_map)
    # Redirected until Ray has shut down: its messages may come late.
    with contextlib.redirect_stdout(_MainThreadOnly(sys.stdout, sys.stderr)), RayCluster(settings) as cluster:
        yield Executor(cluster.engine, lambda notes, jobs: max(1, min(notes, MAX_IN_FLIGHT)), cluster.cancel)


class _MainThreadOnly(io.TextIOBase):
    """stdout for the main thread; what other threads print goes to stderr.

    Ray's driver prints the cluster's messages (a worker that died...) on stdout from a
    thread of its own, which would break `--json` and the `test` findings; the note's
    report already says what happened, and the message still shows, on stderr.
    """

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err

    def write(self, text: str) -> int:
        target = self.out if threading.current_thread() is threading.main_thread() else self.err
        return target.write(text)

    def flush(self) -> None:
        self.out.flush()
        self.err.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    def fileno(self) -> int:
        return self.out.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.out.encoding
