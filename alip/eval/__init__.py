"""Evaluation: zero-shot retrieval, zero-shot classification and the linear probe.

Entry point: `python -m alip.eval {retrieval,zeroshot,linear-probe} --help`. Library pieces:
`metrics` (pure), `datasets` (local folders only), `features` (sharded extraction),
`retrieval`, `zeroshot`, `linear_probe`, and `Evaluator` for the trainer.
"""

from alip.eval.evaluator import Evaluator

__all__ = ["Evaluator"]
