"""Moved to vault_runner.frontends.pytest_plugin; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.frontends import pytest_plugin as _moved

sys.modules[__name__] = _moved
