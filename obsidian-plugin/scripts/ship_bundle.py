"""Copy the built plugin (main.js, manifest.json, styles.css) into the Python package.

Run after `npm run build`: `python obsidian-plugin/scripts/ship_bundle.py`. The package ships
these files (pyproject package-data) so that `vault-runner obsidian install` needs no Node;
tests/frontends/test_obsidian_install.py checks that they are identical to these.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent.parent
SHIPPED = PLUGIN.parent / "vault_runner" / "frontends" / "obsidian_plugin"
FILES = ("main.js", "manifest.json", "styles.css")


def main() -> None:
    for name in FILES:
        shutil.copyfile(PLUGIN / name, SHIPPED / name)
        print(f"{PLUGIN / name} -> {SHIPPED / name}")


if __name__ == "__main__":
    main()
