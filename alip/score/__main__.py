"""`python -m alip.score`: the same command line as `alip-score`."""

import sys

from alip.score.scorer import cli

sys.exit(cli())
