"""vault_runner: run the python blocks of Obsidian notes in a Jupyter kernel, outputs back in the note.

The public surface is below; everything else may move. The names are imported on first use,
so that `vault-runner check` (which starts no kernel) never imports jupyter_client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vault_runner.lazy import exports

__version__ = "0.1.0"

__all__ = (
    "BlockReport",
    "Engine",
    "Event",
    "NoteReport",
    "Runner",
    "Vault",
    "VaultRunnerError",
    "__version__",
    "load_vault",
)

_WHERE = {
    "BlockReport": "vault_runner.model",
    "Event": "vault_runner.model",
    "NoteReport": "vault_runner.model",
    "VaultRunnerError": "vault_runner.errors",
    "Vault": "vault_runner.disk.vault",
    "load_vault": "vault_runner.disk.vault",
    "Engine": "vault_runner.engine.run",
    "Runner": "vault_runner.live.runner",
}

if TYPE_CHECKING:
    from vault_runner.disk.vault import Vault, load_vault
    from vault_runner.engine.run import Engine
    from vault_runner.errors import VaultRunnerError
    from vault_runner.live.runner import Runner
    from vault_runner.model import BlockReport, Event, NoteReport


__getattr__ = exports(__name__, _WHERE)
