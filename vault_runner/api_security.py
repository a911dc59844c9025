"""Moved to vault_runner.frontends.api.security; this alias keeps old imports working during the refactor."""

import sys

from vault_runner.frontends.api import security as _moved

sys.modules[__name__] = _moved
