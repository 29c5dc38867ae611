"""Length-aware text encoding is exact: features and gradients equal the full-context ones."""

import pytest
import torch

import alip
from alip.text_trim import ROUND, bucket_sizes, encode_texts, rounded_length, supports_trim, text_lengths

NAME = "ALIP-Tiny"
SOT, EOT = 49406, 49407


def random_tokens(n: int, lengths: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[n, 77] CLIP-style rows: start token, random ids, end token at position length-1, zero padding."""
    tokens = torch.zeros(n, 77, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        tokens[i, 0] = SOT
        tokens[i, 1 : length - 1] = torch.randint(1, SOT, (length - 2,), generator=gen)
        tokens[i, length - 1] = EOT
    return tokens


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    raw_len = torch.randint(2, 78, (12,), generator=gen)  # 2 .. 77 tokens
    raw_len[0] = 77  # one full-length text: the "batch" mode must then keep all 77 for raw text
    cap_len = torch.randint(2, 21, (12,), generator=gen)  # short synthetic captions
    return random_tokens(12, raw_len, gen), random_tokens(12, cap_len, gen)


def features_and_grads(mode, batch, grad_checkpointing=False):
    torch.manual_seed(0)
    model, _, _ = alip.create_model(NAME)
    model.set_grad_checkpointing(grad_checkpointing)
    raw, cap = batch
    (t, c), _ = encode_texts(model, [raw, cap], mode, buckets=3)
    weights = torch.linspace(-1, 1, t.numel()).view_as(t)
    loss = (t * weights).sum() + (c * weights.flip(0)).sum() + (t * c).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return t.detach(), c.detach(), grads


@pytest.mark.parametrize("mode", ["batch", "buckets"])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_trimmed_features_and_gradients_equal_full_context(batch, mode, grad_checkpointing, one_thread):
    t0, c0, g0 = features_and_grads("off", batch)
    t1, c1, g1 = features_and_grads(mode, batch, grad_checkpointing)
    torch.testing.assert_close(t1, t0, atol=1e-5, rtol=0)
    torch.testing.assert_close(c1, c0, atol=1e-5, rtol=0)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_trim_actually_shortens_the_rows(batch, monkeypatch):
    """A mode that silently ran at 77 tokens would pass the exactness test: check the lengths used."""
    import alip.text_trim as tt

    seen = []
    original = tt.encode_text_prefix
    monkeypatch.setattr(
        tt,
        "encode_text_prefix",
        lambda clip, tokens, **kw: seen.append(tokens.shape[1]) or original(clip, tokens, **kw),
    )
    model, _, _ = alip.create_model(NAME)
    raw, cap = batch
    with torch.no_grad():
        _, calls = encode_texts(model, [raw, cap], "batch")
        assert seen == [77, rounded_length(int(text_lengths(cap).max()), 77)]
        assert calls == [(12, n) for n in seen]  # what alip.flops counts is what was computed
        seen.clear()
        _, calls = encode_texts(model, [raw, cap], "buckets", buckets=3)
    assert [n for _, n in calls] == seen and sum(c for c, _ in calls) == 24
    assert len(seen) <= 3 and seen == sorted(seen) and seen[0] <= 24 and seen[-1] == 77
    assert all(n % ROUND == 0 or n == 77 for n in seen)


def test_bipath_modes_agree_and_unsupported_models_fall_back(batch):
    torch.manual_seed(0)
    model, _, _ = alip.create_model(NAME)
    assert supports_trim(model)
    image = torch.randn(12, 3, 64, 64)
    raw, cap = batch
    with torch.no_grad():
        ref = alip.BiPathCLIP(model, text_trim="off")(image, raw, cap)
        out = alip.BiPathCLIP(model, text_trim="buckets")(image, raw, cap)
        clip_only = alip.BiPathCLIP(model, text_trim="batch")(image, raw)
    torch.testing.assert_close(out["caption_features"], ref["caption_features"], atol=1e-5, rtol=0)
    torch.testing.assert_close(clip_only["raw_features"], ref["raw_features"], atol=1e-5, rtol=0)
    assert clip_only["caption_features"] is None
    model.text_pool_type = "last"  # e.g. a tower that pools the last position: trimming would change it
    assert alip.BiPathCLIP(model, text_trim="batch").text_trim == "off"


def test_bucket_sizes_pick_the_cheapest_cuts():
    # 85 short texts and 15 full ones: equal halves would compute 50 texts at 77 tokens.
    lengths = sorted([10] * 60 + [20] * 25 + [77] * 15)
    assert bucket_sizes(lengths, 2, 77) == [85, 15]
    assert bucket_sizes(lengths, 3, 77) == [60, 25, 15]
    assert bucket_sizes(lengths, 8, 77) == [60, 25, 15]  # never more runs than distinct lengths
    assert bucket_sizes(lengths, 1, 77) == [100]
    brute = min(  # every 2-run split, by token cost
        range(1, 100), key=lambda c: c * rounded_length(lengths[c - 1], 77) + (100 - c) * 77
    )
    assert bucket_sizes(lengths, 2, 77)[0] == brute
