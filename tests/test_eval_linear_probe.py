"""The torch L-BFGS probe against scikit-learn's LogisticRegression(lbfgs) at the same C."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alip.eval.linear_probe import fit_logistic_regression, linear_probe, stratified_split
from alip.eval.metrics import classification_metrics

sklearn_linear = pytest.importorskip("sklearn.linear_model")


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n, classes=6, dim=24, spread=0.35, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % classes
    x = centers[y] + spread * torch.randn(n, dim, generator=gen)
    return F.normalize(x, dim=-1), y


def objective(weight, bias, x, y, C):
    """sklearn's objective divided by C * N."""
    logits = x.double() @ weight.double().T + bias.double()
    return float(F.cross_entropy(logits, y) + weight.double().square().sum() / (2 * C * len(y)))


@pytest.mark.parametrize("C", [0.1, 3.0])
def test_matches_sklearn_at_same_C(C):
    x, y = blobs(900)
    xt, yt = blobs(600, seed=1)
    ours = fit_logistic_regression(x, y, 6, C, device="cpu")
    sk = sklearn_linear.LogisticRegression(C=C, solver="lbfgs", max_iter=1000, tol=1e-6).fit(x.numpy(), y.numpy())
    acc_ours = classification_metrics(ours.logits(xt), yt)["top1"]
    acc_sk = 100.0 * float(np.mean(sk.predict(xt.numpy()) == yt.numpy()))
    assert abs(acc_ours - acc_sk) <= 0.5
    assert acc_ours > 90
    # the same minimiser: objectives agree closely (sklearn's coef_ is [K, D] in the same parametrisation)
    sk_w, sk_b = torch.from_numpy(sk.coef_).float(), torch.from_numpy(sk.intercept_).float()
    assert objective(ours.weight, ours.bias, x, y, C) == pytest.approx(objective(sk_w, sk_b, x, y, C), rel=1e-3)


def test_stratified_split_keeps_every_class_in_train():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    tr, va = stratified_split(y, 0.2, seed=0)
    assert sorted(tr.tolist() + va.tolist()) == list(range(16))
    assert torch.bincount(y[va], minlength=3).tolist() == [2, 1, 0]


def test_sweep_picks_the_best_validation_C_and_refits():
    x, y = blobs(600, spread=1.5)
    xt, yt = blobs(600, spread=1.5, seed=1)
    res = linear_probe(x, y, xt, yt, c_grid=[1e-4, 1e-2, 1, 1e2], refine_steps=2, device="cpu")
    assert all(set(s) == {"C", "val_metric", "val_loss", "n_iter"} for s in res.sweep)
    assert len(res.sweep) > 4 and all(1e-4 <= s["C"] <= 1e2 for s in res.sweep)  # refined, inside the grid
    best = max(res.sweep, key=lambda s: (s["val_metric"], -s["val_loss"]))
    assert res.best_C == best["C"]
    assert res.sweep[0]["val_metric"] < best["val_metric"]  # C = 1e-4 underfits this problem
    # the refit on train + val at best_C is what is scored on test
    direct = fit_logistic_regression(x, y, 6, res.best_C, device="cpu")
    assert res.metrics["top1"] == pytest.approx(classification_metrics(direct.logits(xt), yt)["top1"], abs=0.34)
