"""Retrieval and classification metrics: pure, vectorised tensor code (no I/O, no logging).

Tie rules (`ties=`, both tasks). Identical captions have identical embeddings, and truncated
logits are integers, so real evaluations hold exact ties; the rule that breaks them changes the
figures. Each rule is named after the code whose figures it reproduces:

- `clip_benchmark` (default): **CLIP_benchmark 1.6.2's calls of `torch.topk`.** Retrieval R@K is a
  hit when a correct item is among `torch.topk(row, K)`, one call per K (its `recall_at_k`).
  Classification top-K is a hit when the target is among the first K of one `torch.topk(logits,
  max K)` call (its `accuracy`; `topk(1)` below 5 classes), and mean-per-class recall scores
  `argmax`, the first maximum (its `balanced_accuracy_score` input).
- `release`: **the official release's.** Retrieval ranks by a stable descending sort: among equal
  scores, the lower index ranks first. The release called `torch.argsort(descending=True)` on the
  GPU, which promises no order for ties (`stable=False`). torch's CUDA sort of rows this long
  (1,000 to 25,000 candidates) is a radix sort, which keeps index order; that order is the rule
  (not checked on a GPU here). On the CPU, torch 2.13's unstable sort orders ties differently
  above 16 candidates, so the release's call itself is not the reference.
  Classification calls `torch.topk(logits, K)` per K, as the release's `accuracy` and
  `metric_mean_per_class_accuracy` did with K = 1 on the CPU: with 64 classes or more that is the
  first maximum, with fewer it is torch's own choice.
- `pessimistic`: **ties count against the query.** A candidate with exactly the score of the
  correct answer ranks in front of it. A constant model gets 0 (unless K covers every wrong
  candidate), never a free hit from where the correct item happens to sit. No index order
  enters, but on data with duplicate captions it is below both references.

Which of several tied items `torch.topk` returns is torch's choice, not a documented order; calling
it as the reference did, on the same scores and device, gives the reference's figures exactly.
K larger than the number of candidates counts as all of them. All results are percentages
(0-100), as in the papers' tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

TIE_RULES = ("clip_benchmark", "release", "pessimistic")
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


def check_tie_rule(ties: str) -> str:
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    return ties


def _check_scores(scores: torch.Tensor, what: str, allow_integer: bool = False) -> None:
    if scores.ndim != 2:
        raise ValueError(f"{what} must be a 2-D matrix, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        # Integer logits turn near-ties into exact ties: only the release protocol asks for them, by name.
        if allow_integer and scores.dtype != torch.bool:
            return
        raise TypeError(f"{what} must be floating point, got {scores.dtype}")
    # One sum instead of an elementwise isfinite (30x cheaper at 5000 x 25000): NaN/inf anywhere make
    # it non-finite. Only finite scores summing past float max (~3e38) would be refused wrongly.
    if not torch.isfinite(scores.sum()):
        raise ValueError(f"{what} contains NaN or infinite values (or values too large to sum)")


def _check_text_to_image(text_to_image: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    n_img, n_txt = similarity.shape
    text_to_image = text_to_image.to(device=similarity.device, dtype=torch.long)
    if text_to_image.shape != (n_txt,):
        raise ValueError(f"text_to_image must have shape [{n_txt}], got {tuple(text_to_image.shape)}")
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError(f"text_to_image holds image indices outside [0, {n_img})")
    return text_to_image


def _ahead(
    block: torch.Tensor, score: torch.Tensor, ties: str, candidate: torch.Tensor, item: torch.Tensor
) -> torch.Tensor:
    """Candidates of `block` ranked in front of a correct item scoring `score` (all broadcast): every
    candidate at or above it (pessimistic), or above it and, among equals, those whose index
    `candidate` is below the item's index `item` (release: a stable sort)."""
    if ties == "pessimistic":
        return block >= score
    return (block > score) | ((block == score) & (candidate < item))


