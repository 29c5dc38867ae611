#!/usr/bin/env python
"""Linear-probe fit time and accuracy: alip.eval.linear_probe (torch L-BFGS) vs scikit-learn, same C.

50,000 x 512 training features, 100 classes, 10,000 test features: synthetic, L2-normalised class
centres plus noise (so the accuracy is neither 0 nor 100). One fit at a fixed C on each side:
`fit_logistic_regression` (float32, full-batch L-BFGS, strong Wolfe, tol 1e-4 on the max-abs
gradient) and `sklearn.linear_model.LogisticRegression(C, solver="lbfgs", tol=1e-4, max_iter=1000)`
(float64, scipy L-BFGS-B). Features are made once; the fits are timed (wall clock).

    python benchmarks/eval_linear_probe_speed.py                     # full size, as in RESULTS.md
    python benchmarks/eval_linear_probe_speed.py --n 10000 --classes 20
    python benchmarks/eval_linear_probe_speed.py --device cuda       # our fit on a GPU
"""

import argparse
import json
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from alip.eval.linear_probe import fit_logistic_regression


def make_features(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centres[y] + noise * torch.randn(n, dim, generator=gen) / dim**0.5
    return F.normalize(x, dim=-1), y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--noise", type=float, default=7.0)
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-sklearn", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = make_features(args.n, args.classes, args.dim, args.noise, seed=0)
    xt, yt = make_features(args.n_test, args.classes, args.dim, args.noise, seed=1)

    t0 = time.perf_counter()
    ours = fit_logistic_regression(x, y, args.classes, args.C, tol=args.tol, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    ours_s = time.perf_counter() - t0
    ours_acc = 100.0 * (ours.logits(xt.to(args.device)).argmax(1).cpu() == yt).double().mean().item()
    result = {
        "n": args.n,
        "dim": args.dim,
        "classes": args.classes,
        "C": args.C,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "ours_s": round(ours_s, 2),
        "ours_iters": ours.n_iter,
        "ours_test_acc": round(ours_acc, 2),
    }
    if not args.skip_sklearn:
        import sklearn
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        sk = LogisticRegression(C=args.C, solver="lbfgs", tol=args.tol, max_iter=1000).fit(x.numpy(), y.numpy())
        sk_s = time.perf_counter() - t0
        sk_acc = 100.0 * float(np.mean(sk.predict(xt.numpy()) == yt.numpy()))
        result.update(
            sklearn_s=round(sk_s, 2),
            sklearn_iters=int(np.max(sk.n_iter_)),
            sklearn_test_acc=round(sk_acc, 2),
            speedup=round(sk_s / ours_s, 1),
            acc_diff=round(ours_acc - sk_acc, 2),
            sklearn=sklearn.__version__,
        )
    result.update(torch=torch.__version__, python=platform.python_version())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
