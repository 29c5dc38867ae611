"""Retrieval and classification metrics: pure, vectorised tensor code (no I/O, no logging).

Tie rule (both tasks): **ties count against the query.** A candidate with exactly the score of
the correct answer is ranked in front of it. So the rank of the correct answer is the number of
wrong candidates scoring >= it, and a model that gives every candidate the same score gets 0
recall / accuracy (unless K covers every wrong candidate), never a free hit from the index
order. The original release broke ties by `argsort` order, which depends on where the correct
item happens to sit; this rule does not.

All results are percentages (0-100), as in the papers' tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The CLIP paper's metric per dataset (Table 9 / Appendix A): mean-per-class recall where the
# classes are imbalanced, top-1 accuracy elsewhere. Dataset names as in CLIP_benchmark.
PAPER_METRIC: dict[str, str] = {
    "cifar10": "top1",
    "cifar100": "top1",
    "food101": "top1",
    "pets": "mean_per_class_recall",
    "flowers": "mean_per_class_recall",
    "sun397": "top1",
    "cars": "top1",
    "dtd": "top1",
    "caltech101": "mean_per_class_recall",
    "fgvc_aircraft": "mean_per_class_recall",
    "imagenet1k": "top1",
}


def paper_metric(dataset: str) -> str:
    """The metric the CLIP/ALIP tables report for `dataset`; top-1 for datasets not in the table."""
    return PAPER_METRIC.get(dataset, "top1")


def _check_scores(scores: torch.Tensor, what: str) -> None:
    if scores.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        # The original release stored logits as integers, which turns near-ties into exact ties.
        raise TypeError(f"{what} must be floating point, got {scores.dtype}")
    # One sum instead of an elementwise isfinite (30x cheaper at 5000 x 25000): NaN/inf anywhere make
    # it non-finite. Only finite scores summing past float max (~3e38) would be refused wrongly.
    if not torch.isfinite(scores.sum()):
        raise ValueError(f"{what} contains NaN or infinite values (or values too large to sum)")


def retrieval_ranks(
    similarity: torch.Tensor, text_to_image: torch.Tensor, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0-based, ties against the query) of the best correct answer for every query.

    similarity: [N_img, N_txt] image-text scores. text_to_image: [N_txt] index of each caption's
    image. Returns (i2t_rank [N_img], t2i_rank [N_txt]): for an image, the number of wrong
    captions scoring >= its best-scoring caption; for a caption, the number of other images
    scoring >= its image. An image with no caption gets rank N_txt (never a hit).
    The matrix is processed in blocks of `block_size` image rows, each one vectorised comparison per
    direction: a [256, N_txt] slice and its boolean temporaries stay in cache, which makes the counts
    several times faster than whole-matrix comparisons (benchmarks/eval_retrieval_speed.py) and
    bounds the memory.
    """
    _check_scores(similarity, "similarity")
    n_img, n_txt = similarity.shape
    text_to_image = text_to_image.to(device=similarity.device, dtype=torch.long)
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape [{n_txt}], got {tuple(text_to_image.shape)}")
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError(f"text_to_image holds image indices outside [0, {n_img})")
    cols = torch.arange(n_txt, device=similarity.device)
    positive = similarity[text_to_image, cols]  # [N_txt] score of each caption with its own image

    # Image -> text: the best caption decides; wrong captions scoring >= it rank in front.
    best = torch.full((n_img,), float("-inf"), dtype=similarity.dtype, device=similarity.device)
    best = best.scatter_reduce(0, text_to_image, positive, reduce="amax")  # [N_img]
    # Correct captions at or above the best are exactly those equal to it; they are not "wrong".
    n_best = torch.zeros(n_img, dtype=torch.long, device=similarity.device)
    n_best = n_best.scatter_add(0, text_to_image, (positive == best[text_to_image]).long())
    # One pass over row blocks serves both directions: each [block, N_txt] slice is read once,
    # contiguously, while it is in cache.
    i2t = torch.empty(n_img, dtype=torch.long, device=similarity.device)
    t2i_count = torch.zeros(n_txt, dtype=torch.int32, device=similarity.device)
    for start in range(0, n_img, block_size):
        rows = slice(start, start + block_size)
        block = similarity[rows]  # [block, N_txt]
        i2t[rows] = (block >= best[rows, None]).sum(dim=1, dtype=torch.int32) - n_best[rows]
        t2i_count += (block >= positive[None, :]).sum(dim=0, dtype=torch.int32)
    i2t[n_best == 0] = n_txt  # images without captions (best = -inf) can never hit
    # Text -> image: one relevant image; every other image scoring >= it ranks in front.
    t2i = t2i_count.long() - 1  # minus the caption's own image
    return i2t, t2i


def retrieval_metrics(
    similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K in both directions, in percent: `i2t_R@K`, `t2i_R@K`, plus `mean_recall`.

    Image->text counts a hit when ANY of the image's captions is in the top K; text->image has one
    relevant image per caption. Ties count against the query (module docstring).
    """
    i2t, t2i = retrieval_ranks(similarity, text_to_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (i2t < k).double().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * (t2i < k).double().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-K accuracy and mean-per-class recall, in percent.

    logits: [N, C] float scores, one row per sample (the caller must have dropped any padded
    or duplicated rows: every row counts). targets: [N] class indices. A sample is correct at K
    when fewer than K wrong classes score >= its true class (ties count against it).
    Mean-per-class recall averages the top-1 recall over the classes present in `targets`
    (as scikit-learn's balanced_accuracy_score does); classes without samples are left out.
    Keys: `top{K}` for each K, `mean_per_class_recall`, `num_samples`.
    """
    _check_scores(logits, "logits")
    n, c = logits.shape
    targets = targets.to(device=logits.device, dtype=torch.long)
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape [{n}], got {tuple(targets.shape)}")
    if n == 0:
        raise ValueError("no samples to score")
    if targets.min() < 0 or targets.max() >= c:
        raise ValueError(f"targets hold class indices outside [0, {c}) (does the class list match the dataset?)")
    true_score = logits.gather(1, targets[:, None])  # [N, 1]
    rank = (logits >= true_score).sum(dim=1) - 1  # [N] wrong classes at or above the true one
    out: dict[str, float] = {f"top{k}": 100.0 * (rank < k).double().mean().item() for k in ks}
    correct = (rank == 0).double()
    per_class_hits = torch.zeros(c, dtype=torch.double, device=logits.device).scatter_add(0, targets, correct)
    per_class_count = torch.bincount(targets, minlength=c).double()
    present = per_class_count > 0
    out["mean_per_class_recall"] = 100.0 * (per_class_hits[present] / per_class_count[present]).mean().item()
    out["num_samples"] = float(n)
    return out
