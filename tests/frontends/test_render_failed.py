"""A stored failure is current like any output; `render --failed` runs it again and `check`
counts it (issue 15.9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_note_vault
from vault_runner.frontends.cli.main import main

pytestmark = pytest.mark.kernel

NOTE = """\
---
vault-runner: true
---
```python
from pathlib import Path
count = Path("count.txt")
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
if n == 1:
    raise ConnectionError("transient")
print("ok", n)
```
"""


def test_render_failed_reruns_only_notes_whose_outputs_are_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In a folder: under Landlock a note at the vault root cannot create files beside itself (issue 10.14).
    fine = NOTE.replace("if n == 1:", "if False:").replace("count.txt", "fine.txt")
    root = make_note_vault(tmp_path / "v", {"Notas/n.md": NOTE, "Notas/fine.md": fine})
    main(["render", str(root)])  # n.md's block raises the first time
    assert "[!failure] ConnectionError" in (root / "Notas" / "n.md").read_text(encoding="utf-8")
    capsys.readouterr()
    main(["render", "--json", str(root)])
    statuses = {r["note"]: r["status"] for r in json.loads(capsys.readouterr().out)["notes"]}
    assert statuses == {"Notas/n.md": "current", "Notas/fine.md": "current"}
    assert main(["check", str(root)]) == 0
    assert "1 block(s) hold a stored failure" in capsys.readouterr().err
    main(["render", "--failed", "--json", str(root)])
    statuses = {r["note"]: r["status"] for r in json.loads(capsys.readouterr().out)["notes"]}
    assert statuses == {"Notas/n.md": "ran", "Notas/fine.md": "current"}
    assert "ok 2" in (root / "Notas" / "n.md").read_text(encoding="utf-8")
