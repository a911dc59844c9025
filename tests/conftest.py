from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vault_runner.model import Event

REPO = Path(__file__).resolve().parent.parent
SAMPLE_VAULT = REPO / "sample_vault"


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the real user's config dir (trust store) from a test."""
    monkeypatch.setenv("VAULT_RUNNER_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))


def copy_sample_vault(destination: Path) -> Path:
    shutil.copytree(SAMPLE_VAULT, destination)
    return destination


def make_note_vault(root: Path, notes: dict[str, str], app: dict | None = None, config: str | None = None) -> Path:
    """A small vault: `notes` maps relative paths to (dedented) note text."""
    (root / ".obsidian").mkdir(parents=True, exist_ok=True)
    (root / ".obsidian" / "app.json").write_text(json.dumps(app or {}), encoding="utf-8")
    if config is not None:
        (root / "vault-runner.toml").write_text(config, encoding="utf-8")
    for relative, text in notes.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root


RECORDER_WAIT = 120.0


class Recorder:
    """Collects runner events; lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []
        self.cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self.cond:
            self.events.append((time.monotonic(), event))
            self.cond.notify_all()

    def kinds(self, kind: str, note: str | None = None, since: int = 0) -> list[Event]:
        with self.cond:
            return [e for _, e in self.events[since:] if e.kind == kind and (note is None or e.note == note)]

    def mark(self) -> int:
        with self.cond:
            return len(self.events)

    def wait(self, predicate: Callable[[], bool], timeout: float = RECORDER_WAIT) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, 0.2))
            return True

    def logs(self, since: int = 0) -> list[str]:
        return [str(e.data.get("message")) for e in self.kinds("log", since=since)]

    def timed(self, note: str, since: int = 0) -> list[tuple[float, str]]:
        with self.cond:
            return [(t, e.kind) for t, e in self.events[since:] if e.note == note]


@pytest.fixture
def recorder() -> Recorder:
    """A fresh event recorder for a runner's subscribers."""
    return Recorder()


@pytest.fixture(scope="session")
def rendered_sample_vault(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rendered copy of sample_vault, shared by the tests that only read it (a no-op render
    once the repo's copy is rendered). Tests that edit it take a private copy."""
    root = copy_sample_vault(tmp_path_factory.mktemp("rendered") / "vault")
    done = subprocess.run(
        [sys.executable, "-m", "vault_runner", "render", str(root)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return root


@contextmanager
def using_config_dir(path: Path) -> Iterator[Path]:
    """For a module-scoped server: the config dir (trust store, token) it starts with."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAULT_RUNNER_CONFIG_DIR", str(path))
        yield path


def available_tiers() -> list[str]:
    """The sandbox tiers this machine has, strongest first (plain, uncontained, always)."""
    from vault_runner.kernel.sandbox.probe import probe

    found = probe()
    return [*(["bubblewrap"] if found.bwrap else []), *(["landlock"] if found.landlock_abi else []), "plain"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Probed only where a test asks for `sandbox_tier`: the probe starts processes.
    if "sandbox_tier" in metafunc.fixturenames:
        metafunc.parametrize("sandbox_tier", available_tiers(), indirect=True)


@pytest.fixture
def sandbox_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each sandbox tier the machine has in turn, forced with VAULT_RUNNER_SANDBOX."""
    monkeypatch.setenv("VAULT_RUNNER_SANDBOX", request.param)
    return request.param


@pytest.fixture(params=["forked", "started"])
def kernel_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A note's kernel forked from a template, then started on its own (VAULT_RUNNER_FORK)."""
    from vault_runner.kernel.factory import close_default_kernels
    from vault_runner.kernel.fork.common import FORK_ENV

    monkeypatch.setenv(FORK_ENV, "1" if request.param == "forked" else "0")
    close_default_kernels()  # no template of another setting is reused
    yield request.param
    close_default_kernels()
