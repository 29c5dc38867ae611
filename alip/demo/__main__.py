"""`make demo` / `python -m alip.demo`: the whole system, end to end, on the embedded dataset.

1. generate the noisy shapes dataset (alip/demo/data.py) under OUT/data;
2. pack it with data2rec (the same code as tools/data2rec.py) into RecordIO shards, OUT/shards;
3. train the same tiny model three ways with the real trainer and the config files in
   configs/demo/ (CLIP on the raw text, ALIP without gates, ALIP), each in its own process
   (`python -m alip.train`), reading the shards through the DALI pipeline;
4. evaluate each final checkpoint with the real evaluators (`python -m alip.eval` zero-shot
   classification and retrieval, on the clean held-out test sets);
5. score every training pair with the ALIP checkpoint (`alip score`) and measure, against the
   hidden noise flags, how well the gate weights find the noisy pairs;
6. write OUT/report: PNG plots, report.md, scores.csv and summary.json, and print the table.

With --detailed-captions the data has a second caption source (detailed, sometimes hallucinated;
alip/demo/data.py) and the shards K = 2 caption slots, `generic` and `detailed`; the trainings then
use both (loss.captions=all, uniform). benchmarks/demo_multi_caption.py compares the ways to use them.

Every stage reuses what an earlier run of the same command left (data, shards, finished
trainings), so an interrupted demo continues where it stopped. On a GPU everything runs there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alip.cli import UserError, add_debug_flag, guarded

if TYPE_CHECKING:
    from alip.demo.data import DemoSpec

logger = logging.getLogger("alip.demo")

RUNS = ("clip", "alip_nogates", "alip")  # the config files configs/demo/<name>.yaml, in this order
# The same three with SigLIP's sigmoid loss (loss.objective=sigmoid): --runs names them, benchmarks/demo_noise.py
# --sigmoid trains all six; `make demo` keeps to the three above (its 10 minutes).
SIGMOID_RUNS = ("siglip", "alip_sigmoid_nogates", "alip_sigmoid")
LABELS = {
    "clip": "CLIP (raw text)",
    "alip_nogates": "ALIP w/o gates",
    "alip": "ALIP",
    "siglip": "SigLIP (raw text)",
    "alip_sigmoid_nogates": "ALIP-sigmoid w/o gates",
    "alip_sigmoid": "ALIP-sigmoid",
}
GATED_RUNS = ("alip", "alip_sigmoid")  # scored against the hidden noise flags with `alip score`
METRICS = {  # summary name -> (eval task, results key)
    "zero-shot top1": ("zeroshot", "top1"),
    "retrieval i2t R@1": ("retrieval", "i2t_R@1"),
    "retrieval t2i R@1": ("retrieval", "t2i_R@1"),
}
# The quick mode of the tests and CI: the same stages on a few hundred pairs and a few steps.
ECHO = re.compile(r"alip\.train: (step \d+/|step \d+ eval|resumed|exported)|Error|Traceback")
QUICK = {"num_train": 256, "num_zeroshot_per_class": 1, "steps": 6, "batch_size": 32, "eval_every": 3}


class StageFailed(RuntimeError):
    """A stage that runs in its own process failed; the message carries the end of its log."""


class DemoOptionError(UserError, ValueError):
    """A command-line value the demo cannot run with."""


def repo_configs() -> Path:
    return Path(__file__).resolve().parents[2] / "configs" / "demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m alip.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m alip.demo --out demo_out --seed 1   (about 6 minutes on 2 CPU cores)",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the shuffle (default 0)")
    p.add_argument("--noise-rate", type=float, default=0.4, help="fraction of noisy raw texts (default 0.4)")
    p.add_argument("--num-train", type=int, default=None, help="training pairs (default 6000)")
    p.add_argument(
        "--detailed-captions",
        action="store_true",
        help="a second caption source, detailed (size and background too) but sometimes hallucinated: "
        "K = 2 shards with caption slots 'generic' and 'detailed' (use another --out than a K = 1 demo's)",
    )
    p.add_argument(
        "--hallucination-rate",
        type=float,
        default=None,
        help="fraction of detailed captions with one wrong attribute (default 0.3; needs --detailed-captions)",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the configs' 300)")
    p.add_argument(
        "--runs",
        nargs="+",
        choices=RUNS + SIGMOID_RUNS,
        default=list(RUNS),
        help=f"which objectives to train (default: {' '.join(RUNS)}; the sigmoid ones: {' '.join(SIGMOID_RUNS)})",
    )
    p.add_argument("--configs", default=None, help="folder with <run>.yaml configs (default: configs/demo)")
    p.add_argument("--workers", type=int, default=2, help="data2rec worker processes (default 2)")
    p.add_argument("--quick", action="store_true", help="a few steps on a few hundred pairs (tests, CI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(p)
    return p


def _short(line: str) -> str:
    """A trainer log line without its prefix; an eval line cut to the metrics the demo compares."""
    text = line.split(": ", 1)[-1].rstrip()
    if " eval: " in text:
        picked = re.findall(r"eval/[\w.]+/(top1|i2t_R@1|t2i_R@1) ([\d.]+)", text)
        text = text.split(" eval: ")[0] + " eval: " + ", ".join(f"{k} {float(v):.1f}" for k, v in picked)
    return text


def _run_training(name: str, config: Path, overrides: list[str], run_dir: Path) -> None:
    """One objective, in its own process: what a user would type, with a log file beside the run."""
    from alip.train.checkpoint import find_latest

    final = run_dir / "final.pt"
    if final.is_file() and (run_dir / "demo_overrides.json").is_file():
        if json.loads((run_dir / "demo_overrides.json").read_text()) == overrides:
            logger.info("%s: already trained (%s), skipping", name, final)
            return
    run_dir.mkdir(parents=True, exist_ok=True)
    # a finished run with other settings must not be resumed: start that run afresh
    if final.is_file() or (run_dir / "demo_overrides.json").is_file():
        for path in (run_dir / "checkpoints").glob("*"):
            path.unlink()
        for path in (final, run_dir / "losses.jsonl", run_dir / "eval.jsonl"):
            path.unlink(missing_ok=True)
    resume = ["--resume", "latest"] if find_latest(run_dir / "checkpoints") else []
    cmd = [sys.executable, "-m", "alip.train", str(config), *overrides, *resume]
    logger.info("training %s: %s", name, " ".join(cmd))
    # The whole log goes to train.log; the trainer's progress lines (step, ETA, losses, eval) and any
    # error are echoed, so a two-minute run is not a silent one.
    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if ECHO.search(line):
                print(f"  [{name}] {_short(line)}", flush=True)
        proc.wait()
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise StageFailed(
            f"training {name} failed (exit {proc.returncode}); end of {run_dir / 'train.log'}:\n" + "\n".join(tail)
        )
    (run_dir / "demo_overrides.json").write_text(json.dumps(overrides))


def _evaluate(run_dir: Path, model: str, data: Any) -> dict[str, float]:
    """The real evaluators on the run's final weights: results JSONs beside the run, their console
    tables and progress bars in eval.log (the demo prints its own comparison at the end)."""
    from alip.eval.__main__ import main as eval_main

    common = ["--model", model, "--checkpoint", str(run_dir / "final.pt"), "--workers", "0", "--log-level", "WARNING"]
    tasks = {
        "zeroshot": ["zeroshot", "--dataset", "shapes", "--data", str(data.zeroshot), "--format", "imagefolder"],
        "retrieval": ["retrieval", "--annotations", str(data.retrieval), "--images", str(data.retrieval.parent)],
    }
    records = {}
    with open(run_dir / "eval.log", "w", encoding="utf-8") as log:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            for task, argv in tasks.items():
                records[task] = eval_main(argv + common + ["--output", str(run_dir / f"eval_{task}.json")])
    return {name: float(records[task]["datasets"][0]["metrics"][key]) for name, (task, key) in METRICS.items()}


def _machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _make_data(out: Path, spec: Any, workers: int, progress: bool) -> tuple[Any, Path]:
    """Generated dataset -> data2rec's engine (the code behind tools/data2rec.py) -> shards."""
    from alip.data.ingest.convert import ConvertOptions, convert
    from alip.data.ingest.sources import CaptionSource, Columns
    from alip.demo.data import write_dataset

    data = write_dataset(out / "data", spec, progress=progress)
    slots: dict[str, Any] = {}
    if spec.detailed_captions:  # K = 2 caption slots; the meta JSON names them (texts: raw, generic, detailed)
        detailed = CaptionSource("detailed", sidecar=data.detailed_captions)
        slots = {"caption_name": "generic", "more_captions": (detailed,)}
    opts = ConvertOptions(
        out_dir=out / "shards",
        columns=Columns(key="key"),
        captions=data.captions,
        shard_records=2000,
        seed=spec.seed,
        workers=workers,
        progress=progress,
        **slots,
    )
    convert([data.manifest], opts)
    return data, out / "shards" / f"{opts.prefix}.meta.json"


