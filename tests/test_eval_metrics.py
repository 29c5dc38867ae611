"""alip.eval.metrics against naive per-query references (ties broken against the query: the `pessimistic` rule;
the `topk` and `argsort` rules are checked against CLIP_benchmark and the release in test_eval_protocol.py)."""

import pytest
import torch

from alip.eval.metrics import classification_metrics, paper_metric, retrieval_metrics


def naive_rank(scores: list[float], correct: set[int]) -> int:
    """Position of the first correct item after sorting by score, wrong items first among equals."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j in correct))
    return next(pos for pos, j in enumerate(order) if j in correct)


def naive_retrieval(sim: torch.Tensor, text_to_image: list[int], ks=(1, 5, 10)) -> dict:
    n_img, n_txt = sim.shape
    out = {}
    i2t = [naive_rank(sim[i].tolist(), {t for t in range(n_txt) if text_to_image[t] == i}) for i in range(n_img)]
    t2i = [naive_rank(sim[:, t].tolist(), {text_to_image[t]}) for t in range(n_txt)]
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * sum(r < k for r in i2t) / n_img
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * sum(r < k for r in t2i) / n_txt
    return out


def naive_classification(logits: torch.Tensor, targets: list[int]) -> dict:
    n, c = logits.shape
    ranks = [naive_rank(logits[i].tolist(), {targets[i]}) for i in range(n)]
    per_class = []
    for cls in sorted(set(targets)):
        rows = [i for i in range(n) if targets[i] == cls]
        per_class.append(sum(ranks[i] == 0 for i in rows) / len(rows))
    return {
        "top1": 100.0 * sum(r < 1 for r in ranks) / n,
        "top5": 100.0 * sum(r < 5 for r in ranks) / n,
        "mean_per_class_recall": 100.0 * sum(per_class) / len(per_class),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_naive_reference_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n_img = 40
    text_to_image = torch.arange(n_img).repeat_interleave(5)  # 5 captions per image
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]  # captions in any order
    # Quantised scores: many exact ties, including ties between correct and wrong items.
    sim = torch.randint(0, 6, (n_img, len(text_to_image)), generator=gen).float() / 5
    sim[text_to_image, torch.arange(len(text_to_image))] += 0.2 * torch.randint(
        0, 3, (len(text_to_image),), generator=gen
    )
    ours = retrieval_metrics(sim, text_to_image, ties="pessimistic")
    ref = naive_retrieval(sim, text_to_image.tolist())
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < ours["i2t_R@1"] < 100 and 0 < ours["t2i_R@5"] < 100  # the case is not degenerate


def test_retrieval_small_blocks_equal_one_block():
    gen = torch.Generator().manual_seed(3)
    text_to_image = torch.arange(30).repeat_interleave(5)
    sim = torch.randn(30, 150, generator=gen)
    from alip.eval.metrics import retrieval_ranks

    a = retrieval_ranks(sim, text_to_image, block_size=7)
    b = retrieval_ranks(sim, text_to_image, block_size=4096)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_retrieval_ties_count_against_the_query():
    sim = torch.zeros(3, 6)  # a constant model
    out = retrieval_metrics(sim, torch.tensor([0, 0, 1, 1, 2, 2]), ks=(1, 4, 5), ties="pessimistic")
    # 4 wrong captions tie with the correct ones: R@4 misses, R@5 hits; 2 other images tie: R@1 misses
    assert out["i2t_R@1"] == 0 and out["i2t_R@4"] == 0 and out["i2t_R@5"] == 100
    assert out["t2i_R@1"] == 0 and out["t2i_R@4"] == 100


def test_random_retrieval_is_chance():
    gen = torch.Generator().manual_seed(0)
    text_to_image = torch.arange(500).repeat_interleave(5)
    out = retrieval_metrics(torch.randn(500, 2500, generator=gen), text_to_image)
    assert out["t2i_R@10"] == pytest.approx(100 * 10 / 500, abs=0.6)  # 2%
    assert out["i2t_R@10"] == pytest.approx(100 * (1 - (1 - 10 / 2500) ** 5), abs=4)  # any of 5 captions


@pytest.mark.parametrize("seed", [0, 1])
def test_classification_matches_naive_reference_on_imbalanced_classes(seed):
    gen = torch.Generator().manual_seed(seed)
    counts = [50, 20, 5, 1, 12, 0, 7]  # class 5 has no samples; left out of the per-class mean
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    targets = targets[torch.randperm(len(targets), generator=gen)]
    logits = torch.randint(0, 4, (len(targets), len(counts)), generator=gen).float()  # ties
    logits[torch.arange(len(targets)), targets] += torch.randint(0, 3, (len(targets),), generator=gen).float()
    ours = classification_metrics(logits, targets, ties="pessimistic")
    ref = naive_classification(logits, targets.tolist())
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert ours["num_samples"] == len(targets)
    assert abs(ours["top1"] - ours["mean_per_class_recall"]) > 1  # imbalance matters here


def test_classification_rejects_integer_logits_and_bad_targets():
    with pytest.raises(TypeError, match="floating point"):
        classification_metrics(torch.zeros(3, 4, dtype=torch.long), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(torch.zeros(3, 4), torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(torch.full((3, 4), float("nan")), torch.tensor([0, 1, 2]))


def test_paper_metric_per_dataset():
    assert {d for d in ("pets", "flowers", "caltech101", "fgvc_aircraft") if paper_metric(d) != "top1"} == {
        "pets",
        "flowers",
        "caltech101",
        "fgvc_aircraft",
    }
    assert paper_metric("cifar10") == "top1" and paper_metric("imagenet1k") == "top1"


@pytest.mark.parametrize("levels", [3, 20, None])
def test_clip_benchmark_hits_equal_a_topk_per_query_even_with_many_ties(levels):
    """Counting decides most queries without topk; with heavy ties the rest must still be topk's pick."""
    from alip.eval.metrics import retrieval_topk_hits

    gen = torch.Generator().manual_seed(levels or 0)
    sim = torch.rand(37, 90, generator=gen)
    if levels:  # few distinct scores: tie groups straddle every K
        sim = (sim * levels).floor() / levels
    text_to_image = torch.arange(90) % 36  # image 36 has no caption
    found = retrieval_topk_hits(sim, text_to_image, (1, 5, 10, 200), block_size=8)
    for k in (1, 5, 10, 200):
        i2t, t2i = found[k]
        kk = min(k, 90)
        want_i2t = torch.tensor([bool((text_to_image[sim[i].topk(kk).indices] == i).any()) for i in range(37)])
        want_t2i = torch.tensor(
            [bool((sim[:, j].topk(min(k, 37)).indices == text_to_image[j]).any()) for j in range(90)]
        )
        assert torch.equal(i2t, want_i2t) and torch.equal(t2i, want_t2i), k
