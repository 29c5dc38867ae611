"""`python -m alip.filter`: the same command as `alip-filter` (alip.score.filter_command).

The filter lives in the score package, beside the scores it reads; this module is its short name.
"""

import sys

from alip.score.filter import FilterReport, filter_shards
from alip.score.filter_command import build_parser, cli, main
from alip.score.filter_rule import REASONS, SIGNALS, FilterInputError, Rule, decide, gmm_clean

__all__ = [
    "REASONS",
    "SIGNALS",
    "FilterInputError",
    "FilterReport",
    "Rule",
    "build_parser",
    "cli",
    "decide",
    "filter_shards",
    "gmm_clean",
    "main",
]

if __name__ == "__main__":
    sys.exit(cli())
