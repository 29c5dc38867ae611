"""`python -m alip.score`: the same command line as `alip-score`."""

import sys

from alip.score.command import cli

sys.exit(cli())
