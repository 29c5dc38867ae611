"""The gated sigmoid objective (loss.objective=sigmoid): SigLIP's pairwise loss under ALIP's gates.

Ungated it is open_clip's SigLipLoss (loss and gradients, one rank and two gloo ranks against its neighbour
exchange); gated it is world-size invariant and exact under accumulation, with K caption sources either way;
and the trainer trains, resumes bitwise, exports and scores a sigmoid model.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import join_rank_env, run_ranks
from open_clip.loss import SigLipLoss
from shard_factory import write_test_shards
from step_cases import assert_same_steps, run_steps

import alip
from alip.config import ConfigError, load_config, validate
from alip.train.run import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
SIGMOID_ARGS = ["loss.objective=sigmoid", f"model.init_logit_scale={math.log(10)}", "model.init_logit_bias=-10"]
N, D = 8, 16


def features(n=N, d=D, k=2, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=-1) for _ in range(k)]


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def naive_term(a, b, t, bias):
    """l_i = 1/2 (row i + column i) of -log sigmoid(z_ij (t a_i.b_j + b)), written out pair by pair."""
    n = a.shape[0]
    out = []
    for i in range(n):
        total = 0.0
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (t * a[i] @ b[j] + bias)) - F.logsigmoid(z * (t * a[j] @ b[i] + bias))
        out.append(total / 2)
    return torch.stack(out)


def test_ungated_sigmoid_equals_open_clips_siglip_loss_and_its_gradients():
    v, txt = features()
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ours_in, ref_in = leaves(v, txt, t, b), leaves(v, txt, t, b)
    ours = alip.AlipLoss(use_caption=False, objective="sigmoid")(*ours_in[:2], None, ours_in[2], logit_bias=ours_in[3])
    ref = SigLipLoss()(*ref_in)
    torch.testing.assert_close(ours["loss"], ref, rtol=1e-12, atol=0)
    for a, r in zip(torch.autograd.grad(ours["loss"], ours_in), torch.autograd.grad(ref, ref_in), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-14)


def test_without_gates_both_terms_are_siglip_losses():
    v, txt, cap = features(k=3)
    t, b = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    res = alip.AlipLoss(use_gates=False, objective="sigmoid")(v, txt, cap, t, logit_bias=b)
    torch.testing.assert_close(res["loss_raw"], SigLipLoss()(v, txt, t, b))
    torch.testing.assert_close(res["loss_caption"], SigLipLoss()(v, cap, t, b))


@pytest.mark.parametrize("pair_gate", ["official", "paper"])
def test_gated_sigmoid_weights_each_sample_as_the_softmax_objective_does(pair_gate):
    """Same gates (and EMA moves) as the softmax objective; each term weighted per sample, against the naive sum."""
    v, txt, cap = features(k=3)
    cap = F.normalize(cap + 2 * v, dim=-1)  # captions closer to the image than raw text: weights differ from 1
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    sig = alip.AlipLoss(objective="sigmoid", pair_gate=pair_gate, momentum=0.5).double()
    soft = alip.AlipLoss(pair_gate=pair_gate, momentum=0.5).double()
    for _ in range(2):  # the second call uses EMAs moved by the first
        res = sig(v, txt, cap, t, logit_bias=b)
        ref = soft(v, txt, cap, t)
        for key in ("weight_sample", "weight_raw", "weight_caption"):
            torch.testing.assert_close(res[key], ref[key], rtol=0, atol=0)
        assert sig.state_dict() == soft.state_dict()
        w = res["weight_sample"]
        assert w.min() < 1  # the gates act
        raw = (w * res["weight_raw"] * naive_term(v, txt, t, b)).mean()
        caption = (w * res["weight_caption"] * naive_term(v, cap, t, b)).mean()
        torch.testing.assert_close(res["loss_raw"], raw, rtol=1e-12, atol=0)
        torch.testing.assert_close(res["loss_caption"], caption, rtol=1e-12, atol=0)


def test_the_bias_is_required_by_sigmoid_refused_by_softmax_and_checked_for_nan():
    v, txt, cap = features(k=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs logit_bias"):
        alip.AlipLoss(objective="sigmoid")(v, txt, cap, 10.0)
    with pytest.raises(ValueError, match="takes no logit_bias"):
        alip.AlipLoss()(v, txt, cap, 10.0, logit_bias=-10.0)
    with pytest.raises(ValueError, match="objective must be one of"):
        alip.AlipLoss(objective="hinge")
    with pytest.raises(alip.NonFiniteLossInputError, match="logit_bias"):
        alip.AlipLoss(objective="sigmoid")(v, txt, cap, 10.0, logit_bias=float("nan"))


def test_config_needs_a_bias_for_sigmoid_and_refuses_one_for_softmax():
    with pytest.raises(ConfigError, match="loss.objective=sigmoid needs model.init_logit_bias"):
        validate(load_config(TINY, ["data.train=x", "loss.objective=sigmoid"]))
    with pytest.raises(ConfigError, match="model.init_logit_bias is for loss.objective=sigmoid"):
        validate(load_config(TINY, ["data.train=x", "model.init_logit_bias=-10"]))
    with pytest.raises(ConfigError, match=r"model.init_logit_scale must be in \[0, 4.60517\]"):
        validate(load_config(TINY, ["data.train=x", *SIGMOID_ARGS, "model.init_logit_scale=9"]))
    validate(load_config(TINY, ["data.train=x", *SIGMOID_ARGS]))


# ------------------------------------------------------------------ two gloo ranks


def siglip_on_ranks(rank, world, local_loss):
    """Ungated ours vs open_clip's SigLipLoss (neighbour exchange) on this rank's rows of one global batch."""
    v, txt = features(dtype=torch.float32)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    t, b = torch.tensor(7.0), torch.tensor(-5.0)
    ours_in, ref_in = leaves(v[rows], txt[rows], t, b), leaves(v[rows], txt[rows], t, b)
    ours = alip.AlipLoss(use_caption=False, objective="sigmoid", local_loss=local_loss)(
        *ours_in[:2], None, ours_in[2], logit_bias=ours_in[3]
    )["loss"]
    ref = SigLipLoss(rank=rank, world_size=world)(*ref_in)
    ours.backward()
    ref.backward()
    losses = torch.stack([ours.detach(), ref.detach()])
    dist.all_reduce(losses)
    scalar_grads = torch.stack([ours_in[2].grad, ours_in[3].grad, ref_in[2].grad, ref_in[3].grad])
    dist.all_reduce(scalar_grads)  # what DDP's all-reduce of the parameters' gradients sums
    return {
        "losses": losses / world,
        "features": [(o.grad, r.grad) for o, r in zip(ours_in[:2], ref_in[:2], strict=True)],
        "scalars": scalar_grads,
    }


CASES = [("all", True), ("sample", True), ("all", False)]  # (loss.captions, local_loss)


def sigmoid_steps(case, rank, world, accum):
    """Two steps of the trainer's step code, sigmoid objective, K = 3 sources (tests/step_cases.py)."""
    mode, local_loss = case
    return run_steps(mode, rank, world, accum, objective="sigmoid", local_loss=local_loss)


