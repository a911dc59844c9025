"""Moved to vault_runner.core.note; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.core import note as _moved

sys.modules[__name__] = _moved
