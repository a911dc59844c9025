"""Moved to vault_runner.live; these names keep old imports working during the refactor."""

from vault_runner.errors import UntrustedVault  # noqa: F401
from vault_runner.live.runner import Runner  # noqa: F401
from vault_runner.live.session import SUPERSEDE_POLICIES, NoteSession  # noqa: F401
