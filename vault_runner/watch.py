"""Moved to vault_runner.frontends.watcher; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.frontends import watcher as _moved

sys.modules[__name__] = _moved
