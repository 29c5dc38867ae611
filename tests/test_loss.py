"""AlipLoss against a naive reference written here from DESIGN.md section 4, plus ablations vs open_clip."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import alip


def normed(n, d, gen):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)


def noisy_batch(n=12, d=16, seed=0):
    """Features where some raw texts agree with image and caption and some do not, so weights vary."""
    gen = torch.Generator().manual_seed(seed)
    v = normed(n, d, gen)
    c = F.normalize(v + 0.5 * normed(n, d, gen), dim=-1)
    t = F.normalize(v + 0.5 * normed(n, d, gen), dim=-1)
    t[: n // 3] = normed(n // 3, d, gen)  # a third of the raw texts are unrelated ("noise")
    return v, t, c


class NaiveAlip:
    """Sample-by-sample transcription of the formulas, in float64 Python scalars."""

    def __init__(self, pair_gate, momentum=0.99, power=2.0):
        self.pair_gate, self.m, self.p = pair_gate, momentum, power
        self.mu = {"tc": 1.0, "it": 1.0, "ic": 1.0}

    def step(self, v, t, c, scale):
        n = v.shape[0]
        dot = lambda a, b, i: sum(float(a[i, k]) * float(b[i, k]) for k in range(a.shape[1]))  # noqa: E731
        s = {
            "tc": [dot(t, c, i) for i in range(n)],
            "it": [dot(v, t, i) for i in range(n)],
            "ic": [dot(v, c, i) for i in range(n)],
        }
        for key in self.mu:  # EMA first, then the weights
            self.mu[key] = self.m * self.mu[key] + (1 - self.m) * sum(s[key]) / n
        ws, wt, wc = [], [], []
        for i in range(n):
            r = math.exp(s["tc"][i] - self.mu["tc"]) ** self.p
            a = math.exp(s["it"][i] - self.mu["it"]) ** self.p
            b = math.exp(s["ic"][i] - self.mu["ic"]) ** self.p
            ws.append(min(r, 1.0))
            if self.pair_gate == "official":
                wt.append(a if r < 1 else 1.0)
                wc.append(b if r < 1 else 1.0)
            else:
                wt.append(min(a, 1.0))
                wc.append(min(b, 1.0))

        def l_i(a, b, i):
            def ce(x, y):  # -log softmax_i of row i of scale * x @ y^T
                logits = [scale * sum(float(x[i, k]) * float(y[j, k]) for k in range(x.shape[1])) for j in range(n)]
                mx = max(logits)
                return -(logits[i] - mx - math.log(sum(math.exp(z - mx) for z in logits)))

            return (ce(a, b) + ce(b, a)) / 2

        loss_raw = sum(ws[i] * wt[i] * l_i(v, t, i) for i in range(n)) / n
        loss_cap = sum(ws[i] * wc[i] * l_i(v, c, i) for i in range(n)) / n
        return {
            "loss_raw": loss_raw,
            "loss_caption": loss_cap,
            "ws": ws,
            "wt": wt,
            "wc": wc,
            "mu": dict(self.mu),
        }


@pytest.mark.parametrize("pair_gate", ["official", "paper"])
def test_matches_naive_reference_over_steps(pair_gate):
    loss_fn = alip.AlipLoss(pair_gate=pair_gate)
    ref = NaiveAlip(pair_gate)
    for step in range(5):  # the EMA moves every step; the weights must follow it
        v, t, c = noisy_batch(seed=step)
        scale = 10.0 + step
        out = loss_fn(v, t, c, torch.tensor(scale, dtype=torch.float64))
        want = ref.step(v, t, c, scale)
        assert out["loss_raw"].item() == pytest.approx(want["loss_raw"], rel=1e-5)
        assert out["loss_caption"].item() == pytest.approx(want["loss_caption"], rel=1e-5)
        assert out["loss"].item() == pytest.approx(want["loss_raw"] + want["loss_caption"], rel=1e-5)
        torch.testing.assert_close(
            out["weight_sample"], torch.tensor(want["ws"]), rtol=1e-5, atol=1e-6, check_dtype=False
        )
        torch.testing.assert_close(out["weight_raw"], torch.tensor(want["wt"]), rtol=1e-5, atol=1e-6, check_dtype=False)
        torch.testing.assert_close(
            out["weight_caption"], torch.tensor(want["wc"]), rtol=1e-5, atol=1e-6, check_dtype=False
        )
        state = loss_fn.state_dict()
        for key in ("tc", "it", "ic"):
            assert state[f"gates.ema_{key}"].item() == pytest.approx(want["mu"][key], rel=1e-6)
        if pair_gate == "paper":
            assert out["weight_raw"].max() <= 1 and out["weight_caption"].max() <= 1
        # the weights are not trivial: some samples are down-weighted
        assert out["weight_sample"].min() < 0.9


def test_official_pair_weights_exceed_one_for_flagged_samples():
    # r < 1 (raw text disagrees with caption) but the image matches the raw text better than average
    s_tc = torch.tensor([0.1, 0.9])
    s_it = torch.tensor([0.8, 0.9])
    s_ic = torch.tensor([0.2, 0.1])
    w = alip.gate_weights(s_tc, s_it, s_ic, 0.5, 0.5, 0.5, power=2.0, pair_gate="official")
    assert w.sample[0] == pytest.approx(math.exp(-0.4) ** 2)
    assert w.raw[0] == pytest.approx(math.exp(0.3) ** 2)  # > 1, unclamped
    assert w.raw[1] == 1.0 and w.caption[1] == 1.0  # r >= 1: pair gate not applied
    w = alip.gate_weights(s_tc, s_it, s_ic, 0.5, 0.5, 0.5, power=2.0, pair_gate="paper")
    assert w.raw[0] == 1.0 and w.caption[1] == pytest.approx(math.exp(-0.4) ** 2)


def test_use_caption_false_is_open_clip_clip_loss():
    v, t, _ = noisy_batch()
    scale = torch.tensor(14.0, dtype=torch.float64)
    out = alip.AlipLoss(use_caption=False)(v, t, None, scale)
    assert set(out) == {"loss", "loss_raw", "weight_sample", "weight_raw"}
    torch.testing.assert_close(out["loss"], ClipLoss()(v, t, scale))
    assert torch.all(out["weight_sample"] == 1)


def test_use_gates_false_is_two_unweighted_clip_losses():
    v, t, c = noisy_batch()
    scale = torch.tensor(14.0, dtype=torch.float64)
    loss_fn = alip.AlipLoss(use_gates=False)
    out = loss_fn(v, t, c, scale)
    torch.testing.assert_close(out["loss_raw"], ClipLoss()(v, t, scale))
    torch.testing.assert_close(out["loss_caption"], ClipLoss()(v, c, scale))
    for key in ("weight_sample", "weight_raw", "weight_caption"):
        assert torch.all(out[key] == 1)
    assert loss_fn.state_dict()["gates.ema_tc"].item() == 1.0  # untouched


def test_state_dict_round_trip_resumes_the_ema():
    a = alip.AlipLoss()
    for step in range(4):
        a(*noisy_batch(seed=step), 12.0)
    state = a.state_dict()
    assert sorted(state) == ["gates.ema_ic", "gates.ema_it", "gates.ema_tc"]
    b = alip.AlipLoss()
    fresh = b(*noisy_batch(seed=9), 12.0)  # EMAs at 1.0: different weights
    b.load_state_dict(state)
    v, t, c = noisy_batch(seed=9)
    out_a, out_b = a(v, t, c, 12.0), b(v, t, c, 12.0)
    torch.testing.assert_close(out_a["weight_sample"], out_b["weight_sample"])
    torch.testing.assert_close(out_a["loss"], out_b["loss"])
    assert not torch.allclose(fresh["weight_sample"], out_a["weight_sample"])


def test_eval_mode_scores_without_updating_the_ema():
    loss_fn = alip.AlipLoss()
    loss_fn(*noisy_batch(seed=1), 12.0)
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    loss_fn.eval()
    loss_fn(*noisy_batch(seed=2), 12.0)
    assert all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())


@pytest.mark.parametrize(
    "where,value",
    [("image", "nan"), ("raw", "nan"), ("caption", "nan"), ("caption", "-inf"), ("scale", "inf")],
)
def test_non_finite_inputs_raise_and_leave_state_alone(where, value):
    loss_fn = alip.AlipLoss()
    v, t, c = noisy_batch()
    scale = torch.tensor(12.0, dtype=torch.float64)
    bad = {"image": v, "raw": t, "caption": c}
    if where == "scale":
        scale = torch.tensor(float(value), dtype=torch.float64)
    else:
        bad[where] = bad[where].clone()
        bad[where][3, 0] = float(value)
    with pytest.raises(alip.NonFiniteLossInputError, match="logit_scale" if where == "scale" else where):
        loss_fn(bad["image"], bad["raw"], bad["caption"], scale)
    assert all(v.item() == 1.0 for v in loss_fn.state_dict().values())


def test_gradients_flow_to_all_three_feature_sets_and_not_through_the_gates():
    v, t, c = (x.float().requires_grad_() for x in noisy_batch())
    out = alip.AlipLoss()(v, t, c, 12.0)
    out["loss"].backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (v, t, c))
    assert not out["weight_sample"].requires_grad


def test_half_precision_features_are_scored_in_float32():
    v, t, c = (x.to(torch.bfloat16) for x in noisy_batch())
    out = alip.AlipLoss()(v, t, c, 12.0)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="pair_gate"):
        alip.AlipLoss(pair_gate="both")
    with pytest.raises(ValueError, match="momentum"):
        alip.AlipLoss(momentum=1.0)
    with pytest.raises(ValueError, match="power"):
        alip.AlipLoss(power=0)
    v, t, c = noisy_batch()
    with pytest.raises(ValueError, match="caption_features"):
        alip.AlipLoss()(v, t, None, 10.0)
    with pytest.raises(ValueError, match="raw_features has shape"):
        alip.AlipLoss()(v, t[:5], c, 10.0)
