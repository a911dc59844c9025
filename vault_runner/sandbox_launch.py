"""Moved to vault_runner.kernel.sandbox.launch; this alias keeps old imports working during the refactor.

Only an alias: `sandbox_launch.__file__` is then the real launcher's path, which is run by path.
"""

import sys

from vault_runner.kernel.sandbox import launch as _moved

sys.modules[__name__] = _moved
