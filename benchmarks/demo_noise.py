#!/usr/bin/env python
"""Does ALIP beat CLIP when the raw text is noisy? The demo over several seeds, mean +- std.

For each seed it runs the whole demo (`python -m alip.demo`: generated data with that seed,
data2rec, the three trainings with configs/demo/*.yaml, the real evaluators, `alip score`) and
then reports, over the seeds:

- zero-shot top-1 and retrieval R@1 (image->text, text->image) of CLIP on the raw text, ALIP
  without gates and ALIP, mean +- sample std;
- the same-seed paired differences ALIP - CLIP and ALIP - ALIP w/o gates (the seed-to-seed
  spread is about as large as the gates' effect, so the paired difference is the fair read);
- the ROC-AUC of the gate weight (and of the raw-caption similarity) as a noise detector
  against the hidden noise flags.

Nothing here is tuned to the answer: the demo configs are used as they are.

    python benchmarks/demo_noise.py                      # 3 seeds, about 25 minutes on 2 CPU cores
    python benchmarks/demo_noise.py --seeds 0 1 2 3 4 --noise-rate 0.6 --out benchmarks/out/noise60
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from alip.demo.__main__ import build_parser, run_demo


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: list[dict]) -> dict:
    runs = list(records[0]["metrics"])
    metrics = list(records[0]["metrics"][runs[0]])
    out: dict = {"seeds": [r["spec"]["seed"] for r in records], "runs": {}, "paired": {}, "gates": {}}
    for run in runs:
        out["runs"][run] = {m: mean_std([r["metrics"][run][m] for r in records]) for m in metrics}
    alip, clip, nogates = "ALIP", "CLIP (raw text)", "ALIP w/o gates"
    for other in (clip, nogates):
        if alip in runs and other in runs:
            out["paired"][f"ALIP - {other}"] = {
                m: mean_std([r["metrics"][alip][m] - r["metrics"][other][m] for r in records]) for m in metrics
            }
    if all(r["gates"] for r in records):
        for key in ("auc_weight_sample", "auc_s_raw_caption", "precision_at_noisy"):
            out["gates"][key] = mean_std([r["gates"][key] for r in records])
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
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=None, help="override the configs' training steps")
    parser.add_argument("--out", default="benchmarks/out/demo_noise", help="one demo folder per seed under this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args.seeds) < 2:
        parser.error("give at least 2 seeds: the point is the spread")
    records = []
    for seed in args.seeds:
        demo_args = ["--out", f"{args.out}/seed{seed}", "--seed", str(seed), "--noise-rate", str(args.noise_rate)]
        if args.steps:
            demo_args += ["--steps", str(args.steps)]
        records.append(run_demo(build_parser().parse_args(demo_args + ["--no-progress"])))
    agg = aggregate(records)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo_noise.json").write_text(json.dumps({"aggregate": agg, "seeds": records}, indent=2) + "\n")
    print(f"\n{len(records)} seeds, noise rate {args.noise_rate}, {agg['seconds_per_seed'][0] / 60:.1f} min per seed")
    print(markdown(agg))
    print(f"\nper-seed records: {Path(args.out) / 'demo_noise.json'}")


if __name__ == "__main__":
    sys.exit(main())
