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

# Two commands, each with its parts:
#   scoring    signals.py  the checkpoint's gate settings, the model pass, the gate weights, the texts sidecars
#              ranking.py  the ranked rows, the CSV columns, ScoreResult; ground truth and ROC-AUC
#              scorer.py   score_shards (the steps in order) and alip-score's command line (python -m alip.score)
#   filtering  rule.py     the filter's rule, pure: which records --keep-fraction / --min-weight / auto keep
#              filter.py   filter_shards (match scores to shards, copy the kept records, meta and reports)
#                          and alip-filter's command line (python -m alip.filter)

from alip.score.filter import FilterReport, filter_shards
from alip.score.filter import cli as filter_cli
from alip.score.ranking import (
    BASE_COLUMNS,
    RANKING,
    SIMILARITIES,
    TRUTH_COLUMNS,
    ScoreResult,
    default_summary_path,
    parse_noisy,
    read_truth,
    roc_auc,
)
from alip.score.rule import REASONS, SIGNALS, FilterInputError, Rule, decide, gmm_clean
from alip.score.scorer import EPILOG, build_parser, cli, format_summary, main, score_shards
from alip.score.signals import EMA_NAMES, ScoreInputError

__all__ = [
    "BASE_COLUMNS",
    "EMA_NAMES",
    "EPILOG",
    "FilterInputError",
    "FilterReport",
    "REASONS",
    "SIGNALS",
    "RANKING",
    "Rule",
    "SIMILARITIES",
    "TRUTH_COLUMNS",
    "ScoreInputError",
    "ScoreResult",
    "build_parser",
    "cli",
    "decide",
    "default_summary_path",
    "filter_cli",
    "filter_shards",
    "format_summary",
    "gmm_clean",
    "main",
    "parse_noisy",
    "read_truth",
    "roc_auc",
    "score_shards",
]
