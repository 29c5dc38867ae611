"""The release's training recipe (configs/yfcc15m_vitb32_alip_release.yaml) against a reference of the
release's step, and the options it is made of.

The reference is written from the release's semantics (deepglint/ALIP train.py and
src/open_alip/loss.py at c507915), independently of alip.loss, alip.gates and alip.train:
- the gradient: one process on the concatenated global batch, the objective of DESIGN.md section 4
  written naively, the gradient scaled as the release's DDP leaves it (towers: the gradient of the
  loss / world size, because each rank's own features alone carry gradient and DDP averages;
  logit_scale: all of it, because every rank computes the whole loss), then clip_grad_norm_ 1.0;
- the update: torch's AdamW over every parameter in one group (weight decay 0.2, eps at AdamW's
  default 1e-8), torch's OneCycleLR (10% warm-up) stepped per iteration, logit_scale clamped to ln 100.

Our side is `alip.train.train` on the release YAML over 2 gloo ranks, with only the model, data,
batch, precision (fp32 on CPU; the release's fp16 loss scaler is tested apart) and run length
overridden. Each step is compared in two halves, each at float tolerance: the gradient our run
stepped with against the reference's gradient at the same parameters, and our parameters after the
step against the reference's update of that same gradient. Comparing two free-running runs instead
would not be tight: Adam divides each gradient entry by its own magnitude, so entries whose gradient
is rounding noise (the key bias of attention has exactly zero true gradient) take lr-sized steps of
random sign, which hides an eps or a decay difference.
"""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from dist_harness import join_rank_env, run_ranks
from shard_factory import write_test_shards

import alip
from alip.config import load_config, validate
from alip.train.run import train
from alip.train.trainer import Trainer, scaler_state

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "configs" / "yfcc15m_vitb32_alip_release.yaml"
TINY = ROOT / "configs" / "tiny_cpu.yaml"
WORLD = 2
GLOBAL_BATCH = 8  # 4 per rank
TOTAL_STEPS = 20  # the schedule's length: a 2-step warm-up (10%), so the lr moves at every compared step
STEPS = 3  # steps compared; the run stops after them (SIGTERM, the public way to stop a run)
GATE_STATS = ("sim_tc_mean", "sim_it_mean", "sim_ic_mean", "ema_tc", "ema_it", "ema_ic")


def release_overrides(data, out_dir):
    """The tiny model and data; every training-relevant option stays the release YAML's."""
    return [
        f"data.train={data}",
        f"output_dir={out_dir}",
        "model.name=ALIP-Tiny",
        "model.grad_checkpointing=false",
        "data.loader=torch",
        "data.image_size=64",
        "data.num_workers=0",
        f"train.batch_size={GLOBAL_BATCH}",
        "train.precision=fp32",
        f"train.max_steps={TOTAL_STEPS}",
        "checkpoint.every_steps=null",
        "checkpoint.every_minutes=null",
        "checkpoint.export=false",
        "log.tensorboard=false",
    ]


# ----- our side: the trainer on 2 ranks, recording what each step saw and did --------------------------


def _recording_train_step(record):
    """Trainer.train_step that also records the batch, the clipped gradients the optimizer stepped with
    (a pre-step hook of the optimizer) and the parameters after the step; stops the run after STEPS."""
    original = Trainer.train_step

    def train_step(self, batch):
        if not record["steps"]:
            record["initial"] = {k: v.clone() for k, v in self.clip.state_dict().items()}
            names = {id(p): n for n, p in self.clip.named_parameters()}

            def keep_grads(optimizer, args, kwargs):
                grads = {names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]}
                record["steps"][-1]["grads"] = grads

            self.optimizer.register_step_pre_hook(keep_grads)
        group = self.optimizer.param_groups[0]
        step = {"batch": {k: v.clone() for k, v in batch.items()}, "lr": group["lr"], "beta1": group["betas"][0]}
        record["steps"].append(step)
        outcome = original(self, batch)
        step["params"] = {k: v.clone() for k, v in self.clip.state_dict().items()}
        step["applied"] = outcome.applied
        if len(record["steps"]) == STEPS:
            os.kill(os.getpid(), signal.SIGTERM)  # every rank: the run saves and stops at this step's end
        return outcome

    return train_step


def _worker(rank, port, data, out_dir):
    join_rank_env(rank, WORLD, port)
    record = {"steps": []}
    Trainer.train_step = _recording_train_step(record)  # a spawned process: patched here only
    train(load_config(RELEASE, release_overrides(data, Path(out_dir) / "run")))
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def release_run(tmp_path_factory):
    data = write_test_shards(tmp_path_factory.mktemp("release_shards"), num_records=24, per_shard=10).meta
    out_dir = tmp_path_factory.mktemp("release_run")
    run_ranks(_worker, (str(data), str(out_dir)), nprocs=WORLD)
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    losses = [json.loads(line) for line in (out_dir / "run" / "losses.jsonl").read_text().splitlines()]
    return ranks, losses


