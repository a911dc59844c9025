"""Moved to vault_runner.ci.testing; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.ci import testing as _moved

sys.modules[__name__] = _moved
