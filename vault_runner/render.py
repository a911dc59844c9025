"""Moved to vault_runner.core.render; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.core import render as _moved

sys.modules[__name__] = _moved
