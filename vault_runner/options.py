"""Moved to vault_runner.core.options; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.core import options as _moved

sys.modules[__name__] = _moved
