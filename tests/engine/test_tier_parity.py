"""Every sandbox tier gives the same results (issue 10, last part): the same small notes,
rendered once per tier the machine has, give byte-equal output regions, attachments and
files written beside the notes. Real `vault-runner render`, real kernels and sandboxes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import available_tiers, make_note_vault
from vault_runner.core.note import decode_note, parse_note

pytestmark = pytest.mark.kernel

BLOCKS = (
    "!echo hi",
    # As the PyTorch course does: a folder next to the note, a checkpoint in it.
    "import torch\nfrom pathlib import Path\nMODEL_PATH = Path('models')\nMODEL_PATH.mkdir(parents=True, exist_ok=True)\n"
    "torch.save(torch.arange(4), MODEL_PATH / 'modelo.pth')\nprint(torch.load(MODEL_PATH / 'modelo.pth'))",
    "!ls models",
    "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('parity')\nplt.show()",
    "values = {'a': 1}\nvalues['b']",
)
NOTES = ("Raíz.md", "Carpeta/Nota.md")


def _note(blocks: tuple[str, ...]) -> str:
    body = "".join(f"```python\n{code}\n```\n\n" for code in blocks)
    return f"---\nvault-runner: true\n---\n# Paridad\n\n{body}"


def _render(tier: str, root: Path) -> dict[str, object]:
    make_note_vault(root, {name: _note(BLOCKS) for name in NOTES}, app={"attachmentFolderPath": "adjuntos"})
    env = {**os.environ, "VAULT_RUNNER_SANDBOX": tier}
    done = subprocess.run(
        [sys.executable, "-m", "vault_runner", "render", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    regions = {}
    for name in NOTES:
        note = parse_note(decode_note((root / name).read_bytes()))
        regions[name] = [block.region.body if block.region else None for block in note.blocks]
    files = {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".md" and ".obsidian" not in p.parts
    }
    return {"returncode": done.returncode, "stderr": done.stderr, "regions": regions, "files": files}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """One render per tier (the slow part), shared by the comparisons below."""
    return {tier: _render(tier, tmp_path_factory.mktemp(tier) / "vault") for tier in available_tiers()}


def test_each_tier_renders_the_notes(rendered: dict[str, dict[str, object]]) -> None:
    for tier, result in rendered.items():
        assert result["returncode"] == 1, (tier, result["stderr"])  # 1: the KeyError block failed, as it should
        for name in NOTES:
            regions = result["regions"][name]  # type: ignore[index]
            assert all(region is not None for region in regions), (tier, name, regions)
            echo, saved, listed, _plot, error = regions
            assert "hi" in echo and "tensor([0, 1, 2, 3])" in saved and "modelo.pth" in listed, (tier, regions)
            assert "KeyError" in error, (tier, error)


@pytest.mark.parametrize("note", NOTES)
def test_every_tier_writes_the_same_outputs(rendered: dict[str, dict[str, object]], note: str) -> None:
    tiers = list(rendered)
    if len(tiers) < 2:
        pytest.skip("only one sandbox tier on this machine")
    first = rendered[tiers[0]]["regions"][note]  # type: ignore[index]
    for tier in tiers[1:]:
        assert rendered[tier]["regions"][note] == first, f"{tier} differs from {tiers[0]} in {note}"  # type: ignore[index]


def test_every_tier_leaves_the_same_files(rendered: dict[str, dict[str, object]]) -> None:
    tiers = list(rendered)
    first = rendered[tiers[0]]["files"]
    assert {"models/modelo.pth", "Carpeta/models/modelo.pth"} <= set(first)  # type: ignore[arg-type]
    for tier in tiers[1:]:
        files = rendered[tier]["files"]
        assert sorted(files) == sorted(first), tier  # type: ignore[arg-type]
        for name in first:  # type: ignore[union-attr]
            if not name.endswith(".pth"):  # a pickle holds no path, but zip metadata may hold times
                assert files[name] == first[name], (tier, name)  # type: ignore[index]
