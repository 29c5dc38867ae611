"""`alip-score`: rank training pairs by how noisy a trained ALIP model's gates find them.

For every record of a set of shards it computes, with the checkpoint's model, the three similarities
the gates read (DESIGN.md section 4):

    s_raw_caption   = cos(raw text, caption)   s_tc, the Language Consistency Gate's input
    s_image_raw     = cos(image, raw text)     s_it, the image-raw-text pair gate's input
    s_image_caption = cos(image, caption)      s_ic, the image-caption pair gate's input

and the gate weights under the checkpoint's EMA state (`alip.gates.gate_weights`, no EMA update).
It writes a CSV of all records, most likely noisy first (ascending s_raw_caption: the order of the
sample weight before its clamp at 1, without the ties the clamp makes), with the original strings
from the shards' texts sidecars, and a summary JSON. Given a ground-truth file of noise flags it
also reports how well the gates detect noise (ROC-AUC, precision at the number of noisy pairs).

Checkpoints: a training checkpoint (`alip.train`) carries the model name, the gates' EMA values,
power and pair_gate. Any other weights file `alip.load_checkpoint` reads (open_clip export,
safetensors, the original release) needs `--model`, and has no EMA state: the dataset means of the
similarities stand in for it (reported as "ema_source": "dataset_mean").
"""

# The pieces, each importable on its own:
#   common.py   ScoreInputError, the logger, the warnings list every step adds to
#   signals.py  checkpoint reading, the model pass, gate weights, texts sidecars
#   ranking.py  the ranked rows, the CSV columns, ScoreResult and its writing
#   truth.py    ground-truth flags, ROC-AUC, the truth part of the summary
#   core.py     score_shards: the steps in order
#   command.py  the command line (alip-score, python -m alip.score)
#   filter_rule.py  the filter's rule, pure: which records a --keep-fraction / --min-weight / auto keeps
#   filter.py       alip-filter: match scores to shards, copy the kept records, the meta and reports
#   filter_command.py  its command line (alip-filter, python -m alip.filter)

from alip.score.command import EPILOG, build_parser, cli, format_summary, main
from alip.score.common import ScoreInputError
from alip.score.core import score_shards
from alip.score.filter import FilterReport, filter_shards
from alip.score.filter_rule import FilterInputError, Rule
from alip.score.ranking import BASE_COLUMNS, RANKING, SIMILARITIES, ScoreResult, default_summary_path
from alip.score.signals import EMA_NAMES
from alip.score.truth import TRUTH_COLUMNS, parse_noisy, read_truth, roc_auc

# Internal, not in __all__, but kept reachable as `alip.score.<name>`: benchmarks/scale.py times the
# ranking step with them (the `x as x` form marks them as re-exported).
from alip.score.common import _Warnings as _Warnings  # isort: skip
from alip.score.ranking import _ranked_rows as _ranked_rows  # isort: skip
from alip.score.signals import _shard_texts as _shard_texts  # isort: skip

__all__ = [
    "BASE_COLUMNS",
    "EMA_NAMES",
    "EPILOG",
    "FilterInputError",
    "FilterReport",
    "RANKING",
    "Rule",
    "SIMILARITIES",
    "TRUTH_COLUMNS",
    "ScoreInputError",
    "ScoreResult",
    "build_parser",
    "cli",
    "default_summary_path",
    "filter_shards",
    "format_summary",
    "main",
    "parse_noisy",
    "read_truth",
    "roc_auc",
    "score_shards",
]
