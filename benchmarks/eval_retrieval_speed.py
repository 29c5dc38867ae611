#!/usr/bin/env python
"""Retrieval metric time at MSCOCO 5k size: alip.eval.metrics vs a per-query argsort loop.

"Ours" is the default tie rule (clip_benchmark); the other two rules are timed too.

5,000 images x 25,000 captions (5 per image), 512-d L2-normalised random features, float32.
Both sides start from the same [5000, 25000] similarity matrix (the matmul is timed separately).
The baseline is the per-query loop of the original release's `compute_retrieval`: one
`torch.argsort` per caption over 5,000 images and per image over 25,000 captions, then
`torch.where` for the correct items. With continuous random scores there are no ties, so both give the same R@K.

    python benchmarks/eval_retrieval_speed.py                # full size, as in RESULTS.md
    python benchmarks/eval_retrieval_speed.py --images 1000  # smaller
"""

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from alip.eval.metrics import retrieval_metrics


def argsort_loop(similarity: torch.Tensor, text_to_image: torch.Tensor) -> dict:
    """The original release's `compute_retrieval` (its per-query progress print left out):
    `torch.argsort(descending=True)` per caption and per image, then `torch.where` for the correct items."""
    n_img = similarity.shape[0]
    img2txt = [[] for _ in range(n_img)]
    for t, i in enumerate(text_to_image.tolist()):
        img2txt[i].append(t)
    t2i_similarity_score = similarity.t()
    t2i_ranks = torch.zeros(t2i_similarity_score.shape[0])
    for index, score in enumerate(t2i_similarity_score):
        inds = torch.argsort(score, descending=True)
        t2i_ranks[index] = torch.where(inds == text_to_image[index])[0][0]
    i2t_ranks = torch.zeros(n_img)
    for index, score in enumerate(similarity):
        inds = torch.argsort(score, descending=True)
        rank = 1e10
        for i in img2txt[index]:
            tmp = torch.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        i2t_ranks[index] = rank
    out = {f"i2t_R@{k}": 100.0 * len(torch.where(i2t_ranks < k)[0]) / n_img for k in (1, 5, 10)}
    out.update({f"t2i_R@{k}": 100.0 * len(torch.where(t2i_ranks < k)[0]) / len(t2i_ranks) for k in (1, 5, 10)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reps", type=int, default=5, help="repetitions of ours (median reported)")
    p.add_argument("--baseline-reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n_txt = args.images * args.captions_per_image
    # captions near their image so that R@K is neither 0 nor 100
    img = F.normalize(torch.randn(args.images, args.dim, generator=gen), dim=-1)
    text_to_image = torch.arange(args.images).repeat_interleave(args.captions_per_image)
    txt = F.normalize(img[text_to_image] + 8 * torch.randn(n_txt, args.dim, generator=gen) / args.dim**0.5, dim=-1)

    t0 = time.perf_counter()
    sim = img @ txt.T  # [N_img, N_txt]
    matmul_s = time.perf_counter() - t0
    rule_times = {}
    for ties in ("clip_benchmark", "pessimistic", "release"):  # the default first: it is "ours"
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            metrics = retrieval_metrics(sim, text_to_image, ties=ties)
            times.append(time.perf_counter() - t0)
        rule_times[ties] = times
        if ties == "clip_benchmark":
            ours, ours_times = metrics, times
        assert metrics == ours, (ties, metrics, ours)  # continuous random scores: no ties, one answer
    base_times = []
    for _ in range(args.baseline_reps):
        t0 = time.perf_counter()
        base = argsort_loop(sim, text_to_image)
        base_times.append(time.perf_counter() - t0)
    for k, v in base.items():
        assert abs(ours[k] - v) < 1e-9, (k, ours[k], v)
    ours_s, base_s = statistics.median(ours_times), statistics.median(base_times)
    print(
        json.dumps(
            {
                "images": args.images,
                "captions": n_txt,
                "dim": args.dim,
                "threads": torch.get_num_threads(),
                "matmul_s": round(matmul_s, 3),
                "ours_s_median": round(ours_s, 4),
                "ours_s_all": [round(t, 4) for t in ours_times],
                "median_s_by_tie_rule": {k: round(statistics.median(v), 4) for k, v in rule_times.items()},
                "argsort_loop_s": [round(t, 2) for t in base_times],
                "speedup": round(base_s / ours_s, 1),
                "metrics": {k: round(v, 2) for k, v in ours.items()},
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