def _overrides(meta: Path, data: Any, seed: int, steps: int | None, quick: dict) -> list[str]:
    """What the demo sets on top of each config: its paths, the seed and (optionally) the length."""
    out = [f"data.train={meta}", f"eval.zeroshot={data.zeroshot}", f"eval.retrieval={data.retrieval}"]
    out.append(f"train.seed={seed}")
    if steps:
        out.append(f"train.max_steps={steps}")
    if quick:
        out += [
            f"train.batch_size={quick['batch_size']}",
            f"eval.every_steps={quick['eval_every']}",
            "log.every_steps=1",
            "data.shuffle_buffer=64",
        ]
    return out


def demo_spec(args: argparse.Namespace, quick: dict[str, Any]) -> DemoSpec:
    """The dataset to generate, from the command line (and --quick's sizes)."""
    from alip.demo.data import DemoSpec

    detailed = getattr(args, "detailed_captions", False)
    rate = getattr(args, "hallucination_rate", None)
    if rate is not None and not detailed:
        raise DemoOptionError("--hallucination-rate needs --detailed-captions")
    try:
        return DemoSpec(
            seed=args.seed,
            num_train=args.num_train or quick.get("num_train", DemoSpec.num_train),
            num_zeroshot_per_class=quick.get("num_zeroshot_per_class", DemoSpec.num_zeroshot_per_class),
            noise_rate=args.noise_rate,
            detailed_captions=detailed,
            hallucination_rate=DemoSpec.hallucination_rate if rate is None else rate,
        )
    except ValueError as e:  # DemoSpec checks values that come straight from the command line
        raise DemoOptionError(str(e)) from None


