"""Length-aware text encoding is exact: features and gradients equal the full-context ones."""

import copy
from pathlib import Path

import numpy as np
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
        # rtol: token_embedding's end-token row sums all 24 texts (entries up to ~63), so fp32 rounding
        # in another order leaves ~1.5e-5 even on its small entries (rtol=1e-5 fails: 2.6e-5 needed)
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


def test_compile_with_buckets_compiles_few_text_shapes(one_thread):
    """model.compile with buckets: the length planning runs outside dynamo and only the towers are
    compiled, so ~20 heavy-tailed batches compile at most one text graph per rounded length (77 /
    ROUND + 1), never hit the recompile limit (which fails hard here), and match eager within 1e-5.
    Compiling the whole BiPathCLIP instead hit dynamo's limit of 8 within 12 steps (issue 13)."""
    torch.manual_seed(0)
    model, _, _ = alip.create_model(NAME)
    eager = alip.BiPathCLIP(copy.deepcopy(model), text_trim="buckets")
    net = alip.BiPathCLIP(model, text_trim="buckets")
    graphs = []  # the example inputs of every graph dynamo compiles

    def counting_eager_backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward  # the "eager" backend: run the captured graph as is

    max_text_graphs = 77 // ROUND + 1
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=max_text_graphs):
            net.compile(backend=counting_eager_backend)
            rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
            for _ in range(20):
                body = np.clip(np.round(rng.lognormal(np.log(14), 0.6, 8)), 3, 76)  # heavy-tailed raw texts
                raw_len = torch.from_numpy(np.where(rng.random(8) < 0.15, 77, body).astype(np.int64))
                cap_len = torch.from_numpy(rng.integers(8, 21, 8))
                args = (
                    torch.randn(8, 3, 64, 64, generator=gen),
                    *map(lambda n: random_tokens(8, n, gen), (raw_len, cap_len)),
                )
                out, ref = net(*args), eager(*args)
                for key in ("image_features", "raw_features", "caption_features"):
                    torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=0, msg=key)
                (out["raw_features"].sum() + out["caption_features"].sum()).backward()
            assert net.take_text_calls() and eager._compiled_call_impl is None
    finally:
        torch._dynamo.reset()
    image_graphs = [g for g in graphs if any(len(shape) == 4 for shape in g)]  # [B, 3, H, W] input
    text_graphs = len(graphs) - len(image_graphs)
    assert len(image_graphs) == 1 and 1 <= text_graphs <= max_text_graphs, graphs
    assert net._compiled_call_impl is None  # not the whole forward: it would trace the planning
    model.zero_grad()
    off = alip.BiPathCLIP(model, text_trim="off")
    off.compile(backend=counting_eager_backend)
    assert off._compiled_call_impl is not None  # untrimmed: the whole forward, as before


@pytest.mark.parametrize("trim", ["off", "buckets"])
def test_trainer_compiles_the_towers_when_trimming(trim, tmp_path):
    """model.compile in the trainer goes through BiPathCLIP.compile (construction only: nothing is traced)."""
    from shard_factory import write_test_shards

    from alip.config import load_config, validate
    from alip.train.trainer import Trainer

    meta = write_test_shards(tmp_path / "shards", num_records=8, per_shard=8).meta
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    overrides = [
        f"data.train={meta}",
        f"output_dir={tmp_path / 'run'}",
        "model.compile=true",
        f"model.text_trim={trim}",
    ]
    cfg = load_config(tiny, overrides)
    trainer = Trainer(cfg, validate(cfg, 1), tmp_path / "run", torch.device("cpu"))
    try:
        whole = trainer.bipath._compiled_call_impl is not None
        towers = [m._compiled_call_impl is not None for m in (trainer.clip.visual, trainer.clip.transformer)]
        assert (whole, towers) == ((True, [False, False]) if trim == "off" else (False, [True, True]))
        assert "transformer.resblocks.0.attn.in_proj_weight" in trainer.clip.state_dict()  # keys unchanged
    finally:
        trainer.loader.close()
        trainer.logger.close()
        torch.use_deterministic_algorithms(False)  # the tiny config switches it on process-wide


def test_the_library_default_is_the_trainers_trimming():
    """`alip.BiPathCLIP(model)` trims as the trainer does by default (config model.text_trim): exact, and cheaper."""
    from alip.config import ModelConfig

    model, _, _ = alip.create_model(NAME)
    net = alip.BiPathCLIP(model)
    assert net.text_trim == ModelConfig().text_trim == "buckets"
    assert net.text_buckets == ModelConfig().text_buckets
