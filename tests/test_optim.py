"""Weight-decay groups and schedules of alip.train.optim."""

import math

import pytest
import torch

import alip
from alip.config import OptimConfig, ScheduleConfig
from alip.train.optim import build_optimizer, build_scheduler


def test_weight_decay_skips_biases_norms_embeddings_and_logit_scale():
    model, _, _ = alip.create_model("ALIP-Tiny")
    opt = build_optimizer(model, OptimConfig(weight_decay=0.2))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.2 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decayed | plain == set(names.values()) and not decayed & plain
    no_decay = ["logit_scale", "token_embedding.weight", "positional_embedding", "visual.class_embedding"]
    no_decay += ["visual.positional_embedding", "ln_final.weight", "ln_final.bias", "visual.ln_pre.weight"]
    for name in no_decay:
        assert name in plain, name
    for name in (
        "visual.conv1.weight",
        "text_projection",
        "visual.proj",
        "transformer.resblocks.0.attn.in_proj_weight",
    ):
        assert name in decayed, name


@pytest.mark.parametrize("rule", ["open_clip", "all"])
def test_the_other_decay_rules(rule):
    model, _, _ = alip.create_model("ALIP-Tiny")
    opt = build_optimizer(model, OptimConfig(weight_decay=0.2, decay_params=rule))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    if rule == "all":  # the release: one group, every parameter
        assert len(opt.param_groups) == 1 and decayed == set(names.values())
        return
    # open_clip_train/main.py's rule, as it reads there: 2-D embeddings are decayed
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    assert decayed == {n for n, p in model.named_parameters() if not exclude(n, p)}
    assert {"token_embedding.weight", "positional_embedding", "visual.positional_embedding"} <= decayed
    assert not {"logit_scale", "visual.class_embedding", "ln_final.weight"} & decayed


def lrs_and_beta1(cfg, steps, lr=1e-3):
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [param]}], lr=lr, betas=(0.9, 0.98))
    sched = build_scheduler(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        sched.step()
    return out


def test_onecycle_is_the_released_schedule_with_beta1_cycling():
    out = lrs_and_beta1(ScheduleConfig(name="onecycle", warmup=0.1), 100)
    assert out[0][0] == pytest.approx(1e-3 / 25) and out[0][1] == pytest.approx(0.95)
    peak = max(range(100), key=lambda i: out[i][0])
    assert (
        peak in (9, 10)
        and out[peak][0] == pytest.approx(1e-3, rel=1e-3)
        and out[peak][1] == pytest.approx(0.85, abs=1e-3)
    )
    assert out[-1][0] < 1e-3 / 25 / 1e3 and out[-1][1] > 0.949


def test_cosine_with_warmup_and_constant():
    out = lrs_and_beta1(ScheduleConfig(name="cosine", warmup=0.1, final_lr_fraction=0.1), 100)
    assert out[0][0] == pytest.approx(1e-4) and out[9][0] == pytest.approx(1e-3)
    assert out[55][0] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))))
    assert out[-1][0] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 90 / 90))), rel=1e-2)
    assert all(beta == 0.9 for _, beta in out)  # only OneCycle cycles beta1
    out = lrs_and_beta1(ScheduleConfig(name="constant", warmup=0.0), 10)
    assert {lr for lr, _ in out} == {1e-3}


@pytest.mark.parametrize(("warmup", "total"), [(0.1, 10), (0.5, 2)])
def test_onecycle_with_a_one_step_warmup_does_not_divide_by_zero(warmup, total):
    # torch's OneCycleLR alone raises ZeroDivisionError when warmup * total_steps == 1.
    out = lrs_and_beta1(ScheduleConfig(name="onecycle", warmup=warmup), total)
    lrs = [lr for lr, _ in out]
    assert lrs[0] == pytest.approx(1e-3 / 25) and all(math.isfinite(lr) and lr <= 1e-3 for lr in lrs)
    if total == 10:  # one warm-up step, then the annealing from (just below) the peak
        assert lrs[1] == max(lrs) and lrs[1] > 0.95e-3
