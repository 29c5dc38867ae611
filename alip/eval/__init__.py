"""Evaluation: zero-shot retrieval, zero-shot classification and the linear probe.

Entry point: `python -m alip.eval {retrieval,zeroshot,linear-probe} --help`. Library pieces:
`metrics` (pure), `protocol` (CLIP_benchmark's and the release's evaluation rules, by name),
`datasets` (classification sets; local folders only), `retrieval_formats` (retrieval sets),
`features` (sharded extraction), `retrieval`, `zeroshot`, `linear_probe`, and `Evaluator`
for the trainer.
"""

from alip.eval.evaluator import Evaluator

__all__ = ["Evaluator"]
