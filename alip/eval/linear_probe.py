"""Linear probe (CLIP paper protocol): multinomial logistic regression on frozen image features.

The model is scikit-learn's `LogisticRegression(penalty="l2", C=C, solver="lbfgs")`, fitted in torch:
full-batch L-BFGS with a strong-Wolfe line search, float32, on the GPU when there is one. The
objective is sklearn's divided by C * N (same minimiser):

    mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C N)          (the bias is not penalised)

Protocol: hold out a validation split from train (stratified, seeded), sweep C on it (a coarse
log grid, then a log-bisection around the best value, as CLIP's released sweep does), retrain the
best C on train + val, report on test.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from alip.eval.metrics import classification_metrics

logger = logging.getLogger(__name__)

DEFAULT_C_GRID = tuple(10.0**k for k in range(-6, 7))  # CLIP swept 1e-6 .. 1e6


@dataclass
class LinearModel:
    """weight [K, D], bias [K]; `n_iter` L-BFGS iterations, `loss` the final objective."""

    weight: torch.Tensor
    bias: torch.Tensor
    n_iter: int
    loss: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight.T + self.bias  # [N, K]


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def fit_logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    C: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-4,
    init: LinearModel | None = None,
    device: str | torch.device | None = None,
) -> LinearModel:
    """Multinomial L2 logistic regression, equal in minimiser to sklearn's at the same `C`.

    x: [N, D] features, y: [N] labels in [0, num_classes). `tol` bounds the max-abs gradient of the
    mean objective (as sklearn's `tol` bounds its projected gradient). `init` warm-starts (the sweep
    passes the previous C's solution). Runs on `device` (default: CUDA when available).
    """
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    device = default_device() if device is None else torch.device(device)
    x = x.to(device=device, dtype=torch.float32)  # [N, D]
    y = y.to(device=device, dtype=torch.long)  # [N]
    n, d = x.shape
    if y.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(y.shape)}")
    if init is not None:
        weight = init.weight.detach().to(device).clone()
        bias = init.bias.detach().to(device).clone()
    else:
        weight = torch.zeros(num_classes, d, device=device)
        bias = torch.zeros(num_classes, device=device)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    reg = 1.0 / (2.0 * C * n)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 5 // 4,
        tolerance_grad=tol,
        tolerance_change=1e-12,  # stop on the gradient test, not on tiny objective changes
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        return F.cross_entropy(x @ weight.T + bias, y) + reg * weight.square().sum()

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = objective()  # step() returns the objective at the start, not the end
    n_iter = opt.state[opt._params[0]]["n_iter"]
    if n_iter >= max_iter:
        logger.warning("L-BFGS stopped at max_iter=%d for C=%g before reaching tol=%g", max_iter, C, tol)
    return LinearModel(weight.detach(), bias.detach(), int(n_iter), float(loss))


def stratified_split(y: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): `val_fraction` of every class to val (at least one sample of each class
    with two or more samples stays in train), seeded."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(y.shape[0], generator=gen)
    y_perm = y[perm]
    order = torch.argsort(y_perm, stable=True)  # grouped by class, random within class
    sorted_y = y_perm[order]
    counts = torch.bincount(sorted_y)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(y.shape[0]) - starts[sorted_y]  # position within its class
    n_val = torch.clamp(torch.floor(counts.double() * val_fraction).long(), max=torch.clamp(counts - 1, min=0))
    is_val = position < n_val[sorted_y]
    idx = perm[order]
    return idx[~is_val].sort().values, idx[is_val].sort().values


@dataclass
class ProbeResult:
    best_C: float
    metrics: dict[str, float]  # on test
    sweep: list[dict[str, float]] = field(default_factory=list)  # [{"C", "val_metric", "val_loss", "n_iter"}]


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int | None = None,
    select_metric: str = "top1",
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    refine_steps: int = 6,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str | torch.device | None = None,
) -> ProbeResult:
    """Sweep C on a validation split of train, refit the best C on all of train, score test.

    `select_metric` is the classification metric the sweep maximises (the dataset's paper metric:
    mean-per-class recall for Pets, Flowers, Caltech-101, Aircraft). After the grid, `refine_steps`
    log-bisection steps look on both sides of the best C so far, inside the grid's range (CLIP's
    parametric search). Equal validation metrics are decided by the validation cross-entropy.
    """
    k = int(num_classes if num_classes is not None else max(train_y.max(), test_y.max()) + 1)
    tr, va = stratified_split(train_y, val_fraction, seed)
    xs, ys, xv, yv = train_x[tr], train_y[tr], train_x[va], train_y[va]
    device = default_device() if device is None else torch.device(device)
    xs, xv = xs.to(device), xv.to(device)
    # C -> (val metric, -val cross-entropy, model): ties in the metric go to the better-calibrated fit
    tried: dict[float, tuple[float, float, LinearModel]] = {}
    grid = sorted(c_grid)
    lo, hi = grid[0], grid[-1]

    def score(c: float) -> None:
        init = tried[min(tried, key=lambda t: abs(math.log(t / c)))][2] if tried else None  # warm start
        model = fit_logistic_regression(xs, ys, k, c, max_iter=max_iter, tol=tol, init=init, device=device)
        logits = model.logits(xv).float()
        value = classification_metrics(logits, yv.to(device))[select_metric]
        tried[c] = (value, -F.cross_entropy(logits, yv.to(device)).item(), model)
        logger.info("linear probe C=%.3g: val %s %.2f (%d L-BFGS iterations)", c, select_metric, value, model.n_iter)

    def best() -> float:
        return max(tried, key=lambda c: tried[c][:2])

    for c in grid:  # small C first: each fit warm-starts from the last, more regularised one
        score(c)
    step = math.log(grid[1] / grid[0]) / 2 if len(grid) > 1 else 0.0
    for _ in range(refine_steps if step else 0):
        centre = best()
        for c in (centre * math.exp(-step), centre * math.exp(step)):
            if lo <= c <= hi and c not in tried:
                score(c)
        step /= 2
    best_c = best()
    final = fit_logistic_regression(
        train_x, train_y, k, best_c, max_iter=max_iter, tol=tol, init=tried[best_c][2], device=device
    )
    metrics = classification_metrics(final.logits(test_x.to(device)).float(), test_y.to(device))
    sweep = [{"C": c, "val_metric": v, "val_loss": -nl, "n_iter": m.n_iter} for c, (v, nl, m) in sorted(tried.items())]
    return ProbeResult(best_C=best_c, metrics=metrics, sweep=sweep)


def probe_summary(result: ProbeResult, paper_metric_name: str) -> dict[str, Any]:
    """Flat dict for the results JSON: test metrics, the paper metric, the chosen C and the sweep."""
    out: dict[str, Any] = dict(result.metrics)
    out.update(
        paper_metric=paper_metric_name,
        paper_value=result.metrics[paper_metric_name],
        best_C=result.best_C,
        sweep=result.sweep,
    )
    return out
