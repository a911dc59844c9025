"""`python -m vault_runner`: the command line."""

import sys

from vault_runner.frontends.cli.main import main

sys.exit(main())
