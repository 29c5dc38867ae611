#!/usr/bin/env python
"""What does a second, detailed but sometimes hallucinating caption source add? The demo over seeds.

The demo's data (`python -m alip.demo --detailed-captions`): besides the generic caption (colour
and shape only) every pair has a *detailed* caption that also names size and background, but in
30% of the pairs (--hallucination-rate) one of its four attributes is wrong. data2rec packs K = 2
shards with caption slots `generic` and `detailed`. Per seed, six trainings with the demo's own
configs (configs/demo/alip.yaml and alip_nogates.yaml), the same steps each, evaluated with the
demo's real evaluators (zero-shot top-1 on colour x shape; retrieval R@1, which needs size and
background, which only the raw text and the detailed caption teach):

- generic:  ALIP with the generic caption only (loss.caption_weights={generic: 1, detailed: 0});
- all:      both sources, each its own contrastive term (loss.captions=all), uniform weights;
- sample:   both sources, one drawn per sample and step (loss.captions=sample), uniform;
- and the same three without gates (loss.use_gates=false).

Reported over the seeds, mean +- sample std: each run's metrics; the same-seed paired differences
all - generic, sample - generic and gates - no gates for each; and whether the image-caption gate
(DCG) spots the hallucinated detailed captions: with the gated "all" checkpoint, every training
pair's image-detailed-caption similarity s_ic and the DCG weight exp(s_ic - mu_ic)^power (mu_ic the
checkpoint's EMA of the detailed slot, `ema_ic_1`), and their ROC-AUC against the hidden
hallucination flags, overall and by which attribute is wrong. Nothing is tuned to the answer.

    python benchmarks/demo_multi_caption.py                 # 3 seeds x 6 trainings of 300 steps
    python benchmarks/demo_multi_caption.py --seeds 0 1 2 --runs generic all --out benchmarks/out/mc

Runtime: each training is a demo run (114-123 s on 2 CPU cores for the demo configs, "all" a little
more: it encodes both captions) plus its evaluations, so about 15-20 min per seed on 2 idle cores, about
an hour for 3 seeds (an estimate from the demo's measured runs, not a full-size measurement).

A rerun with the same arguments reuses each seed's data, shards and finished trainings (the demo's
own reuse) and only re-evaluates, so its timings are not those of a full run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alip.config import load_config
from alip.demo.__main__ import (
    QUICK,
    _evaluate,
    _machine,
    _make_data,
    _overrides,
    _run_training,
    build_parser,
    demo_spec,
    repo_configs,
)
from alip.demo.data import ATTRIBUTES
from alip.score import roc_auc

logger = logging.getLogger("benchmarks.demo_multi_caption")

GENERIC_ONLY = "loss.caption_weights={generic: 1, detailed: 0}"
RUNS = {  # run name -> (demo config, overrides on top of the demo's)
    "generic": ("alip", [GENERIC_ONLY]),
    "all": ("alip", ["loss.captions=all"]),
    "sample": ("alip", ["loss.captions=sample"]),
    "generic_nogates": ("alip_nogates", [GENERIC_ONLY]),
    "all_nogates": ("alip_nogates", ["loss.captions=all"]),
    "sample_nogates": ("alip_nogates", ["loss.captions=sample"]),
}
PAIRED = [
    ("all", "generic"),
    ("sample", "generic"),
    ("generic", "generic_nogates"),
    ("all", "all_nogates"),
    ("sample", "sample_nogates"),
]
SLOTS = ("generic", "detailed")  # the caption slots of the K = 2 demo shards, in label order
DETAILED = SLOTS.index("detailed")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---------------------------------------------------------------- the DCG as a hallucination detector


def _gates_from_checkpoint(state: dict) -> Any:
    """The checkpoint's ConsistencyGates (K = 2), its EMA buffers loaded from the loss state."""
    from alip.gates import ConsistencyGates

    loss_cfg = state["config"]["loss"]
    gates = ConsistencyGates(
        momentum=loss_cfg["momentum"], power=loss_cfg["power"], pair_gate=loss_cfg["pair_gate"], num_sources=2
    )
    # AlipLoss.state_dict() holds them as "gates.ema_tc", ...; match the suffix whatever the prefix
    buffers = {k.rsplit(".", 1)[-1]: v for k, v in state["loss"].items() if ".ema_" in f".{k}"}
    gates.load_state_dict(buffers)
    return gates


