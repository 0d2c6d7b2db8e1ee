"""`python -m agentserver`: see `agentserver.cli`."""

import sys

from .cli import main

sys.exit(main())
