#!/usr/bin/env python
"""Does ALIP beat CLIP when the raw text is noisy? The demo over several seeds, mean +- std.

For each seed it runs the whole demo (`python -m alip.demo`: generated data with that seed,
data2rec, the three trainings with configs/demo/*.yaml, the real evaluators, `alip score`) and
then reports, over the seeds:

- zero-shot top-1 and retrieval R@1 (image->text, text->image) of CLIP on the raw text, ALIP
  without gates and ALIP, mean +- sample std;
- the same-seed paired differences ALIP - CLIP and ALIP - ALIP w/o gates (the seed-to-seed
  spread is about as large as the gates' effect, so the paired difference is the fair read); with
  --sigmoid also SigLIP, ALIP-sigmoid w/o gates and ALIP-sigmoid, and their differences (PAIRS);
- the ROC-AUC of the gate weight (and of the raw-caption similarity) as a noise detector
  against the hidden noise flags.

Nothing here is tuned to the answer: the demo configs are used as they are.

A rerun with the same arguments reuses each seed's data, shards and finished trainings (the demo's
own reuse) and only re-evaluates, so its timings are not those of a full run.

    python benchmarks/demo_noise.py                      # 3 seeds, about 25 minutes on 2 CPU cores
    python benchmarks/demo_noise.py --sigmoid            # also the three sigmoid objectives (loss.objective)
    python benchmarks/demo_noise.py --seeds 0 1 2 3 4 --noise-rate 0.6 --out benchmarks/out/noise60
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
from pathlib import Path

from alip.demo.__main__ import RUNS, SIGMOID_RUNS, build_parser, run_demo
from alip.demo.data import mentioned_scene
from alip.score import roc_auc


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def attribute_breakdown(seed_dir: Path) -> dict[str, dict[str, float]]:
    """For the "one wrong attribute" noise: the gate's ROC-AUC (clean vs those pairs) by which
    attribute is wrong. The synthetic caption names colour and shape only, so this separates the
    errors the language gate can see from those it cannot."""
    truth = {}
    with open(seed_dir / "data" / "train_truth.jsonl", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)
            truth[t["key"]] = t
    with open(seed_dir / "report" / "scores.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    clean = [float(r["weight_sample"]) for r in rows if not truth[r["sample_key"]]["noisy"]]
    wrong: dict[str, list[float]] = {}
    for r in rows:
        t = truth[r["sample_key"]]
        if t["noise"] == "attribute":
            said = mentioned_scene(r["raw_text"])
            field = next(f for f in ("colour", "shape", "size", "background") if getattr(said, f) != t[f])
            wrong.setdefault(field, []).append(float(r["weight_sample"]))
    return {
        field: {
            "pairs": len(ws),
            "mean_weight": statistics.fmean(ws),
            # noise score = 1 - weight: higher means more likely noisy
            "auc": roc_auc([1 - w for w in clean + ws], [False] * len(clean) + [True] * len(ws)),
        }
        for field, ws in sorted(wrong.items())
    }


# The same-seed differences reported: (run, the run it is compared with).
PAIRS = [
    ("ALIP", "CLIP (raw text)"),
    ("ALIP", "ALIP w/o gates"),
    ("ALIP-sigmoid", "SigLIP (raw text)"),
    ("ALIP-sigmoid", "ALIP-sigmoid w/o gates"),
    ("ALIP-sigmoid", "ALIP"),
    ("SigLIP (raw text)", "CLIP (raw text)"),
]


def aggregate(records: list[dict]) -> dict:
    runs = list(records[0]["metrics"])
    metrics = list(records[0]["metrics"][runs[0]])
    out: dict = {"seeds": [r["spec"]["seed"] for r in records], "runs": {}, "paired": {}, "gates": {}}
    for run in runs:
        out["runs"][run] = {m: mean_std([r["metrics"][run][m] for r in records]) for m in metrics}
    for better, other in PAIRS:
        if better in runs and other in runs:
            out["paired"][f"{better} - {other}"] = {
                m: mean_std([r["metrics"][better][m] - r["metrics"][other][m] for r in records]) for m in metrics
            }
    if all(r["gates"] for r in records):
        for key in ("auc_weight_sample", "auc_s_raw_caption", "precision_at_noisy"):
            out["gates"][key] = mean_std([r["gates"][key] for r in records])
    gated = [label for label in records[0].get("gates_by_run", {}) if label != "ALIP"]
    for label in gated:  # the sigmoid run's gates as a noise detector (ALIP's are "gates" above)
        out.setdefault("gates_by_run", {})[label] = {
            key: mean_std([r["gates_by_run"][label][key] for r in records]) for key in records[0]["gates_by_run"][label]
        }
    if all("attributes" in r for r in records):
        fields = records[0]["attributes"]
        out["wrong_attribute_auc"] = {f: mean_std([r["attributes"][f]["auc"] for r in records]) for f in fields}
    out["seconds_per_seed"] = mean_std([r["seconds"]["total"] for r in records])
    out["machine"] = records[0]["machine"]
    out["spec"] = {k: v for k, v in records[0]["spec"].items() if k != "seed"}
    return out


def markdown(agg: dict) -> str:
    runs = list(agg["runs"])
    metrics = list(agg["runs"][runs[0]])
    lines = ["| objective | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for run in runs:
        lines.append(f"| {run} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in agg["runs"][run].values()) + " |")
    for name, diffs in agg["paired"].items():
        lines.append(f"| *{name}, same seed* | " + " | ".join(f"{m:+.1f} ± {s:.1f}" for m, s in diffs.values()) + " |")
    if agg["gates"]:
        lines.append("")
        lines.append("| noise detector (ROC-AUC vs hidden flags) | mean ± std |")
        lines.append("|---|---|")
        for key, (m, s) in agg["gates"].items():
            lines.append(f"| {key} | {m:.3f} ± {s:.3f} |")
    for label, keys in agg.get("gates_by_run", {}).items():
        lines.append("")
        lines.append(f"| noise detector of {label} (ROC-AUC vs hidden flags) | mean ± std |")
        lines.append("|---|---|")
        for key, (m, s) in keys.items():
            lines.append(f"| {key} | {m:.3f} ± {s:.3f} |")
    if agg.get("wrong_attribute_auc"):
        lines.append("")
        lines.append("| 'one wrong attribute' noise: the wrong attribute | gate weight ROC-AUC, mean ± std |")
        lines.append("|---|---|")
        for field, (m, s) in agg["wrong_attribute_auc"].items():
            lines.append(f"| {field} | {m:.3f} ± {s:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=None, help="override the configs' training steps")
    parser.add_argument("--out", default="benchmarks/out/demo_noise", help="one demo folder per seed under this")
    parser.add_argument(
        "--sigmoid",
        action="store_true",
        help="also SigLIP on the raw text, ALIP-sigmoid w/o gates and ALIP-sigmoid (loss.objective=sigmoid)",
    )

    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args.seeds) < 2:
        parser.error("give at least 2 seeds: the point is the spread")
    records = []
    for seed in args.seeds:
        demo_args = ["--out", f"{args.out}/seed{seed}", "--seed", str(seed), "--noise-rate", str(args.noise_rate)]
        if args.steps:
            demo_args += ["--steps", str(args.steps)]
        if args.sigmoid:
            demo_args += ["--runs", *RUNS, *SIGMOID_RUNS]
        record = run_demo(build_parser().parse_args(demo_args + ["--no-progress"]))
        if record["gates"]:
            record["attributes"] = attribute_breakdown(Path(f"{args.out}/seed{seed}"))
        records.append(record)
    agg = aggregate(records)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo_noise.json").write_text(json.dumps({"aggregate": agg, "seeds": records}, indent=2) + "\n")
    print(f"\n{len(records)} seeds, noise rate {args.noise_rate}, {agg['seconds_per_seed'][0] / 60:.1f} min per seed")
    print(markdown(agg))
    print(f"\nper-seed records: {Path(args.out) / 'demo_noise.json'}")


if __name__ == "__main__":
    sys.exit(main())