def _worker(rank, port, out_dir):
    join_rank_env(rank, 2, port)
    alip.init_distributed(timeout_s=60)
    results = {case: sigmoid_steps(case, rank, 2, accum=2) for case in CASES}
    results["siglip"] = {local: siglip_on_ranks(rank, 2, local) for local in (True, False)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("sigmoid_ddp"))
    run_ranks(_worker, (out_dir,), nprocs=2)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]


@pytest.mark.parametrize("local_loss", [True, False])
def test_two_ranks_ungated_equal_open_clips_neighbour_exchange(two_ranks, local_loss):
    for rank in two_ranks:
        got = rank["siglip"][local_loss]
        ours, ref = got["losses"]
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)  # the global loss
        for a, r in got["features"]:  # every rank's gradient reaches the local features, both ways
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["scalars"][:2], got["scalars"][2:], rtol=1e-5, atol=1e-7)
    single = alip.AlipLoss(use_caption=False, objective="sigmoid")(
        *features(dtype=torch.float32), None, 7.0, logit_bias=-5.0
    )
    torch.testing.assert_close(two_ranks[0]["siglip"][local_loss]["losses"][0], single["loss"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-local{c[1]}")
def test_gated_sigmoid_on_two_ranks_with_accumulation_equals_one_process(two_ranks, case):
    single = sigmoid_steps(case, 0, 1, accum=1)
    assert single[-1]["grads"]["logit_bias"].abs() > 0 and all(g.abs().sum() > 0 for g in single[-1]["grads"].values())
    assert len({v.item() for v in single[-1]["ema"].values()}) == 7  # every source's EMAs moved their own way
    assert_same_steps(sigmoid_steps(case, 0, 1, accum=2), single)  # exact accumulation
    for rank_steps in two_ranks:
        assert_same_steps(rank_steps[case], single)


# ------------------------------------------------------------------ the trainer, end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny config with the sigmoid objective: 4 steps whole, and 2 + 2 stopped and resumed."""
    tmp = tmp_path_factory.mktemp("sigmoid_runs")
    shards = write_test_shards(tmp / "shards", num_records=24, per_shard=10)

    def args(out, steps):
        opts = [
            f"data.train={shards.meta}",
            f"output_dir={out}",
            f"train.max_steps={steps}",
            "checkpoint.every_steps=2",
        ]
        return [*opts, "log.every_steps=1", *SIGMOID_ARGS]

    whole = train(load_config(TINY, args(tmp / "whole", 4)))
    train(load_config(TINY, args(tmp / "resumed", 2)))
    resumed = train(load_config(TINY, args(tmp / "resumed", 4)), resume="latest")
    return tmp, shards, whole, resumed


def read_lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines()]


def test_a_sigmoid_run_trains_its_bias_and_resumes_bitwise(runs, caplog):
    tmp, _, whole, resumed = runs
    lines = read_lines(tmp / "whole")
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(r["applied"] for r in lines)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["gate/ema_tc"]) for r in lines)
    bias = float(whole.clip.logit_bias)
    assert bias != -10.0 and math.isclose(float(whole.clip.logit_scale), math.log(10), rel_tol=0.05)
    assert read_lines(tmp / "resumed") == lines  # every step's losses and gate stats, bitwise
    assert all(torch.equal(whole.clip.state_dict()[k], v) for k, v in resumed.clip.state_dict().items())
    state = torch.load(tmp / "whole" / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert state["model"]["logit_bias"] == bias and state["config"]["loss"]["objective"] == "sigmoid"


def test_the_log_line_shows_the_bias(runs, tmp_path, caplog):
    _, shards, _, _ = runs
    args = [f"data.train={shards.meta}", f"output_dir={tmp_path}", "train.max_steps=1", "log.every_steps=1"]
    with caplog.at_level("INFO", logger="alip.train"):
        train(load_config(TINY, [*args, "checkpoint.export=false", *SIGMOID_ARGS]))
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1/1")]
    assert len(steps) == 1 and re.search(r" \| scale 10\.0\d bias -10\.0\d \| grad ", steps[0]), steps


def test_a_sigmoid_checkpoint_loads_everywhere_in_its_shape(runs):
    """The export, alip.create_model, alip.eval's and alip score's loaders build the bias from the weights."""
    from alip.score import score_shards

    tmp, shards, whole, _ = runs
    final = tmp / "whole" / "final.safetensors"
    model = alip.create_model("ALIP-Tiny", pretrained=str(final))[0]
    assert float(model.logit_bias) == float(whole.clip.logit_bias)
    checkpoint = tmp / "whole" / "checkpoints" / "step-00000004.pt"
    result = score_shards(checkpoint, shards.meta, device="cpu", progress=False)
    assert len(result.rows) == 24 and all(math.isfinite(r["s_raw_caption"]) for r in result.rows)
    from alip.score.filter import main as filter_main

    args = ["--shards", str(shards.meta), "--checkpoint", str(checkpoint), "--out-dir", str(tmp / "kept")]
    report = filter_main([*args, "--keep-fraction", "0.5", "--workers", "0", "--device", "cpu", "--no-progress"])
    assert report.kept == 12
    # a softmax CLIP continued with the sigmoid objective: the checkpoint has no bias, the init's is kept
    plain = tmp / "plain.safetensors"
    alip.export_model(alip.create_model("ALIP-Tiny")[0], plain)
    continued = alip.create_model("ALIP-Tiny", pretrained=str(plain), init_logit_bias=-10.0)[0]
    assert float(continued.logit_bias) == -10.0


def test_the_sigmoid_recipe_differs_from_ours_in_the_loss_alone():
    from alip.config import to_dict

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    ours = dict(leaves(to_dict(load_config(ROOT / "configs" / "yfcc15m_vitb32_alip.yaml"))))
    sigmoid = dict(leaves(to_dict(load_config(ROOT / "configs" / "yfcc15m_vitb32_alip_sigmoid.yaml"))))
    changed = {k for k in ours if ours[k] != sigmoid[k]}
    assert changed == {"output_dir", "loss.objective", "model.init_logit_scale", "model.init_logit_bias"}
    validate(load_config(ROOT / "configs" / "yfcc15m_vitb32_alip_sigmoid.yaml"), 8)
    for name in ("siglip", "alip_sigmoid_nogates", "alip_sigmoid"):  # the demo's, against its softmax twin
        demo = dict(leaves(to_dict(load_config(ROOT / "configs" / "demo" / f"{name}.yaml"))))
        twin = dict(
            leaves(
                to_dict(
                    load_config(
                        ROOT / "configs" / "demo" / f"{name.replace('_sigmoid', '').replace('siglip', 'clip')}.yaml"
                    )
                )
            )
        )
        changed = {k for k in twin if twin[k] != demo[k]}
        assert changed == {"output_dir", "loss.objective", "model.init_logit_scale", "model.init_logit_bias"}, name


def test_a_non_finite_step_is_skipped_with_the_bias_untouched(runs, tmp_path):
    from alip.train.trainer import Trainer

    _, shards, _, _ = runs
    cfg = load_config(TINY, [f"data.train={shards.meta}", f"output_dir={tmp_path}", *SIGMOID_ARGS])
    trainer = Trainer(cfg, validate(cfg, 1), tmp_path, torch.device("cpu"))
    batch = next(iter(trainer.loader))
    outcome = trainer.train_step({**batch, "image": torch.full_like(batch["image"], float("nan"))})
    assert not outcome.applied and float(trainer.clip.logit_bias) == -10.0
    assert trainer.train_step(batch).applied and float(trainer.clip.logit_bias) != -10.0