def retrieval_ranks(
    similarity: torch.Tensor, text_to_image: torch.Tensor, block_size: int = 256, ties: str = "pessimistic"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0-based) of the best correct answer for every query, under the `pessimistic` or
    `release` tie rule (module docstring; `clip_benchmark`'s topk gives hits, not ranks: see
    `retrieval_topk_hits`).

    similarity: [N_img, N_txt] image-text scores. text_to_image: [N_txt] index of each caption's
    image. Returns (i2t_rank [N_img], t2i_rank [N_txt]): for an image, the number of wrong
    captions ranked in front of its first correct caption; for a caption, the number of other
    images ranked in front of its image. An image with no caption gets rank N_txt (never a hit).
    The matrix is processed in blocks of `block_size` image rows, each one vectorised comparison per
    direction: a [256, N_txt] slice and its boolean temporaries stay in cache, which makes the counts
    several times faster than whole-matrix comparisons (benchmarks/eval_retrieval_speed.py) and
    bounds the memory.
    """
    if check_tie_rule(ties) == "clip_benchmark":
        raise ValueError("the clip_benchmark rule gives hits, not ranks: use retrieval_topk_hits")
    _check_scores(similarity, "similarity")
    n_img, n_txt = similarity.shape
    text_to_image = _check_text_to_image(text_to_image, similarity)
    cols = torch.arange(n_txt, device=similarity.device)
    positive = similarity[text_to_image, cols]  # [N_txt] score of each caption with its own image
    # Image -> text: the best caption decides; under the release's rule, the first (lowest index) of the best.
    best = torch.full((n_img,), float("-inf"), dtype=similarity.dtype, device=similarity.device)
    best = best.scatter_reduce(0, text_to_image, positive, reduce="amax")  # [N_img]
    is_best = positive == best[text_to_image]  # [N_txt]
    n_best = torch.zeros(n_img, dtype=torch.long, device=similarity.device).scatter_add(
        0, text_to_image, is_best.long()
    )
    first_best = torch.full((n_img,), n_txt, dtype=torch.long, device=similarity.device)
    first_best = first_best.scatter_reduce(0, text_to_image, torch.where(is_best, cols, n_txt), reduce="amin")
    # One pass over row blocks serves both directions: each [block, N_txt] slice is read once,
    # contiguously, while it is in cache.
    i2t = torch.empty(n_img, dtype=torch.long, device=similarity.device)
    t2i = torch.zeros(n_txt, dtype=torch.int32, device=similarity.device)
    for start in range(0, n_img, block_size):
        rows = slice(start, start + block_size)
        block = similarity[rows]  # [block, N_txt]
        images = torch.arange(start, start + block.shape[0], device=similarity.device)  # [block]
        ahead = _ahead(block, best[rows, None], ties, cols[None, :], first_best[rows, None])
        i2t[rows] = ahead.sum(dim=1, dtype=torch.int32)
        ahead = _ahead(block, positive[None, :], ties, images[:, None], text_to_image[None, :])
        t2i += ahead.sum(dim=0, dtype=torch.int32)
    if ties == "pessimistic":
        i2t -= n_best  # correct captions at or above the best are exactly those equal to it: not "wrong"
        t2i -= 1  # the caption's own image
    i2t[n_best == 0] = n_txt  # images without captions (best = -inf) can never hit
    return i2t, t2i.long()


def _topk_hits(
    greater: torch.Tensor,
    tied: torch.Tensor,
    correct_tied: torch.Tensor,
    k: int,
    topk_hit: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """[Q] bool: is a correct item among `torch.topk(query's scores, k)`, for every query?

    Decided by counting where that is exact, which is almost everywhere: with `greater` items above
    the query's best correct score and `tied` items at it (`correct_tied` of them correct), topk
    holds no correct item when greater >= k, and one when all tied items fit (greater + tied <= k)
    or every tied item is correct. Only queries whose tie group straddles the k-th place, mixing
    correct and wrong items, depend on which tied items torch's topk returns: `topk_hit(queries, k)`
    runs it for those.
    """
    hit = (greater < k) & ((greater + tied <= k) | (tied == correct_tied))
    unsure = ((greater < k) & (greater + tied > k) & (tied > correct_tied)).nonzero().flatten()
    if len(unsure):
        hit[unsure] = topk_hit(unsure, k)
    return hit


def retrieval_topk_hits(
    similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int], block_size: int = 256
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """CLIP_benchmark's rule: {K: (i2t_hit [N_img], t2i_hit [N_txt])} bool, a hit when a correct item
    is among `torch.topk(row, K)` of the query's row (its `recall_at_k(...) > 0`).

    Image queries rank the captions of their row of `similarity`; caption queries rank the images of
    their column. One pass over row blocks counts, for both directions, the scores above and at each
    query's best correct score (each [block, N_txt] slice read once, in cache, as in
    `retrieval_ranks`); topk then runs only where ties straddle the K-th place (`_topk_hits`), on
    that query's own scores, so it returns the tied items CLIP_benchmark's call returns.
    K above the number of candidates counts as all of them.
    """
    _check_scores(similarity, "similarity")
    n_img, n_txt = similarity.shape
    text_to_image = _check_text_to_image(text_to_image, similarity)
    dev = similarity.device
    if n_txt == 0:
        none = torch.zeros(n_img, dtype=torch.bool, device=dev), torch.zeros(0, dtype=torch.bool, device=dev)
        return {k: none for k in ks}
    positive = similarity[text_to_image, torch.arange(n_txt, device=dev)]  # [N_txt] with its own image
    best = torch.full((n_img,), float("-inf"), dtype=similarity.dtype, device=dev)
    best = best.scatter_reduce(0, text_to_image, positive, reduce="amax")  # [N_img] best correct caption
    best_count = torch.zeros(n_img, dtype=torch.long, device=dev).scatter_add(
        0, text_to_image, (positive == best[text_to_image]).long()
    )  # correct captions at that best score
    # int32 counts: summing booleans into int64 costs about twice as much, and N < 2^31.
    i2t_greater, i2t_tied = (torch.empty(n_img, dtype=torch.int32, device=dev) for _ in range(2))
    t2i_greater, t2i_tied = (torch.zeros(n_txt, dtype=torch.int32, device=dev) for _ in range(2))
    for start in range(0, n_img, block_size):
        rows = slice(start, start + block_size)
        block = similarity[rows]  # [block, N_txt]
        i2t_greater[rows] = (block > best[rows, None]).sum(dim=1, dtype=torch.int32)
        i2t_tied[rows] = (block == best[rows, None]).sum(dim=1, dtype=torch.int32)
        t2i_greater += (block > positive[None, :]).sum(dim=0, dtype=torch.int32)
        t2i_tied += (block == positive[None, :]).sum(dim=0, dtype=torch.int32)

    def i2t_topk(images: torch.Tensor, k: int) -> torch.Tensor:
        top = similarity[images].topk(k, dim=1).indices  # [u, k] caption indices
        return (text_to_image[top] == images[:, None]).any(dim=1)

    def t2i_topk(texts: torch.Tensor, k: int) -> torch.Tensor:
        top = similarity[:, texts].T.topk(k, dim=1).indices  # [u, k] image indices
        return (top == text_to_image[texts, None]).any(dim=1)

    one = torch.ones(n_txt, dtype=torch.long, device=dev)  # a caption has one correct image
    return {
        k: (
            _topk_hits(i2t_greater, i2t_tied, best_count, min(k, n_txt), i2t_topk),
            _topk_hits(t2i_greater, t2i_tied, one, min(k, n_img), t2i_topk),
        )
        for k in ks
    }


def retrieval_metrics(
    similarity: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    ties: str = "clip_benchmark",
) -> dict[str, float]:
    """Recall@K in both directions, in percent: `i2t_R@K`, `t2i_R@K`, plus `mean_recall`.

    Image->text counts a hit when ANY of the image's captions is in the top K; text->image has one
    relevant image per caption. `ties`: clip_benchmark, release or pessimistic (module docstring).
    """
    if check_tie_rule(ties) == "clip_benchmark":
        hits = retrieval_topk_hits(similarity, text_to_image, ks)
    else:
        i2t, t2i = retrieval_ranks(similarity, text_to_image, ties=ties)
        hits = {k: (i2t < k, t2i < k) for k in ks}
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * hits[k][0].double().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * hits[k][1].double().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def _classification_hits(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int], ties: str
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({K: [N] bool top-K hit}, [N] bool top-1 prediction correct, for the per-class recall)."""
    n, c = logits.shape
    always = torch.ones(n, dtype=torch.bool, device=logits.device)
    if ties == "clip_benchmark":
        # one topk call with the largest K the classes allow, top-K = its first K columns; argmax per class
        top = logits.topk(max([k for k in ks if k <= c], default=1), dim=1).indices  # [N, K]
        hits = {k: (top[:, :k] == targets[:, None]).any(dim=1) if k <= c else always for k in ks}
        return hits, logits.argmax(dim=1) == targets
    if ties == "release":
        # the release's topk(K) per K (it reports K = 1: top-1 and mean-per-class both from topk(1))
        hits = {k: (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1) if k < c else always for k in ks}
        top1 = hits[1] if 1 in hits else (logits.topk(1, dim=1).indices[:, 0] == targets)
        return hits, top1
    true_score = logits.gather(1, targets[:, None])  # [N, 1]
    rank = (logits >= true_score).sum(dim=1) - 1  # [N] wrong classes at or above the true one
    return {k: rank < k for k in ks}, rank == 0


