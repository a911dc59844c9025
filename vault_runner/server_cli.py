"""Moved to vault_runner.frontends.cli.serve; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.frontends.cli import serve as _moved

sys.modules[__name__] = _moved
