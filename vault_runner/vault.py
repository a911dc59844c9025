"""Moved to vault_runner.disk.vault; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.disk import vault as _moved

sys.modules[__name__] = _moved
