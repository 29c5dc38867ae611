"""`python -m alip.filter`: the same command as `alip-filter` (alip.score.filter, beside the scores it reads)."""

import sys

from alip.score.filter import cli

if __name__ == "__main__":
    sys.exit(cli())
