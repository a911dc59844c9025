"""Moved to vault_runner.ci.check; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.ci import check as _moved

sys.modules[__name__] = _moved
