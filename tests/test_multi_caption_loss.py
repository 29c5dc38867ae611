"""The objective over K caption sources (issue 14, part 2): loss.captions = all | sample, gates per source.

- AlipLoss against a naive transcription of the K-source formulas (alip/loss.py, alip/gates.py), both modes;
- K = 1 through the source path is bitwise the one-caption loss (the golden and resume tests of
  test_train.py pin the trainer's K = 1 numbers);
- the sample draw: reproducible, independent of how the global batch is split, by the probabilities;
- one 2-rank gloo spawn: W ranks x B (with accumulation) equal 1 process x W*B, both modes;
- K = 3 shards from data2rec, trained through `python -m alip.train` (one subprocess, mode sample, and the
  entry point in process, mode all), logging every source's gates; stopped and resumed, bitwise; alip score
  reads the shards (it scores the first caption slot).
"""

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import join_rank_env, run_ranks
from shard_factory import PHOTOS, jpeg_bytes, photo
from step_cases import SOURCES, WEIGHTS, assert_same_steps, inputs, run_steps

import alip
from alip.config import Config, ConfigError, load_config, to_dict
from alip.model import CheckpointError
from alip.train.captions import draw_sources, with_drawn_captions
from alip.train.resume import check_resume, config_changes
from alip.train.run import train
from alip.train.step import forward_backward

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread_then_restore(one_thread):
    yield
    torch.use_deterministic_algorithms(False)  # the tiny config switches it on process-wide


# ----------------------------------------------------------------------------- the loss against a naive reference


