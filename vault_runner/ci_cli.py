"""Moved to vault_runner.frontends.cli.ci; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.frontends.cli import ci as _moved

sys.modules[__name__] = _moved
