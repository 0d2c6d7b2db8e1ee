"""`python -m partywall_agentserver` (also `partywall serve`): see `partywall_agentserver.cli`."""

import sys

from .cli import main

sys.exit(main())