GATE_KEYS = ("auc_weight_sample", "auc_s_raw_caption", "precision_at_noisy")


def _score_gates(
    out: Path, runs: list[str], meta: Path, data: Any, report_dir: Path, timings: dict[str, float], args: Any
) -> tuple[Path | None, dict[str, Any] | None, dict[str, dict[str, float]]]:
    """`alip score` with each gated run's checkpoint against the hidden noise flags: (the ALIP run's scores
    CSV and summary, for the report's plots; every gated run's noise-detector figures, by label)."""
    from alip.score import score_shards
    from alip.train.checkpoint import find_latest

    scores_csv, score_summary, gates_by_run = None, None, {}
    for name in (n for n in GATED_RUNS if n in runs):
        t = time.perf_counter()
        checkpoint = find_latest(out / "runs" / name / "checkpoints")
        result = score_shards(checkpoint, meta, truth=data.truth, progress=not args.no_progress)
        gates_by_run[LABELS[name]] = {k: result.summary.get(k) for k in GATE_KEYS}
        if name == "alip":
            scores_csv, _ = result.write(report_dir / "scores.csv")
            score_summary = result.summary
        timings["score" if name == "alip" else f"score_{name}"] = time.perf_counter() - t
    return scores_csv, score_summary, gates_by_run


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    from alip.config import load_config
    from alip.demo.report import format_table, write_report
    from alip.files import write_json_atomic

    start = time.perf_counter()
    out = Path(args.out)
    configs = Path(args.configs) if args.configs else repo_configs()
    missing = [str(configs / f"{r}.yaml") for r in args.runs if not (configs / f"{r}.yaml").is_file()]
    if missing:
        raise FileNotFoundError(f"demo config(s) not found: {', '.join(missing)}; pass --configs <folder>")
    quick = QUICK if args.quick else {}
    spec = demo_spec(args, quick)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    data, meta = _make_data(out, spec, args.workers, progress=not args.no_progress)
    timings["data"] = time.perf_counter() - t

    steps = args.steps or quick.get("steps")
    overrides = _overrides(meta, data, spec.seed, steps, quick)
    run_dirs, summary = {}, {}
    for name in args.runs:
        run_dir = out / "runs" / name
        t = time.perf_counter()
        _run_training(name, configs / f"{name}.yaml", [f"output_dir={run_dir}", *overrides], run_dir)
        timings[f"train_{name}"] = time.perf_counter() - t
        t = time.perf_counter()
        summary[LABELS[name]] = _evaluate(run_dir, load_config(run_dir / "config.yaml").model.name, data)
        timings[f"eval_{name}"] = time.perf_counter() - t
        run_dirs[LABELS[name]] = run_dir

    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    scores_csv, score_summary, gates_by_run = _score_gates(out, args.runs, meta, data, report_dir, timings, args)
    files = write_report(report_dir, run_dirs, summary, scores_csv, title=f"ALIP demo (seed {spec.seed})")

    timings["total"] = time.perf_counter() - start
    record = {
        "spec": spec.record(),
        "steps": steps,
        "metrics": summary,
        "gates": gates_by_run.get(LABELS["alip"]),  # the ALIP run's, as before the sigmoid runs
        "gates_by_run": gates_by_run,
        "by_noise": None if score_summary is None else score_summary.get("by_noise"),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "machine": _machine(),
        "report": {k: str(v) for k, v in files.items()},
    }
    write_json_atomic(report_dir / "summary.json", record)

    print()
    print(format_table(summary))
    if record["gates"]:
        g = record["gates"]
        print(
            "\ngate weights as a noise detector (ROC-AUC against the hidden flags): "
            f"weight_sample {g['auc_weight_sample']:.3f}, raw-caption similarity {g['auc_s_raw_caption']:.3f}"
        )
    print(f"\nreport: {report_dir}/report.md ({timings['total'] / 60:.1f} min)")
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    # our INFO lines, not open_clip's (it logs model construction on the root logger)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alip").setLevel(logging.INFO)
    return run_demo(args)


@guarded
def cli(argv: list[str] | None = None) -> int:
    """Command-line entry (`alip-demo`, `python -m alip.demo`): a user error is one `error: ...` line
    and exit status 2 (alip.cli); a failed training stage prints the end of its log and exits 1."""
    try:
        main(argv)
    except StageFailed as e:
        print(f"alip-demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