def classification_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    ties: str = "clip_benchmark",
    allow_integer: bool = False,
) -> dict[str, float]:
    """Top-K accuracy and mean-per-class recall, in percent.

    logits: [N, C] scores, one row per sample (every row counts: the caller drops padded or
    duplicated rows, or keeps them on purpose, as the release protocol does). Floating point, or any
    integer type with `allow_integer` (the release's int64-truncated logits). targets: [N] class
    indices. `ties`: clip_benchmark, release or pessimistic (module docstring).
    Mean-per-class recall averages the top-1 recall over the classes present in `targets`
    (as scikit-learn's balanced_accuracy_score does); classes without samples are left out.
    Keys: `top{K}` for each K, `mean_per_class_recall`, `num_samples`.
    """
    check_tie_rule(ties)
    _check_scores(logits, "logits", allow_integer)
    n, c = logits.shape
    targets = targets.to(device=logits.device, dtype=torch.long)
    if targets.shape != (n,):
        raise ValueError(f"targets must have shape [{n}], got {tuple(targets.shape)}")
    if n == 0:
        raise ValueError("no samples to score")
    if targets.min() < 0 or targets.max() >= c:
        raise ValueError(f"targets hold class indices outside [0, {c}) (does the class list match the dataset?)")
    hits, correct = _classification_hits(logits, targets, ks, ties)
    out: dict[str, float] = {f"top{k}": 100.0 * hits[k].double().mean().item() for k in ks}
    per_class_hits = torch.zeros(c, dtype=torch.double, device=logits.device).scatter_add(0, targets, correct.double())
    per_class_count = torch.bincount(targets, minlength=c).double()
    present = per_class_count > 0
    out["mean_per_class_recall"] = 100.0 * (per_class_hits[present] / per_class_count[present]).mean().item()
    out["num_samples"] = float(n)
    return out
