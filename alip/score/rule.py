"""The filter's rule, pure math: which records to keep given their signals (no I/O).

See alip.score.filter for the whole command; these functions are what its tests pin down.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from alip.cli import UserError

SIGNALS = ("weight_sample", "weight_raw", "weight_caption", "s_raw_caption", "s_image_raw", "s_image_caption")
REASONS = {
    "below_min_weight": "signal below --min-weight",
    "outside_keep_fraction": "not among the best --keep-fraction of records",
    "gmm_noisy_component": "more likely in the lower of the two Gaussians fitted to the signal (--keep-fraction auto)",
}


class FilterInputError(UserError, ValueError):
    """Input the filter cannot use: a rule, a scores CSV or shards that do not fit."""


# ---------------------------------------------------------------- the rule (pure)


@dataclass(frozen=True)
class Rule:
    by: tuple[str, ...] = ("weight_sample",)
    keep_fraction: float | None = None  # None: not limited by fraction
    min_weight: float | None = None
    auto: bool = False  # --keep-fraction auto: two-Gaussian mixture on the signal

    def __post_init__(self) -> None:
        unknown = [s for s in self.by if s not in SIGNALS]
        if not self.by or unknown:
            raise FilterInputError(f"--by must name signals among {', '.join(SIGNALS)}; got {','.join(self.by)!r}")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise FilterInputError(f"--keep-fraction must be in (0, 1] or 'auto', got {self.keep_fraction}")
        if self.auto and self.keep_fraction is not None:
            raise FilterInputError("--keep-fraction is either a number or 'auto'")
        if self.keep_fraction is None and self.min_weight is None and not self.auto:
            raise FilterInputError("give a rule: --keep-fraction F, --keep-fraction auto and/or --min-weight W")
        if self.min_weight is not None and not np.isfinite(self.min_weight):
            raise FilterInputError(f"--min-weight must be a finite number, got {self.min_weight}")

    def describe(self) -> dict[str, Any]:
        return {"by": list(self.by), "combine": "min", **{k: v for k, v in asdict(self).items() if k != "by"}}


def combined_signal(columns: dict[str, np.ndarray], by: tuple[str, ...]) -> np.ndarray:
    """The rule's signal per record: the minimum over the named columns (a pair must pass each)."""
    return np.min(np.stack([columns[name] for name in by]), axis=0)


def gmm_clean(signal: np.ndarray, seed: int = 0) -> np.ndarray:
    """True for records more likely in the higher-mean of two 1-D Gaussians fitted to `signal`.

    scikit-learn's GaussianMixture (EM, fixed seed, so deterministic); no labels are used, so the
    kept fraction is an estimate, not a tuned number."""
    from sklearn.mixture import GaussianMixture

    x = signal.reshape(-1, 1)
    if len(np.unique(x)) < 2:
        raise FilterInputError("--keep-fraction auto needs a signal with at least two distinct values")
    gmm = GaussianMixture(n_components=2, covariance_type="full", random_state=seed, n_init=3).fit(x)
    upper = int(np.argmax(gmm.means_.ravel()))
    return gmm.predict_proba(x)[:, upper] > 0.5


def decide(signal: np.ndarray, rule: Rule) -> np.ndarray:
    """Per record, "" to keep it or the reason it is dropped (a key of REASONS).

    --min-weight drops first; --keep-fraction F then keeps at most round(F * N) of all N records, the
    best by signal, ties in shard order (a stable sort, so a rerun decides the same)."""
    n = len(signal)
    reasons = np.full(n, "", dtype=object)
    if rule.min_weight is not None:
        reasons[signal < rule.min_weight] = "below_min_weight"
    if rule.auto:
        reasons[(reasons == "") & ~gmm_clean(signal)] = "gmm_noisy_component"
    if rule.keep_fraction is not None:
        best_first = np.argsort(-signal, kind="stable")
        outside = best_first[int(round(rule.keep_fraction * n)) :]
        reasons[outside[reasons[outside] == ""]] = "outside_keep_fraction"
    return reasons
