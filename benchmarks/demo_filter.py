#!/usr/bin/env python
"""Does cleaning the data with ALIP's own gates train a better CLIP? The demo over several seeds.

For each seed: the demo (`python -m alip.demo`, its data, shards, CLIP and ALIP runs and `alip score`),
then three more trainings with the demo's own configs, all for the same number of steps (the same
compute, as in DataComp; a smaller set is seen for more epochs):

- CLIP (raw text) on the pairs the ALIP gates keep;
- CLIP (raw text) on the truly clean pairs only (the oracle, from the hidden noise flags);
- ALIP on the pairs the gates keep.

The rule that picks the kept pairs is fixed here, before any run, and not tuned on the test sets:
`alip-filter --by s_raw_caption --keep-fraction auto`, i.e. the pairs more likely in the upper of two
Gaussians fitted to the Language Consistency Gate's input (raw text vs synthetic caption) of the
ALIP checkpoint. The kept fraction is then the mixture's own estimate of the clean share.

Reported, mean +- std over the seeds: zero-shot top-1 and retrieval R@1 of each run, the same-seed
differences (gates-kept minus all, oracle minus all, ALIP kept minus ALIP all), the kept fraction and
how much noise is left in the kept set (from the hidden flags, which only this report reads).

    python benchmarks/demo_filter.py                    # 3 seeds; about 12 min per seed on 2 CPU cores
    python benchmarks/demo_filter.py --seeds 0 1 2 --out benchmarks/out/demo_filter

A rerun reuses each seed's data, shards, trainings and filtered sets (the demo's and alip-filter's
own reuse), so its timings are not those of a full run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from alip.config import load_config
from alip.demo.__main__ import (
    _evaluate,
    _make_data,
    _overrides,
    _run_training,
    build_parser,
    demo_spec,
    repo_configs,
    run_demo,
)
from alip.score import Rule, filter_shards, parse_noisy

RULE = Rule(by=("s_raw_caption",), auto=True)
EXTRA = {  # run name -> (demo config, which filtered set)
    "clip_gates": ("clip", "gates"),
    "clip_oracle": ("clip", "oracle"),
    "alip_gates": ("alip", "gates"),
}
NAMES = {
    "CLIP (raw text)": "CLIP, all pairs",
    "ALIP": "ALIP, all pairs",
    "clip_gates": "CLIP, pairs the gates keep",
    "clip_oracle": "CLIP, truly clean pairs (oracle)",
    "alip_gates": "ALIP, pairs the gates keep",
}
PAIRED = [
    ("clip_gates", "CLIP (raw text)"),
    ("clip_oracle", "CLIP (raw text)"),
    ("alip_gates", "ALIP"),
    ("alip_gates", "clip_gates"),
]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def oracle_scores(scores_csv: Path, out: Path) -> Path:
    """The scores CSV with s_raw_caption replaced by the hidden clean flag (1 clean, 0 noisy), so the
    same filter keeps exactly the clean pairs with --min-weight 0.5."""
    with open(scores_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["s_raw_caption"] = "0" if parse_noisy(row["noisy"], f"{scores_csv}: noisy") else "1"
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def kept_noise(meta: Path, truth: Path) -> dict[str, float]:
    """Share of the kept pairs that are noisy, and share of all noisy pairs removed (hidden flags)."""
    flags = {}
    with open(truth, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)
            flags[t["key"]] = bool(t["noisy"])
    kept = set()
    for shard in json.loads(meta.read_text())["shards"]:
        for line in (meta.parent / shard["texts"]).read_text(encoding="utf-8").splitlines():
            kept.add(json.loads(line)["sample_key"])
    noisy = {k for k, v in flags.items() if v}
    return {
        "kept_fraction": len(kept) / len(flags),
        "noise_in_kept": len(kept & noisy) / len(kept),
        "noise_removed": 1 - len(kept & noisy) / len(noisy),
        "clean_removed": 1 - len(kept - noisy) / (len(flags) - len(noisy)),
    }


def filtered_sets(seed_dir: Path, meta: Path, truth: Path) -> dict[str, Path]:
    scores = seed_dir / "report" / "scores.csv"
    gates = filter_shards(scores, meta, seed_dir / "shards_gates", RULE, progress=False)
    oracle_csv = oracle_scores(scores, seed_dir / "report" / "oracle_scores.csv")
    oracle = filter_shards(
        oracle_csv, meta, seed_dir / "shards_oracle", Rule(by=("s_raw_caption",), min_weight=0.5), progress=False
    )
    return {"gates": gates.meta, "oracle": oracle.meta}


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    seed_dir = Path(args.out) / f"seed{seed}"
    demo_args = ["--out", str(seed_dir), "--seed", str(seed), "--runs", "clip", "alip", "--no-progress"]
    if args.steps:
        demo_args += ["--steps", str(args.steps)]
    t = time.perf_counter()
    demo_ns = build_parser().parse_args(demo_args)
    record = run_demo(demo_ns)
    spec = demo_spec(demo_ns, {})
    data, meta = _make_data(seed_dir, spec, workers=2, progress=False)  # already there: reused
    sets = filtered_sets(seed_dir, meta, data.truth)
    metrics = dict(record["metrics"])
    for name, (config, which) in EXTRA.items():
        run_dir = seed_dir / "runs" / name
        overrides = _overrides(sets[which], data, seed, args.steps, {})
        _run_training(name, repo_configs() / f"{config}.yaml", [f"output_dir={run_dir}", *overrides], run_dir)
        metrics[name] = _evaluate(run_dir, load_config(run_dir / "config.yaml").model.name, data)
    return {
        "seed": seed,
        "metrics": metrics,
        "filtered": {which: kept_noise(m, data.truth) for which, m in sets.items()},
        "gates_auc": record["gates"],
        "seconds": round(time.perf_counter() - t, 1),
        "machine": record["machine"],
    }


def aggregate(records: list[dict]) -> dict:
    runs = list(records[0]["metrics"])
    metrics = list(records[0]["metrics"][runs[0]])
    out: dict = {"seeds": [r["seed"] for r in records], "rule": RULE.describe(), "runs": {}, "paired": {}}
    for run in runs:
        out["runs"][run] = {m: mean_std([r["metrics"][run][m] for r in records]) for m in metrics}
    for a, b in PAIRED:
        out["paired"][f"{NAMES[a]} - {NAMES[b]}"] = {
            m: mean_std([r["metrics"][a][m] - r["metrics"][b][m] for r in records]) for m in metrics
        }
    out["filtered"] = {
        which: {k: mean_std([r["filtered"][which][k] for r in records]) for k in records[0]["filtered"][which]}
        for which in records[0]["filtered"]
    }
    out["seconds_per_seed"] = mean_std([r["seconds"] for r in records])
    out["machine"] = records[0]["machine"]
    return out


def markdown(agg: dict) -> str:
    metrics = list(next(iter(agg["runs"].values())))
    lines = ["| training data | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for run, values in agg["runs"].items():
        lines.append(
            f"| {NAMES.get(run, run)} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in values.values()) + " |"
        )
    for name, diffs in agg["paired"].items():
        lines.append(f"| *{name}, same seed* | " + " | ".join(f"{m:+.1f} ± {s:.1f}" for m, s in diffs.values()) + " |")
    lines += ["", "| kept set | kept fraction | noisy share of kept | noisy pairs removed | clean pairs removed |"]
    lines.append("|---|---|---|---|---|")
    for which, v in agg["filtered"].items():
        cells = " | ".join(f"{100 * v[k][0]:.1f}% ± {100 * v[k][1]:.1f}" for k in v)
        lines.append(f"| {which} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override the configs' training steps")
    parser.add_argument("--out", default="benchmarks/out/demo_filter", help="one demo folder per seed under this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args.seeds) < 2:
        parser.error("give at least 2 seeds: the point is the spread")
    records = [run_seed(seed, args) for seed in args.seeds]
    agg = aggregate(records)
    (Path(args.out) / "demo_filter.json").write_text(json.dumps({"aggregate": agg, "seeds": records}, indent=2) + "\n")
    print(f"\n{len(records)} seeds, rule {RULE.describe()}, {agg['seconds_per_seed'][0] / 60:.1f} min per seed")
    print(markdown(agg))
    print(f"\nper-seed records: {Path(args.out) / 'demo_filter.json'}")


if __name__ == "__main__":
    sys.exit(main())