# ----- the reference: the release's step, naively --------------------------------------------------------


def naive_alip_loss(v, t, c, scale, mu, momentum=0.99, power=2.0):
    """DESIGN.md section 4 over the whole batch, one sample at a time; moves the EMAs `mu` in place."""
    n = v.shape[0]
    with torch.no_grad():
        s = {"tc": (t * c).sum(1), "it": (v * t).sum(1), "ic": (v * c).sum(1)}
        for key, sims in s.items():  # the EMAs move BEFORE the weights are computed
            mu[key] = momentum * mu[key] + (1 - momentum) * sims.mean()
        r = torch.exp(s["tc"] - mu["tc"]) ** power
        w_sample = torch.where(r < 1, r, torch.ones_like(r))
        # "official" pair gate: applied only where the LCG flags the sample (r < 1), unclamped
        w_raw = torch.where(r < 1, torch.exp(s["it"] - mu["it"]) ** power, torch.ones_like(r))
        w_caption = torch.where(r < 1, torch.exp(s["ic"] - mu["ic"]) ** power, torch.ones_like(r))

    def l_i(a, b, i):  # symmetric InfoNCE of sample i against the whole batch
        row_ab = scale * (a[i] @ b.T)
        row_ba = scale * (b[i] @ a.T)
        return (-torch.log_softmax(row_ab, 0)[i] - torch.log_softmax(row_ba, 0)[i]) / 2

    loss_raw = sum(w_sample[i] * w_raw[i] * l_i(v, t, i) for i in range(n)) / n
    loss_caption = sum(w_sample[i] * w_caption[i] * l_i(v, c, i) for i in range(n)) / n
    stats = {f"sim_{k}_mean": float(x.mean()) for k, x in s.items()} | {f"ema_{k}": float(m) for k, m in mu.items()}
    return loss_raw + loss_caption, stats


def release_gradients(run, batches, world=WORLD, tower_scale=None):
    """Per step: the release's clipped gradients, and the gate statistics it logs, at the parameters our
    `run` (one rank's record) had before that step: each step is compared on its own, not after the
    drift of the ones before. `tower_scale` (default 1 / world) exists for a control below."""
    model, _, _ = alip.create_model("ALIP-Tiny")
    named = list(model.named_parameters())
    mu = {"tc": 1.0, "it": 1.0, "ic": 1.0}  # the release's EMAs start at 1
    tower_scale = 1 / world if tower_scale is None else tower_scale
    before = [run["initial"]] + [s["params"] for s in run["steps"][:-1]]
    out = []
    for params, batch in zip(before, batches, strict=True):
        model.load_state_dict(params)
        model.zero_grad()
        v = model.encode_image(batch["image"], normalize=True)
        t = model.encode_text(batch["text"], normalize=True)
        c = model.encode_text(batch["caption"], normalize=True)
        loss, stats = naive_alip_loss(v, t, c, model.logit_scale.exp(), mu)
        loss.backward()
        with torch.no_grad():  # what DDP's averaging leaves of the release's gradient
            for name, p in named:
                if name != "logit_scale":
                    p.grad *= tower_scale
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        out.append({"grads": {n: p.grad.clone() for n, p in named}, "stats": stats})
    return out


def release_updates(run, eps=1e-8, decay_all=True):
    """Per step: the parameters after the release's optimizer step (and the lr and beta1 it used), fed
    with the gradients our `run` stepped with. `eps` and `decay_all` exist for the controls below."""
    params = {n: torch.nn.Parameter(p.clone()) for n, p in run["initial"].items()}
    if decay_all:  # the release: AdamW(model.parameters(), weight_decay=0.2): one group
        groups = [{"params": list(params.values())}]
    else:  # a control: matrices only
        matrix = {n for n, p in params.items() if p.ndim >= 2 and "embedding" not in n}
        groups = [
            {"params": [p for n, p in params.items() if n in matrix]},
            {"params": [p for n, p in params.items() if n not in matrix], "weight_decay": 0.0},
        ]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.2, eps=eps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=TOTAL_STEPS, pct_start=0.1)
    out = []
    for step in run["steps"]:
        lr, beta1 = opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]
        for name, p in params.items():
            p.grad = step["grads"][name].clone()
        opt.step()
        with torch.no_grad():
            params["logit_scale"].clamp_(0, math.log(100))
        sched.step()  # every iteration
        out.append({"params": {n: p.detach().clone() for n, p in params.items()}, "lr": lr, "beta1": beta1})
    return out


