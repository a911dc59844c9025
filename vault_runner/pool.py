"""Moved to vault_runner.kernel.pool; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.kernel import pool as _moved

sys.modules[__name__] = _moved
