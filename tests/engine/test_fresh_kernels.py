"""Fresh means fresh (issue 12): notes run by the engine in kernels forked from one warm
template see nothing of the notes before them, and give the outputs a started kernel gives.

Real kernels through Engine.run_note, a ForkFactory of the module's own (closed at the end)
next to the normal start (`started_kernel_factory`); every note's report must say
`kernel: forked`, or the test would prove nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from tests.conftest import copy_sample_vault, make_note_vault
from vault_runner.core import note as notes
from vault_runner.disk.vault import load_vault
from vault_runner.engine import Engine
from vault_runner.engine.targets import notes_under
from vault_runner.kernel.factory import default_kernel_factory, started_kernel_factory
from vault_runner.kernel.fork.common import FORK_ENV, fork_disabled_reason
from vault_runner.kernel.fork.factory import ForkFactory
from vault_runner.kernel.fork.session import ForkedSession
from vault_runner.kernel.session import KernelSession
from vault_runner.model import NoteReport

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        fork_disabled_reason() is not None, reason=f"kernels are not forked here: {fork_disabled_reason()}"
    ),
]


@pytest.fixture(scope="module")
def factory() -> Iterator[ForkFactory]:
    made = ForkFactory()
    try:
        yield made
    finally:
        made.close()


def note(code: str) -> str:
    return f"---\nvault-runner: true\n---\n# Nota\n\n```python\n{textwrap.dedent(code).strip()}\n```\n"


def run(root: Path, name: str, code: str, factory: object) -> tuple[NoteReport, str]:
    """Run a one-block note; its report and what its block printed (the region's text)."""
    path = root / "notas" / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(note(code), encoding="utf-8")
    report = Engine(load_vault(root), kernel_factory=factory, force=True).run_note(path)  # type: ignore[arg-type]
    assert not report.failed, report
    parsed = notes.parse_note(path.read_text(encoding="utf-8"))
    region = parsed.blocks[0].region
    return report, region.body if region is not None else ""


def printed(body: str) -> str:
    """The printed line of a region (stream output sits in a fenced block)."""
    lines = [line for line in body.splitlines() if line.strip() and not line.startswith("```")]
    return lines[-1].strip()


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    return make_note_vault(tmp_path / "vault", {})


def test_a_name_defined_by_one_note_is_not_visible_in_the_next(vault: Path, factory: ForkFactory) -> None:
    first, _ = run(vault, "a", "dejado = 42\nprint(dejado)", factory)
    second, body = run(vault, "b", "print('dejado' in globals())", factory)
    assert (first.kernel, second.kernel) == ("forked", "forked")
    assert printed(body) == "False"


def test_a_module_imported_by_one_note_is_not_imported_in_the_next(vault: Path, factory: ForkFactory) -> None:
    candidates = ["wave", "mailbox", "sched", "tabnanny", "netrc", "colorsys"]
    probe = f"import sys\nprint(sorted(m for m in {candidates!r} if m in sys.modules))"
    _, before = run(vault, "probe", probe, factory)
    fresh = [m for m in candidates if m not in json.loads(printed(before).replace("'", '"'))]
    assert len(fresh) >= 2, "the template imports nearly everything; pick other modules"
    first, body = run(vault, "a", f"import {', '.join(fresh)}\n{probe}", factory)
    assert set(fresh) <= set(json.loads(printed(body).replace("'", '"')))
    second, body = run(vault, "b", probe, factory)
    assert (first.kernel, second.kernel) == ("forked", "forked")
    assert not set(fresh) & set(json.loads(printed(body).replace("'", '"')))


RANDOMS = """
import json, random
import numpy as np
import torch
print(json.dumps([random.random(), float(np.random.rand()), float(torch.rand(1))]))
"""


def test_unseeded_random_numbers_differ_between_two_notes(vault: Path, factory: ForkFactory) -> None:
    first, one = run(vault, "a", RANDOMS, factory)
    second, two = run(vault, "b", RANDOMS, factory)
    assert (first.kernel, second.kernel) == ("forked", "forked")
    assert all(a != b for a, b in zip(json.loads(printed(one)), json.loads(printed(two)), strict=True))


SEEDED = "import random\nimport numpy as np\nimport torch\nrandom.seed(7); np.random.seed(7); torch.manual_seed(7)\n"


def test_seeded_random_numbers_match_a_separate_process(vault: Path, factory: ForkFactory) -> None:
    report, body = run(vault, "a", SEEDED + RANDOMS, factory)
    separate = subprocess.run([sys.executable, "-c", SEEDED + RANDOMS], capture_output=True, text=True, check=True)
    assert report.kernel == "forked"
    assert json.loads(printed(body)) == json.loads(separate.stdout.strip().splitlines()[-1])


def test_each_note_has_its_own_process(vault: Path, factory: ForkFactory) -> None:
    code = "import os\nprint(os.getpid(), os.getpgid(0) == os.getpid(), os.getcwd(), os.environ['VAULT_RUNNER_NOTE'])"
    first, one = run(vault, "a", code, factory)
    second, two = run(vault, "b", code, factory)
    assert (first.kernel, second.kernel) == ("forked", "forked")
    pid_a, group_a, cwd_a, note_a = printed(one).split()
    pid_b, _, _, note_b = printed(two).split()
    assert pid_a != pid_b and int(pid_a) != os.getpid()
    assert group_a == "True"  # its own process group: interrupt and kill reach it alone
    assert Path(cwd_a) == (vault / "notas").resolve() or Path(cwd_a) == vault / "notas"
    assert (Path(note_a).name, Path(note_b).name) == ("a.md", "b.md")


# `%time` measures time, which never repeats, and the region's checksum covers it.
_TIMING = re.compile(rb"^(CPU times|Wall time):.*$|sum=[0-9a-f]+", re.MULTILINE)


def _rendered(root: Path) -> dict[str, bytes]:
    """Every file of the vault, byte for byte, less the measurements of time in notes."""
    return {
        p.relative_to(root).as_posix(): _TIMING.sub(b"", p.read_bytes()) if p.suffix == ".md" else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_the_sample_vault_renders_the_same_with_and_without_the_factory(tmp_path: Path, factory: ForkFactory) -> None:
    outputs: dict[str, dict[str, bytes]] = {}
    for name, made in (("forked", factory), ("started", started_kernel_factory)):
        root = copy_sample_vault(tmp_path / name)
        reports = [
            Engine(vault, kernel_factory=made, force=True).run_note(path)  # type: ignore[arg-type]
            for vault, path in notes_under([root])
        ]
        ran = [r for r in reports if r.status == "ran"]
        assert ran and {r.kernel for r in ran} == {name}, [(r.note, r.kernel) for r in reports]
        assert not any(r.failed for r in reports)
        outputs[name] = _rendered(root)
    assert outputs["forked"] == outputs["started"]


def test_the_default_factory_forks_unless_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORK_ENV, "0")
    kernel = default_kernel_factory(tmp_path, {"VAULT_RUNNER_VAULT": str(tmp_path)}, {})
    assert type(kernel) is KernelSession
    assert fork_disabled_reason() == f"{FORK_ENV}=0"
    monkeypatch.delenv(FORK_ENV)
    assert issubclass(ForkedSession, KernelSession)


@pytest.mark.parametrize(("setting", "kernel"), [(None, "forked"), ("0", "started")])
def test_run_json_says_how_the_kernel_was_made(tmp_path: Path, setting: str | None, kernel: str) -> None:
    root = make_note_vault(tmp_path / "vault", {"notas/a.md": note("print(6 * 7)")})
    env = {k: v for k, v in os.environ.items() if k != FORK_ENV}
    if setting is not None:
        env[FORK_ENV] = setting
    done = subprocess.run(
        [sys.executable, "-m", "vault_runner", "run", str(root / "notas" / "a.md"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    [report] = json.loads(done.stdout)["notes"]
    assert report["kernel"] == kernel
    assert "42" in (root / "notas" / "a.md").read_text(encoding="utf-8")


# A course notebook as a user converts one (benchmarks/_notebooks.py, the converter the parity
# benchmark uses): the PyTorch course's workflow chapter in small, seeded.
COURSE_CELLS = (
    ("markdown", "# 01. Flujo de trabajo en PyTorch\n\nDatos, modelo, entrenamiento, guardado."),
    ("code", "import torch\nfrom torch import nn\nimport matplotlib.pyplot as plt\ntorch.__version__ > '2'"),
    (
        "code",
        "weight, bias = 0.7, 0.3\nX = torch.arange(0, 1, 0.02).unsqueeze(dim=1)\ny = weight * X + bias\nX[:3], y[:3]",
    ),
    (
        "code",
        "split = int(0.8 * len(X))\nX_train, y_train, X_test, y_test = X[:split], y[:split], X[split:], y[split:]\n"
        "len(X_train), len(X_test)",
    ),
    (
        "code",
        "class LinearRegressionModel(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.weights = nn.Parameter(torch.randn(1, dtype=torch.float))\n"
        "        self.bias = nn.Parameter(torch.randn(1, dtype=torch.float))\n\n"
        "    def forward(self, x):\n        return self.weights * x + self.bias\n\n"
        "torch.manual_seed(42)\nmodel_0 = LinearRegressionModel()\nlist(model_0.parameters())",
    ),
    (
        "code",
        "loss_fn = nn.L1Loss()\noptimizer = torch.optim.SGD(params=model_0.parameters(), lr=0.01)\n"
        "for epoch in range(100):\n    model_0.train()\n    loss = loss_fn(model_0(X_train), y_train)\n"
        "    optimizer.zero_grad()\n    loss.backward()\n    optimizer.step()\n    if epoch % 20 == 0:\n"
        "        model_0.eval()\n        with torch.inference_mode():\n"
        "            test_loss = loss_fn(model_0(X_test), y_test)\n"
        "        print(f'Epoch: {epoch} | Loss: {loss:.5f} | Test loss: {test_loss:.5f}')",
    ),
    (
        "code",
        "with torch.inference_mode():\n    y_preds = model_0(X_test)\n"
        "plt.figure(figsize=(5, 3))\nplt.scatter(X_train, y_train, c='b', s=4, label='Entrenamiento')\n"
        "plt.scatter(X_test, y_preds, c='r', s=4, label='Predicciones')\nplt.legend()\nplt.show()",
    ),
    (
        "code",
        "from pathlib import Path\nMODEL_PATH = Path('models')\nMODEL_PATH.mkdir(parents=True, exist_ok=True)\n"
        "torch.save(obj=model_0.state_dict(), f=MODEL_PATH / '01_modelo.pth')\n"
        "loaded = LinearRegressionModel()\nloaded.load_state_dict(torch.load(f=MODEL_PATH / '01_modelo.pth'))\n"
        "torch.equal(loaded(X_test), model_0(X_test))",
    ),
    ("code", "import warnings\nwarnings.warn('tasa de aprendizaje alta')\nmodel_0.state_dict()"),
    ("code", "X_train @ torch.rand(3, 3)"),
)


def _course_note() -> str:
    spec = importlib.util.spec_from_file_location(
        "_notebooks", Path(__file__).parents[2] / "benchmarks" / "_notebooks.py"
    )
    assert spec is not None and spec.loader is not None
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    cells = [
        nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        for kind, source in COURSE_CELLS
    ]
    return converter.notebook_to_note(nbformat.v4.new_notebook(cells=cells))


def test_a_converted_course_notebook_renders_the_same_with_and_without_the_factory(
    tmp_path: Path, factory: ForkFactory
) -> None:
    outputs: dict[str, dict[str, bytes]] = {}
    for name, made in (("forked", factory), ("started", started_kernel_factory)):
        root = make_note_vault(tmp_path / name, {"Curso/01 Flujo de trabajo.md": _course_note()})
        engine = Engine(load_vault(root), kernel_factory=made, force=True)  # type: ignore[arg-type]
        report = engine.run_note(root / "Curso/01 Flujo de trabajo.md")
        assert report.kernel == name
        statuses = [block.status for block in report.blocks]
        assert statuses == ["ok"] * (len(COURSE_CELLS) - 2) + ["error"], statuses  # the last cell's shapes do not fit
        outputs[name] = _rendered(root)
    assert outputs["forked"] == outputs["started"]
    written = outputs["forked"]["Curso/01 Flujo de trabajo.md"].decode()
    assert "Epoch: 80 | Loss:" in written and "UserWarning: tasa de aprendizaje alta" in written
    assert "![[" in written and "Curso/models/01_modelo.pth" in outputs["forked"]