def normed(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def features(n=12, d=16, k=3, seed=0):
    """Image, raw text [n, d] and k captions [n, k, d] of varying agreement, so every gate varies."""
    gen = torch.Generator().manual_seed(seed)
    v = normed(n, d, gen=gen)
    t = F.normalize(v + 0.5 * normed(n, d, gen=gen), dim=-1)
    t[: n // 3] = normed(n // 3, d, gen=gen)  # unrelated raw texts
    c = F.normalize(
        v[:, None] + (0.3 + 0.3 * torch.arange(k, dtype=torch.float64))[:, None] * normed(n, k, d, gen=gen), dim=-1
    )
    return v, t, c


def l_i(a, b, i, scale):
    """Symmetric cross-entropy of sample i, scalar by scalar."""
    n = a.shape[0]

    def ce(x, y):
        logits = [scale * float(x[i] @ y[j]) for j in range(n)]
        mx = max(logits)
        return -(logits[i] - mx - math.log(sum(math.exp(z - mx) for z in logits)))

    return (ce(a, b) + ce(b, a)) / 2


class NaiveSources:
    """The K-source formulas of alip.gates.source_gate_weights / AlipLoss, sample by sample."""

    def __init__(self, k, probs, pair_gate, m=0.5, p=2.0):
        self.k, self.probs, self.pair_gate, self.m, self.p = k, probs, pair_gate, m, p
        self.mu = {"it": 1.0, "tc": [1.0] * k, "ic": [1.0] * k}

    def _move(self, old, values):
        return self.m * old + (1 - self.m) * sum(values) / len(values) if values else old

    def _pair(self, s, mu, flagged):
        w = math.exp(s - mu) ** self.p
        return (w if flagged else 1.0) if self.pair_gate == "official" else min(w, 1.0)

    def all(self, v, t, c, scale):
        n, k = v.shape[0], self.k
        s_it = [float(v[i] @ t[i]) for i in range(n)]
        s_tc = [[float(t[i] @ c[i, j]) for i in range(n)] for j in range(k)]
        s_ic = [[float(v[i] @ c[i, j]) for i in range(n)] for j in range(k)]
        self.mu["it"] = self._move(self.mu["it"], s_it)
        self.mu["tc"] = [self._move(mu, s) for mu, s in zip(self.mu["tc"], s_tc, strict=True)]
        self.mu["ic"] = [self._move(mu, s) for mu, s in zip(self.mu["ic"], s_ic, strict=True)]
        r = [[math.exp(s_tc[j][i] - self.mu["tc"][j]) ** self.p for i in range(n)] for j in range(k)]
        ws = [[min(x, 1.0) for x in rj] for rj in r]
        wc = [[self._pair(s_ic[j][i], self.mu["ic"][j], r[j][i] < 1) for i in range(n)] for j in range(k)]
        w_sample = [sum(self.probs[j] * ws[j][i] for j in range(k)) for i in range(n)]
        flagged = [any(self.probs[j] > 0 and r[j][i] < 1 for j in range(k)) for i in range(n)]
        wt = [self._pair(s_it[i], self.mu["it"], flagged[i]) for i in range(n)]
        loss_raw = sum(w_sample[i] * wt[i] * l_i(v, t, i, scale) for i in range(n)) / n
        terms = [sum(ws[j][i] * wc[j][i] * l_i(v, c[:, j], i, scale) for i in range(n)) / n for j in range(k)]
        loss_caption = sum(p * term for p, term in zip(self.probs, terms, strict=True))
        return {"loss_raw": loss_raw, "loss_caption": loss_caption, "terms": terms, "ws": w_sample, "wt": wt, "wc": wc}

    def sample(self, v, t, c, source, scale):
        """c [n, d]: each sample's drawn caption, of source `source[i]`."""
        n = v.shape[0]
        s_it = [float(v[i] @ t[i]) for i in range(n)]
        s_tc = [float(t[i] @ c[i]) for i in range(n)]
        s_ic = [float(v[i] @ c[i]) for i in range(n)]
        self.mu["it"] = self._move(self.mu["it"], s_it)
        for j in range(self.k):  # a source no sample drew keeps its means
            self.mu["tc"][j] = self._move(self.mu["tc"][j], [s for s, k in zip(s_tc, source, strict=True) if k == j])
            self.mu["ic"][j] = self._move(self.mu["ic"][j], [s for s, k in zip(s_ic, source, strict=True) if k == j])
        r = [math.exp(s_tc[i] - self.mu["tc"][source[i]]) ** self.p for i in range(n)]
        ws = [min(x, 1.0) for x in r]
        wt = [self._pair(s_it[i], self.mu["it"], r[i] < 1) for i in range(n)]
        wc = [self._pair(s_ic[i], self.mu["ic"][source[i]], r[i] < 1) for i in range(n)]
        loss_raw = sum(ws[i] * wt[i] * l_i(v, t, i, scale) for i in range(n)) / n
        loss_caption = sum(ws[i] * wc[i] * l_i(v, c, i, scale) for i in range(n)) / n
        return {"loss_raw": loss_raw, "loss_caption": loss_caption, "ws": ws, "wt": wt, "wc": wc}


def close(tensor, values):
    torch.testing.assert_close(tensor, torch.tensor(values), rtol=1e-5, atol=1e-6, check_dtype=False)


@pytest.mark.parametrize("pair_gate", ["official", "paper"])
def test_all_matches_the_naive_reference_with_per_source_emas(pair_gate):
    loss_fn = alip.AlipLoss(pair_gate=pair_gate, momentum=0.5, caption_sources=SOURCES, caption_weights=WEIGHTS)
    ref = NaiveSources(3, (0.25, 0.5, 0.25), pair_gate)
    for step in range(3):
        v, t, c = features(seed=step)
        out, want = loss_fn(v, t, c, 10.0 + step), ref.all(v, t, c, 10.0 + step)
        for key in ("loss_raw", "loss_caption"):
            assert out[key].item() == pytest.approx(want[key], rel=1e-5)
        for name, term in zip(SOURCES, want["terms"], strict=True):
            assert out[f"loss_caption/{name}"].item() == pytest.approx(term, rel=1e-5)
        close(out["weight_sample"], want["ws"])
        close(out["weight_raw"], want["wt"])
        for j, name in enumerate(SOURCES):
            close(out[f"{name}/weight_caption"], want["wc"][j])
            assert out[f"{name}/ema_tc"].item() == pytest.approx(ref.mu["tc"][j], rel=1e-6)
            assert out[f"{name}/ema_ic"].item() == pytest.approx(ref.mu["ic"][j], rel=1e-6)
        assert out["ema_it"].item() == pytest.approx(ref.mu["it"], rel=1e-6)
    assert len({round(m, 6) for m in ref.mu["tc"]}) == 3  # the sources really have their own levels
    assert set(loss_fn.stat_names) <= set(out) and set(loss_fn.weight_names) <= set(out)


def test_sample_matches_the_naive_reference_and_an_undrawn_source_keeps_its_emas():
    loss_fn = alip.AlipLoss(momentum=0.5, caption_sources=SOURCES, captions="sample")
    ref = NaiveSources(3, (1 / 3,) * 3, "official")
    for step, source in enumerate([[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0]]):
        v, t, c = features(seed=step)
        drawn = c[torch.arange(12), torch.tensor(source)]
        before_ofa = loss_fn.gates.ema("tc", 2).clone()
        out = loss_fn(v, t, drawn, 12.0, caption_source=torch.tensor(source))
        want = ref.sample(v, t, drawn, source, 12.0)
        for key in ("loss_raw", "loss_caption"):
            assert out[key].item() == pytest.approx(want[key], rel=1e-5)
        close(out["weight_sample"], want["ws"])
        close(out["weight_raw"], want["wt"])
        close(out["weight_caption"], want["wc"])
        for j, name in enumerate(SOURCES):
            assert loss_fn.gates.ema("tc", j).item() == pytest.approx(ref.mu["tc"][j], rel=1e-6)
            assert out[f"{name}/weight_caption"].numel() == source.count(j)
    assert torch.equal(loss_fn.gates.ema("tc", 2), before_ofa)  # nobody drew "ofa" at step 2
    assert math.isnan(out["ofa/sim_tc_mean"].item())  # and its similarity mean says so


def test_k1_through_the_source_path_is_bitwise_the_one_caption_loss():
    v, t, c = (x.float() for x in features(k=1))
    outs = []
    for kwargs, caption in [({}, c[:, 0]), ({"caption_sources": ("blip",)}, c), ({"captions": "sample"}, c)]:
        loss_fn = alip.AlipLoss(momentum=0.5, **kwargs)  # K = 1: "sample" has nothing to draw
        outs.append([loss_fn(v, t, caption, 11.0 + s) for s in range(3)])
        assert sorted(loss_fn.state_dict()) == ["gates.ema_ic", "gates.ema_it", "gates.ema_tc"]
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the tower and the step: captions [B, 1, 77] through forward_backward give the [B, 77] gradient, bitwise
    image, text, caption = inputs()
    grads = []
    for cap, sources in [(caption[:, 0], ("caption",)), (caption[:, :1], ("blip",))]:
        torch.manual_seed(0)
        model, _, _ = alip.create_model("ALIP-Tiny")
        loss_fn = alip.AlipLoss(caption_sources=sources, captions="sample")
        batch = {"image": image, "text": text, "caption": cap}
        forward_backward(alip.BiPathCLIP(model), loss_fn, batch, 2, contextlib.nullcontext, lambda x: x)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.equal(g, grads[1][n]) for n, g in grads[0].items())


def test_draws_are_reproducible_whatever_the_split_and_follow_the_probabilities():
    probs = (0.25, 0.0, 0.75)
    whole = draw_sources(3, 17, 0, 4000, probs)
    assert torch.equal(torch.cat([draw_sources(3, 17, s, 1000, probs) for s in range(0, 4000, 1000)]), whole)
    assert not torch.equal(draw_sources(3, 18, 0, 4000, probs), whole)  # a new draw every step (and epoch)
    assert not torch.equal(draw_sources(4, 17, 0, 4000, probs), whole)
    counts = torch.bincount(whole, minlength=3).tolist()
    assert counts[1] == 0 and abs(counts[0] / 4000 - 0.25) < 0.03
    batch = {"caption": torch.arange(4 * 3 * 2).reshape(4, 3, 2), "image": torch.zeros(4)}
    picked = with_drawn_captions(batch, 3, 17, 8, probs)
    source = draw_sources(3, 17, 8, 4, probs)
    assert torch.equal(picked["caption_source"], source)
    assert picked["caption"].tolist() == [batch["caption"][i, s].tolist() for i, s in enumerate(source.tolist())]


def test_state_dict_holds_every_sources_emas_and_round_trips():
    a = alip.AlipLoss(caption_sources=SOURCES, momentum=0.5)
    a(*features(seed=1), 10.0)
    state = a.state_dict()
    assert sorted(state) == sorted(
        [
            "gates.ema_tc",
            "gates.ema_it",
            "gates.ema_ic",
            "gates.ema_tc_1",
            "gates.ema_ic_1",
            "gates.ema_tc_2",
            "gates.ema_ic_2",
        ]
    )
    assert all(v.dim() == 0 for v in state.values())  # source 0 keeps the release's scalar keys (alip score reads them)
    b = alip.AlipLoss(caption_sources=SOURCES, momentum=0.5)
    b.load_state_dict(state)
    v, t, c = features(seed=2)
    assert torch.equal(a(v, t, c, 10.0)["loss"], b(v, t, c, 10.0)["loss"])


def test_bad_sources_weights_and_shapes_get_clear_errors():
    v, t, c = features()
    with pytest.raises(ValueError, match="caption_weights must be 3 non-negative"):
        alip.AlipLoss(caption_sources=SOURCES, caption_weights=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="caption_weights must be 3"):
        alip.AlipLoss(caption_sources=SOURCES, caption_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="captions must be one of"):
        alip.AlipLoss(captions="both")
    with pytest.raises(ValueError, match=r"caption_features has 2 sources .* this loss has 3"):
        alip.AlipLoss(caption_sources=SOURCES)(v, t, c[:, :2], 10.0)
    with pytest.raises(ValueError, match=r"expected \[B, 3, D\]"):
        alip.AlipLoss(caption_sources=SOURCES)(v, t, c[:, 0], 10.0)
    with pytest.raises(ValueError, match="needs caption_source"):
        alip.AlipLoss(caption_sources=SOURCES, captions="sample")(v, t, c[:, 0], 10.0)
    with pytest.raises(alip.NonFiniteLossInputError, match="caption_features"):
        bad = c.clone()
        bad[0, 2, 0] = math.nan
        alip.AlipLoss(caption_sources=SOURCES)(v, t, bad, 10.0)


def test_caption_options_parse_validate_and_are_refused_on_resume():
    cfg = load_config(TINY, ["data.train=x", "loss.captions=sample", "loss.caption_weights={blip: 1, llm: 2}"])
    assert cfg.loss.caption_weights == {"blip": 1.0, "llm": 2.0}
    for bad in ("{blip: -1}", "{blip: 0}", "[1, 2]", "{blip: .nan}"):
        with pytest.raises(ConfigError, match="loss.caption_weights must be"):
            load_config(TINY, ["data.train=x", f"loss.caption_weights={bad}"])
    saved = to_dict(Config())
    del saved["loss"]["captions"], saved["loss"]["caption_weights"]  # a checkpoint from before the options
    assert config_changes(saved, Config()) == []
    assert config_changes(to_dict(cfg), cfg) == []  # the mapping is one value, not flattened into keys
    with pytest.raises(CheckpointError, match=r'loss.caption_weights \{"blip": 1.0, "llm": 2.0\} -> null'):
        check_resume(
            {"world_size": 1, "config": to_dict(cfg)}, load_config(TINY, ["data.train=x", "loss.captions=sample"]), 1
        )


# ----------------------------------------------------------------------------- world size and accumulation (gloo)


def _worker(rank, port, out_dir):
    join_rank_env(rank, 2, port)
    alip.init_distributed(timeout_s=60)
    results = {mode: run_steps(mode, rank, 2, accum=2) for mode in ("all", "sample")}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("k3_ddp"))
    run_ranks(_worker, (out_dir,), nprocs=2)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]


