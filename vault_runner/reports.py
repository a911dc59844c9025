"""Moved to vault_runner.ci.reports; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.ci import reports as _moved

sys.modules[__name__] = _moved
