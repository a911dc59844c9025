"""What of a vault reaches a Ray worker, how a note's GPUs are counted, and `--executor ray`
without Ray installed: no cluster, no kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import make_note_vault
from vault_runner.core.options import resolve
from vault_runner.core.render import Attachment, Rendered, attachment_name
from vault_runner.disk.vault import Vault, load_vault
from vault_runner.engine.loading import Loaded, block_report, load
from vault_runner.engine.ray_executor import RayEngine, gpu_need, parse_path_map
from vault_runner.engine.ray_worker import WorkerResult
from vault_runner.engine.run import BlockResult, attachment_stem
from vault_runner.engine.shipping import materialize, pack, vault_files, worker_path
from vault_runner.errors import OptionError, VaultError
from vault_runner.frontends.cli.main import main
from vault_runner.model import NoteReport

NOTE = """
---
vault-runner: true
---
```python
print(1)
```
"""


def _vault(root: Path) -> Path:
    vault = make_note_vault(root, {"Curso/a.md": NOTE, "Curso/datos.csv": "x,y\n1,2\n", "b.md": NOTE})
    (vault / ".git").mkdir()
    (vault / ".git" / "config").write_text("[core]\n")
    (vault / "Curso" / "node_modules").mkdir()
    (vault / "Curso" / "node_modules" / "big.js").write_text("x")
    (vault / "adjuntos").mkdir()
    (vault / "adjuntos" / "a-1234-vr-0123456789ab.png").write_bytes(b"\x89PNG made by vault-runner")
    (vault / "adjuntos" / "foto.png").write_bytes(b"\x89PNG the user's own")
    (vault / "Curso" / "fuera").symlink_to("/etc")
    return vault


def test_a_worker_gets_the_notes_and_their_files_but_not_obsidian_git_our_attachments_or_links(tmp_path: Path) -> None:
    vault = _vault(tmp_path / "v")
    shipped = {relative for _, relative in vault_files(vault)}
    assert shipped == {"Curso/a.md", "Curso/datos.csv", "b.md", "adjuntos/foto.png"}


def test_a_shipped_vault_unpacks_to_the_same_bytes(tmp_path: Path) -> None:
    vault = _vault(tmp_path / "v")
    copy = tmp_path / "copy"
    copy.mkdir()
    materialize(copy, pack(vault, 2**20), 2**20)
    assert {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == {
        relative: path.read_bytes() for path, relative in vault_files(vault)
    }


def test_a_shared_vault_is_copied_with_the_same_rule(tmp_path: Path) -> None:
    vault = _vault(tmp_path / "v")
    copy = tmp_path / "copy"
    copy.mkdir()
    materialize(copy, vault, 2**20)
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == sorted(
        relative for _, relative in vault_files(vault)
    )


def test_a_vault_over_the_limit_is_refused_with_what_to_do(tmp_path: Path) -> None:
    vault = make_note_vault(tmp_path / "v", {"a.md": NOTE})
    (vault / "datos.bin").write_bytes(b"\0" * 4096)
    with pytest.raises(VaultError) as raised:
        pack(vault, 1024)
    assert "VAULT_RUNNER_RAY_MAX_VAULT" in raised.value.message
    assert "outside the vault" in raised.value.message


def test_a_missing_shared_folder_on_the_worker_says_which_option_to_fix(tmp_path: Path) -> None:
    with pytest.raises(VaultError) as raised:
        materialize(tmp_path, tmp_path / "no-such-vault", 2**20)
    assert "--ray-path-map" in raised.value.message


def test_the_first_mapping_holding_the_vault_gives_its_worker_path() -> None:
    pairs = parse_path_map(["/home/me/otros=/x", "/home/me/vaults=/mnt/vaults"])
    assert worker_path(Path("/home/me/vaults/curso"), pairs) == Path("/mnt/vaults/curso")
    assert worker_path(Path("/srv/vault"), pairs) == Path("/srv/vault")  # unmapped: the same path
    with pytest.raises(VaultError):
        parse_path_map(["/home/me/vaults"])


@pytest.mark.parametrize(
    ("options", "gpus"),
    [
        ({}, 0.0),
        ({"device": "cpu"}, 0.0),
        ({"device": "cuda"}, 1.0),
        ({"device": "cuda:1"}, 1.0),
        ({"device": "cuda", "gpus": 0.5}, 0.5),
        ({"device": "cuda", "gpus": 2}, 2.0),
        ({"gpus": 0}, 0.0),
    ],
)
def test_a_note_reserves_the_gpus_its_options_ask_for(options: dict, gpus: float) -> None:
    assert gpu_need(resolve({}, {"execute": options}).values) == gpus


@given(st.one_of(st.floats(min_value=0, max_value=1), st.integers(min_value=0, max_value=64)))
def test_a_fraction_or_a_whole_number_of_gpus_is_an_option(value: float) -> None:
    assert resolve({}, {"execute": {"gpus": value}})["gpus"] == value


@pytest.mark.parametrize("value", [-1, 1.5, "one", True])
def test_other_gpu_counts_are_refused(value: object) -> None:
    with pytest.raises(OptionError, match="gpus"):
        resolve({}, {"execute": {"gpus": value}})


def test_gpus_does_not_make_stored_outputs_stale() -> None:
    assert resolve({}, {"execute": {"gpus": 0.5}}).hashed() == resolve({}, {}).hashed()


def test_executor_ray_without_ray_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    vault = make_note_vault(tmp_path / "v", {"a.md": NOTE})
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    assert main(["render", str(vault), "--executor", "ray"]) == 2
    assert "pip install 'vault-runner[ray]'" in capsys.readouterr().err
    assert "vault-runner:output" not in (vault / "a.md").read_text()


def test_ray_options_without_executor_ray_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vault = make_note_vault(tmp_path / "v", {"a.md": NOTE})
    assert main(["render", str(vault), "--ray-address", "auto"]) == 2
    assert "--executor ray" in capsys.readouterr().err


class _ForgedWorker:
    """A worker whose result names a file of its own choosing: only a forged result could
    (a note cannot choose attachment names), and the driver must still refuse it."""

    def __init__(self, attachment: Attachment) -> None:
        self.attachment = attachment

    def run(self, vault: Vault, loaded: Loaded) -> WorkerResult:
        [planned] = loaded.runnable
        report = NoteReport(note=loaded.relative, status="ran", blocks=[block_report(loaded, planned, "ok")])
        rendered = Rendered(f"![[{self.attachment.name}]]\n", (self.attachment,))
        return WorkerResult(report, {0: BlockResult(planned, rendered, report.blocks[0])})


PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


@pytest.mark.parametrize(
    "name,data,mime",
    [
        ("../../.obsidian/plugins/x/main.js", PNG, "image/png"),
        ("vault-runner.toml", PNG, "image/png"),
        ("n-0000-vr-000000000000.png", PNG, "image/png"),  # a name that is not the bytes' hash
        (None, b"#!/bin/sh\nrm -rf ~\n", "image/png"),  # a "PNG" that is a script
    ],
)
def test_the_driver_writes_only_attachments_a_local_run_would_write(
    tmp_path: Path, name: str | None, data: bytes, mime: str
) -> None:
    root = make_note_vault(tmp_path / "v", {"Notas/n.md": "```python\nprint(1)\n```\n"})
    vault = load_vault(root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    note = root / "Notas" / "n.md"
    stem = attachment_stem(load(vault, note))
    forged = Attachment(name or attachment_name(stem, data, "png"), data, mime)
    engine = RayEngine(vault, cluster=_ForgedWorker(forged))  # type: ignore[arg-type]
    report = engine.run_note(note, require_opt_in=False)
    assert report.status == "failed" and "would not write" in (report.message or "")
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
