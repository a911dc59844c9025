"""Ignored options are reported at the line the note-taker would fix (issue 15.4). Pure."""

from __future__ import annotations

from vault_runner.core import note as notes
from vault_runner.core.options import resolve
from vault_runner.core.plan import plan_blocks
from vault_runner.core.warnings import option_warnings

NOTE = """\
---
vault-runner: true
execute:
  seed: 1
  colour: red
---
# Nota

```python
#| timout: 5
#| seed: 3
print(1)
```
"""


def test_each_ignored_option_is_reported_on_its_own_line() -> None:
    note = notes.parse_note(NOTE)
    found = option_warnings("n.md", note, resolve({}, note.frontmatter), plan_blocks(note, {}))
    assert found == [
        "n.md:5: warning: unknown option `colour` in frontmatter is ignored",
        "n.md:10: warning: unknown option `timout` in block is ignored",
        "n.md:11: warning: option `seed` applies to the whole note; set it in the frontmatter",
    ]