def global_batches(ranks):
    """Each step's global batch: rank 0's samples, then rank 1's (the release's gather order)."""
    steps = zip(*(r["steps"] for r in ranks), strict=True)
    keys = ("image", "text", "caption")
    return [{k: torch.cat([s["batch"][k] for s in per_rank]) for k in keys} for per_rank in steps]


def gradient_mismatches(ours, ref):
    """(step, name) where our clipped gradient differs from the release's beyond float error: 1e-4
    relative, and 1e-5 of the tensor's largest entry (summation order differs between 2 ranks x 4 samples
    and 1 process x 8)."""
    bad = []
    for k, (got, want) in enumerate(zip(ours, ref, strict=True)):
        for name, g in want["grads"].items():
            if not torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-12):
                bad.append((k + 1, name))
    return bad


def update_mismatches(ours, ref):
    """(step, name) where our parameters after a step differ from the release's update of the same
    gradients: 1e-6 relative and 1e-10 absolute, far below a decay of 0.2 * lr of any parameter or an
    Adam step moved by eps."""
    bad = []
    for k, (got, want) in enumerate(zip(ours, ref, strict=True)):
        for name, p in want["params"].items():
            if not torch.allclose(got["params"][name], p, rtol=1e-6, atol=1e-10):
                bad.append((k + 1, name))
    return bad


@pytest.fixture(scope="module")
def reference(release_run):
    ranks, _ = release_run
    return release_gradients(ranks[0], global_batches(ranks)), release_updates(ranks[0])


def test_the_release_config_steps_like_the_release(release_run, reference):
    ranks, _ = release_run
    ours, (grads, updates) = ranks[0]["steps"], reference
    assert len(ours) == STEPS and all(s["applied"] for s in ours)
    for name, p in ours[-1]["params"].items():  # DDP kept the replicas identical
        assert torch.equal(p, ranks[1]["steps"][-1]["params"][name]), name
    for got, want in zip(ours, updates, strict=True):  # OneCycleLR per iteration, beta1 cycling
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12) and got["beta1"] == pytest.approx(want["beta1"])
    assert gradient_mismatches(ours, grads) == []  # the loss, the gradient scale, the clip
    assert update_mismatches(ours, updates) == []  # AdamW over every parameter, eps, the schedule
    norms = [float(torch.stack([g.norm() for g in s["grads"].values()]).norm()) for s in ours]
    assert max(norms) == pytest.approx(1.0, rel=1e-5)  # the clip acted: the gradient scale mattered


def test_the_comparison_catches_each_way_of_not_being_the_release(release_run):
    """Controls: the reference with one of our defaults instead of the release's value fails the
    comparison above; otherwise the test would prove nothing about that value."""
    ranks, _ = release_run
    ours = ranks[0]["steps"]
    full_grad = release_gradients(ranks[0], global_batches(ranks), tower_scale=1.0)  # our default's scale
    assert (1, "logit_scale") in gradient_mismatches(ours, full_grad)
    assert (1, "visual.conv1.weight") in gradient_mismatches(ours, full_grad)
    not_decayed = {name for _, name in update_mismatches(ours, release_updates(ranks[0], decay_all=False))}
    assert {"logit_scale", "ln_final.weight", "token_embedding.weight", "positional_embedding"} <= not_decayed
    assert update_mismatches(ours, release_updates(ranks[0], eps=1e-6))


def test_losses_jsonl_has_the_release_log_fields_per_step(release_run, reference):
    _, losses = release_run
    grads, _ = reference
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1))
    for line, want in zip(losses, grads, strict=True):
        for name in GATE_STATS:
            assert line[f"gate/{name}"] == pytest.approx(want["stats"][name], rel=1e-5, abs=1e-6), name
    assert losses[0]["gate/ema_tc"] == pytest.approx(0.99 + 0.01 * losses[0]["gate/sim_tc_mean"], rel=1e-6)


# ----- the options one at a time, on one process ------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_test_shards(tmp_path_factory.mktemp("option_shards"), num_records=24, per_shard=10).meta


@pytest.fixture(scope="module", autouse=True)
def _one_thread_then_restore(one_thread):
    yield
    torch.use_deterministic_algorithms(False)  # the tiny config switches it on process-wide


def tiny(data, out_dir, *extra):
    base = [f"data.train={data}", f"output_dir={out_dir}", "checkpoint.export=false", "log.tensorboard=false"]
    return load_config(TINY, [*base, *extra])