def _read_records(meta: Path) -> tuple[list[str], list[bytes], np.ndarray, np.ndarray]:
    """(sample keys, JPEG bytes, raw tokens [N, 77], caption tokens [N, K, 77]) of every record, in
    shard order: exactly what training read."""
    from alip.data.format import schema
    from alip.data.format.recordio import RecordIOReader

    keys, jpegs, raws, caps = [], [], [], []
    for info, slots in schema.resolve_dataset(meta):
        if slots is None or slots.names[1:] != SLOTS:
            raise ValueError(f"{meta}: expected the caption slots {SLOTS} of `alip.demo --detailed-captions`")
        sample_key = {}
        for line in Path(info.texts).read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            sample_key[int(entry["key"])] = str(entry["sample_key"])
        with RecordIOReader(info.rec, info.idx) as reader:
            for _, record in reader:
                key, raw, cap, jpeg = schema.parse_record(record, slots)
                keys.append(sample_key[key])
                jpegs.append(jpeg)
                raws.append(raw)
                caps.append(cap)
    return keys, jpegs, np.stack(raws), np.stack(caps)


@torch.inference_mode()
def _similarities(model: Any, preprocess: Any, jpegs: list[bytes], raws: np.ndarray, caps: np.ndarray) -> dict:
    """s_it [N], s_tc [K, N] and s_ic [K, N] (cosine similarities) of the eval-mode model."""
    import io

    from PIL import Image

    out: dict[str, list] = {"s_it": [], "s_tc": [], "s_ic": []}
    for lo in range(0, len(jpegs), 256):
        image = torch.stack([preprocess(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs[lo : lo + 256]])
        v = model.encode_image(image, normalize=True).float()  # [B, D]
        t = model.encode_text(torch.from_numpy(raws[lo : lo + 256]).long(), normalize=True).float()
        c = caps[lo : lo + 256]  # [B, K, 77]
        ck = [model.encode_text(torch.from_numpy(c[:, k]).long(), normalize=True).float() for k in range(c.shape[1])]
        out["s_it"].append((v * t).sum(-1))
        out["s_tc"].append(torch.stack([(t * x).sum(-1) for x in ck]))
        out["s_ic"].append(torch.stack([(v * x).sum(-1) for x in ck]))
    return {"s_it": torch.cat(out["s_it"]), "s_tc": torch.cat(out["s_tc"], 1), "s_ic": torch.cat(out["s_ic"], 1)}


def _aucs(scores: dict[str, np.ndarray], truth: list[dict]) -> dict[str, Any]:
    """ROC-AUC of each "more likely hallucinated" score, overall and faithful vs one wrong attribute."""
    flags = np.array([t["detailed_hallucinated"] for t in truth])
    wrong = np.array([t["detailed_wrong"] or "" for t in truth])
    out: dict[str, Any] = {name: roc_auc(s, flags) for name, s in scores.items()}
    out["by_attribute"] = {}
    for attr in ATTRIBUTES:
        pick = ~flags | (wrong == attr)
        if (wrong == attr).any() and (~flags).any():
            out["by_attribute"][attr] = {name: roc_auc(s[pick], flags[pick]) for name, s in scores.items()}
            out["by_attribute"][attr]["pairs"] = int((wrong == attr).sum())
    return out


def hallucination_auc(checkpoint: Path, meta: Path, truth_path: Path) -> dict[str, Any]:
    """How well the detailed source's gate signals find its hallucinated captions, from a gated K = 2
    checkpoint: every training pair scored with frozen EMAs (no update), as `alip score` does."""
    import alip
    from alip.loss import caption_probabilities
    from alip.train.checkpoint import load_state

    state = load_state(checkpoint)
    gates = _gates_from_checkpoint(state)
    model, _, preprocess = alip.create_model(state["config"]["model"]["name"])
    alip.load_checkpoint(model, checkpoint)
    model.eval()
    keys, jpegs, raws, caps = _read_records(meta)
    s = _similarities(model, preprocess, jpegs, raws, caps)
    mu_ic = gates.ema("ic", DETAILED)
    s_ic = s["s_ic"][DETAILED]
    dcg = torch.exp(s_ic - mu_ic) ** gates.power  # the DCG formula, before the pair gate's rule
    # the weights training applies ("official" pair gate: 1 where the source's LCG finds the sample consistent)
    given = state["config"]["loss"].get("caption_weights")  # by slot name; None: uniform
    probs = caption_probabilities(None if given is None else [given[n] for n in SLOTS], len(SLOTS))
    applied = gates.all_sources(list(s["s_tc"]), s["s_it"], list(s["s_ic"]), probs, update=False)
    by_key = {}
    with open(truth_path, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)
            by_key[t["key"]] = t
    truth = [by_key[k] for k in keys]
    scores = {  # higher: more likely hallucinated
        "auc_s_ic": -s_ic.double().numpy(),
        "auc_dcg_weight": -dcg.double().numpy(),
        "auc_dcg_weight_applied": -applied.caption_k[DETAILED].double().numpy(),
        "auc_lcg_weight": -applied.sample_k[DETAILED].double().numpy(),
    }
    flags = np.array([t["detailed_hallucinated"] for t in truth])
    dcg_np = dcg.double().numpy()
    return {
        **_aucs(scores, truth),
        "mu_ic_detailed": float(mu_ic),
        "pairs": len(truth),
        "hallucinated": int(flags.sum()),
        "mean_dcg_weight": {"faithful": float(dcg_np[~flags].mean()), "hallucinated": float(dcg_np[flags].mean())},
    }


# ---------------------------------------------------------------- one seed, many seeds


def run_seed(
    seed: int,
    out: Path,
    runs: list[str],
    steps: int | None = None,
    quick: bool = False,
    hallucination_rate: float = 0.3,
    noise_rate: float = 0.4,
) -> dict[str, Any]:
    """Data (K = 2 shards) for `seed` under `out`, the `runs`, their evaluations, and the DCG's AUC
    from the gated "all" run when it is among them."""
    from alip.train.checkpoint import find_latest

    start = time.perf_counter()
    # quick: the demo's sizes, without evaluations during training (the final weights are evaluated below)
    q = {**QUICK, "eval_every": 10**6} if quick else {}
    demo_args = ["--out", str(out), "--seed", str(seed), "--noise-rate", str(noise_rate), "--detailed-captions"]
    spec = demo_spec(build_parser().parse_args([*demo_args, "--hallucination-rate", str(hallucination_rate)]), q)
    data, meta = _make_data(out, spec, workers=2, progress=False)
    overrides = _overrides(meta, data, seed, steps or q.get("steps"), q)
    metrics, seconds = {}, {}
    for name in runs:
        config, extra = RUNS[name]
        run_dir = out / "runs" / name
        t = time.perf_counter()
        _run_training(name, repo_configs() / f"{config}.yaml", [f"output_dir={run_dir}", *overrides, *extra], run_dir)
        metrics[name] = _evaluate(run_dir, load_config(run_dir / "config.yaml").model.name, data)
        seconds[name] = round(time.perf_counter() - t, 1)
    detector = None
    if "all" in runs:
        detector = hallucination_auc(find_latest(out / "runs" / "all" / "checkpoints"), meta, data.truth)
    seconds["total"] = round(time.perf_counter() - start, 1)
    return {
        "seed": seed,
        "spec": spec.record(),
        "metrics": metrics,
        "hallucination": detector,
        "seconds": seconds,
        "machine": _machine(),
    }


def aggregate(records: list[dict]) -> dict[str, Any]:
    runs = list(records[0]["metrics"])
    metrics = list(records[0]["metrics"][runs[0]])
    out: dict[str, Any] = {"seeds": [r["seed"] for r in records], "runs": {}, "paired": {}, "hallucination": {}}
    for run in runs:
        out["runs"][run] = {m: mean_std([r["metrics"][run][m] for r in records]) for m in metrics}
    for a, b in PAIRED:
        if a in runs and b in runs:
            out["paired"][f"{a} - {b}"] = {
                m: mean_std([r["metrics"][a][m] - r["metrics"][b][m] for r in records]) for m in metrics
            }
    if all(r["hallucination"] for r in records):
        first = records[0]["hallucination"]
        keys = [k for k in first if k.startswith("auc_")] + ["mu_ic_detailed"]
        out["hallucination"] = {k: mean_std([r["hallucination"][k] for r in records]) for k in keys}
        out["hallucination_by_attribute"] = {
            attr: {k: mean_std([r["hallucination"]["by_attribute"][attr][k] for r in records]) for k in values}
            for attr, values in first["by_attribute"].items()
        }
    out["seconds_per_seed"] = mean_std([r["seconds"]["total"] for r in records])
    out["machine"] = records[0]["machine"]
    out["spec"] = {k: v for k, v in records[0]["spec"].items() if k != "seed"}
    return out


def markdown(agg: dict[str, Any]) -> str:
    metrics = list(next(iter(agg["runs"].values())))
    lines = ["| objective | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for run, values in agg["runs"].items():
        lines.append(f"| {run} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in values.values()) + " |")
    for name, diffs in agg["paired"].items():
        lines.append(f"| *{name}, same seed* | " + " | ".join(f"{m:+.1f} ± {s:.1f}" for m, s in diffs.values()) + " |")
    if agg["hallucination"]:
        lines += ["", "| hallucinated detailed captions: detector | ROC-AUC, mean ± std |", "|---|---|"]
        lines += [f"| {k} | {m:.3f} ± {s:.3f} |" for k, (m, s) in agg["hallucination"].items()]
        lines += ["", "| wrong attribute | pairs | AUC of s_ic | AUC of the DCG weight |", "|---|---|---|---|"]
        for attr, v in agg["hallucination_by_attribute"].items():
            lines.append(
                f"| {attr} | {v['pairs'][0]:.0f} | {v['auc_s_ic'][0]:.3f} ± {v['auc_s_ic'][1]:.3f} "
                f"| {v['auc_dcg_weight'][0]:.3f} ± {v['auc_dcg_weight'][1]:.3f} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which trainings (default all)")
    p.add_argument("--steps", type=int, default=None, help="override the configs' training steps")
    p.add_argument("--hallucination-rate", type=float, default=0.3, help="share of wrong detailed captions")
    p.add_argument("--noise-rate", type=float, default=0.4, help="share of noisy raw texts (the demo's)")
    p.add_argument("--quick", action="store_true", help="the demo's --quick sizes: a few steps on 256 pairs")
    p.add_argument("--out", default="benchmarks/out/demo_multi_caption", help="one folder per seed under this")
    args = p.parse_args(argv)
    if len(args.seeds) < 2 and not args.quick:
        p.error("give at least 2 seeds: the point is the spread")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    records = [
        run_seed(seed, out / f"seed{seed}", args.runs, args.steps, args.quick, args.hallucination_rate, args.noise_rate)
        for seed in args.seeds
    ]
    agg = aggregate(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_multi_caption.json").write_text(json.dumps({"aggregate": agg, "seeds": records}, indent=2) + "\n")
    print(f"\n{len(records)} seeds, {agg['seconds_per_seed'][0] / 60:.1f} min per seed")
    print(markdown(agg))
    print(f"\nper-seed records: {out / 'demo_multi_caption.json'}")


if __name__ == "__main__":
    sys.exit(main())