@pytest.mark.parametrize("mode", ["all", "sample"])
def test_two_ranks_with_accumulation_equal_one_process_on_the_whole_batch(two_ranks, mode):
    single = run_steps(mode, 0, 1, accum=1)
    assert all(g.abs().sum() > 0 for g in single[-1]["grads"].values())
    assert len({v.item() for v in single[-1]["ema"].values()}) == 7  # every source's EMAs moved their own way
    assert_same_steps(run_steps(mode, 0, 1, accum=2), single)  # exact accumulation
    for rank_steps in two_ranks:
        assert_same_steps(rank_steps[mode], single)


# ----------------------------------------------------------------------------- K = 3 shards through the CLI


@pytest.fixture(scope="module")
def k3(tmp_path_factory):
    """24 records with the caption slots blip, llm, ofa, packed by data2rec (its main, in this process)."""
    folder = tmp_path_factory.mktemp("k3_data")
    rows = []
    for i in range(24):
        name = PHOTOS[i % len(PHOTOS)]
        (folder / f"img{i}.jpg").write_bytes(jpeg_bytes(photo(name)[::4, ::4]))
        rows.append(
            {
                "image": f"img{i}.jpg",
                "text": f"web title {i}" if i % 4 else f"{name} for sale",  # a few raw texts name the image
                "blip": f"a photo of a {name}",
                "llm": f"a detailed picture of the {name}, item number {i}",
                "ofa": f"{name} {i % 3}",
            }
        )
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = importlib.util.spec_from_file_location("data2rec_tool", ROOT / "tools" / "data2rec.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cols = [a for s in SOURCES for a in ("--caption-col", f"{s}={s}")]
    args = [str(folder / "m.jsonl"), *cols, "--out-dir", str(folder / "out"), "--shard-records", "10"]
    assert tool.main([*args, "--workers", "1", "--no-progress"]) == 0
    return folder / "out" / "train.meta.json"


def run_args(data, out, mode, *extra):
    opts = [f"data.train={data}", f"output_dir={out}", f"loss.captions={mode}", "loss.momentum=0.5"]
    return [*opts, "checkpoint.every_steps=2", "checkpoint.export=false", "log.every_steps=2", *extra]


MODE_ARGS = {"all": ["loss.caption_weights={blip: 1, llm: 2, ofa: 1}"], "sample": []}


@pytest.fixture(scope="module")
def whole_runs(k3, tmp_path_factory):
    """4 steps per mode: "sample" by `python -m alip.train` in a subprocess, "all" by its entry point in here."""
    from alip.train.__main__ import main as train_main

    out = tmp_path_factory.mktemp("k3_runs")
    cmd = [sys.executable, "-m", "alip.train", str(TINY), *run_args(k3, out / "sample", "sample"), "train.max_steps=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status = train_main([str(TINY), *run_args(k3, out / "all", "all", *MODE_ARGS["all"]), "train.max_steps=4"])
    console, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and status == 0, console
    return out, console


def read_lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines()]


def test_k3_cli_runs_log_every_sources_gates(whole_runs):
    out, console = whole_runs
    assert "gates s " in console and "(blip s " in console and ", ofa s " in console
    for mode in ("all", "sample"):
        lines = read_lines(out / mode)
        assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(r["applied"] for r in lines)
        for name in SOURCES:
            for key in ("sim_tc_mean", "sim_ic_mean", "ema_tc", "ema_ic"):
                assert math.isfinite(lines[-1][f"gate/{name}/{key}"]) or key.startswith("sim"), (mode, name, key)
        assert ("loss_caption/llm" in lines[-1]) == (mode == "all")
        state = torch.load(out / mode / "checkpoints" / "step-00000004.pt", weights_only=True)
        assert state["loss"]["gates.ema_tc_2"] != 1.0 and state["config"]["loss"]["captions"] == mode


@pytest.mark.parametrize("mode", ["all", "sample"])
def test_k3_stopped_and_resumed_is_bitwise_one_run(whole_runs, k3, tmp_path, mode):
    out, _ = whole_runs
    args = run_args(k3, tmp_path / mode, mode, *MODE_ARGS[mode])
    train(load_config(TINY, [*args, "train.max_steps=2"]))
    resumed = train(load_config(TINY, [*args, "train.max_steps=4"]), resume="latest")
    assert read_lines(tmp_path / mode) == read_lines(out / mode)  # every step's losses and gate stats, bitwise
    whole = torch.load(out / mode / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert all(torch.equal(whole["model"][k], v) for k, v in resumed.clip.state_dict().items())
    assert all(torch.equal(whole["loss"][k], v) for k, v in resumed.loss_fn.state_dict().items())
    one_caption = {k: v for k, v in whole["loss"].items() if k.count("_") == 1}  # a K = 1 checkpoint's gates
    with pytest.raises(
        CheckpointError, match=r"not those of this run's 3 caption source\(s\) \['blip', 'llm', 'ofa'\]"
    ):
        resumed._load_gates(one_caption)


def test_alip_score_reads_k3_shards_by_their_first_caption(whole_runs, k3):
    from alip.score import score_shards

    out, _ = whole_runs
    result = score_shards(out / "all" / "checkpoints" / "step-00000004.pt", k3, device="cpu", progress=False)
    assert len(result.rows) == 24
    assert np.isfinite([r["s_raw_caption"] for r in result.rows]).all()