def tiny_trainer(data, out_dir, *extra):
    cfg = tiny(data, out_dir, *extra)
    return Trainer(cfg, validate(cfg, 1), out_dir, torch.device("cpu"))


@pytest.mark.parametrize("step_on_skip", [False, True])
def test_step_on_skip_advances_the_schedule_on_a_skipped_step(data, tmp_path, step_on_skip):
    trainer = tiny_trainer(data, tmp_path, "schedule.name=onecycle", f"schedule.step_on_skip={step_on_skip}")
    batch = next(iter(trainer.loader))
    lr0 = trainer.optimizer.param_groups[0]["lr"]
    outcome = trainer.train_step({**batch, "image": torch.full_like(batch["image"], float("nan"))})
    assert not outcome.applied
    assert trainer.scheduler.last_epoch == (1 if step_on_skip else 0)
    assert (trainer.optimizer.param_groups[0]["lr"] != lr0) == step_on_skip
    assert set(outcome.stats) == {f"gate/{n}" for n in GATE_STATS}  # logged as NaN: no loss this step
    assert all(math.isnan(v) for v in outcome.stats.values())
    assert trainer.train_step(batch).applied and trainer.scheduler.last_epoch == (2 if step_on_skip else 1)


def test_the_loss_scalers_growth_interval_is_an_option_and_applies_on_resume(data, tmp_path):
    fp16 = ["train.precision=fp16"]
    trainer = tiny_trainer(data, tmp_path / "a", *fp16, "train.scaler_growth_interval=2")
    assert trainer.scaler.get_growth_interval() == 2
    batches = iter(trainer.loader)
    scale = trainer.scaler.get_scale()
    for _ in range(2):
        assert trainer.train_step(next(batches)).applied
    assert trainer.scaler.get_scale() == 2 * scale  # doubled after 2 good steps
    assert tiny_trainer(data, tmp_path / "b", *fp16).scaler.get_growth_interval() == 2000  # torch's default

    run = tmp_path / "run"
    train(tiny(data, run, *fp16, "train.max_steps=2"))
    resumed = train(tiny(data, run, *fp16, "train.max_steps=3", "train.scaler_growth_interval=200"), resume="latest")
    assert resumed.scaler.get_growth_interval() == 200  # the config's, not the checkpoint's 2000
    saved = {"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 500}
    assert scaler_state(saved, 200)["_growth_tracker"] == 199  # grows at the next good step, not never
    assert scaler_state(saved, 2000) == saved


def test_tensorboard_gets_the_release_log_fields_at_log_steps(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(load_config(TINY, [f"data.train={data}", f"output_dir={tmp_path}", "train.max_steps=4", "log.every_steps=2",
                             "log.tensorboard=true", "checkpoint.export=false"]))  # fmt: skip
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    lines = [json.loads(x) for x in (tmp_path / "losses.jsonl").read_text().splitlines()]
    for name in GATE_STATS:
        scalars = events.Scalars(f"train/gate/{name}")
        assert [e.step for e in scalars] == [2, 4]
        assert [e.value for e in scalars] == pytest.approx([lines[1][f"gate/{name}"], lines[3][f"gate/{name}"]])
        assert all(math.isfinite(line[f"gate/{name}"]) for line in lines)  # every step in losses.jsonl


def test_the_release_config_names_every_release_value():
    cfg = load_config(RELEASE, ["data.train=x"])
    o = cfg.optim
    assert (o.decay_params, o.eps, o.weight_decay, o.grad_clip, o.lr) == ("all", 1e-8, 0.2, 1.0, 1e-3)
    assert o.betas == (0.9, 0.98) and cfg.schedule.cycle_beta1 == (0.85, 0.95)
    assert (cfg.loss.local_loss, cfg.loss.gather_with_grad) == (False, False)
    assert (cfg.schedule.name, cfg.schedule.warmup, cfg.schedule.step_on_skip) == ("onecycle", 0.1, True)
    assert (cfg.train.precision, cfg.train.scaler_growth_interval, cfg.train.batch_size) == ("fp16", 200, 4096)
    assert (cfg.data.crop_attempts, cfg.data.shuffle_buffer, cfg.data.last_batch) == (100, 16384, "fill")
    ours = load_config(ROOT / "configs" / "yfcc15m_vitb32_alip.yaml", ["data.train=x"])
    assert (ours.optim.decay_params, ours.optim.eps, ours.schedule.step_on_skip) == ("no_embeddings", 1e-6, False)
    assert (ours.loss.local_loss, ours.loss.gather_with_grad, ours.train.scaler_growth_interval) == (True, True, 2000)
    assert (ours.data.shuffle_buffer, ours.data.last_batch) == (4096, "drop")
