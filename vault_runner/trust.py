"""Moved to vault_runner.disk.trust; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.disk import trust as _moved

sys.modules[__name__] = _moved
