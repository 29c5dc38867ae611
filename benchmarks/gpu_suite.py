#!/usr/bin/env python
"""Everything we want to know from a GPU, in one call of under 8 minutes on one H100/H200.

Stages (each in its own time budget; a failing stage is reported, the others still run; the
train stage starts no new row after --train-budget seconds and reports the rest as skipped):
  tests       the tests marked `gpu` (bf16/fp16 steps finite, the scaler skipping an injected
              overflow, eval features and the linear probe on CUDA, DALI mixed vs CPU decode)
  train       ViT-B/32 training step: samples/s/GPU, TFLOP/s and MFU for ALIP, CLIP and ALIP with
              the sigmoid objective at 256 and 512 per GPU (bf16), then one change at a time from the ALIP-512 baseline:
              gradient checkpointing on, text trimming batch / buckets, torch.compile on
              (untrimmed, and with buckets: BiPathCLIP.compile then compiles the towers)
  loss        AlipLoss vs ClipLoss, and sigmoid AlipLoss vs SigLipLoss cost (benchmarks/loss_cost.py --amp)
  probe       the linear probe on the GPU vs scikit-learn (benchmarks/eval_linear_probe_speed.py)
  caption     BLIP-base captioning in bf16, random weights (benchmarks/caption_throughput.py)
  dali        training-loader images/s, DALI `mixed` decode vs the torch loader (only if DALI
              imports; else reported as skipped)

The table comes last, and every figure is also written as JSON lines to --out (default
$OUT/gpu_suite.jsonl when $OUT is set, as on the lent GPU machine).

On the lent machine (torch and torchvision there; open_clip and its small dependencies carried as
wheels prepared by benchmarks/gpu_wheels.sh):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
        && PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_suite.py

`--cpu-dry-run` runs every code path at tiny sizes on the CPU (tests/test_gpu_suite.py does, so
the suite cannot rot between GPU sessions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sibling benchmark modules

import open_clip  # noqa: E402, F401  (first: without its wheels the suite stops here, before any stage)
from text_trim import Step, batches, lengths_b, measure  # noqa: E402

from alip.flops import device_peak_tflops, step_flops  # noqa: E402


def train_grid(dry: bool) -> list[dict]:
    """(objective, per-GPU batch, grad checkpointing, compile, text_trim) of each training row."""
    batches_ = (4,) if dry else (256, 512)
    top = batches_[-1]
    rows = [
        dict(objective=o, batch=b, ckpt=False, compile=False, trim="off") for b in batches_ for o in ("alip", "clip")
    ]
    # ALIP with the sigmoid objective (loss.objective=sigmoid) at the same batches
    rows += [dict(objective="alip_sigmoid", batch=b, ckpt=False, compile=False, trim="off") for b in batches_]
    rows += [
        dict(objective="alip", batch=top, ckpt=True, compile=False, trim="off"),
        dict(objective="alip", batch=top, ckpt=False, compile=False, trim="batch"),
        dict(objective="alip", batch=top, ckpt=False, compile=False, trim="buckets"),
        dict(objective="clip", batch=top, ckpt=False, compile=False, trim="buckets"),
        # last, as the slowest to set up: what the time budget skips first
        dict(objective="alip", batch=top, ckpt=False, compile=True, trim="off"),
        dict(objective="alip", batch=top, ckpt=False, compile=True, trim="buckets"),  # towers compiled
    ]
    return rows


def train_stage(args: argparse.Namespace) -> list[dict]:
    """One row per train_grid entry. A row starts only while the stage is within args.train_budget
    seconds (a started row runs to its end); the rest are reported as skipped."""
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    peak = device_peak_tflops(device)
    out = []
    t0 = time.perf_counter()
    for row in train_grid(args.cpu_dry_run):
        elapsed = time.perf_counter() - t0
        if elapsed >= args.train_budget:
            out.append({"stage": "train", **row, "status": f"skipped: train budget of {args.train_budget:.0f} s spent"})
            print(json.dumps(out[-1]), flush=True)
            continue
        step_args = argparse.Namespace(
            model="ALIP-Tiny" if args.cpu_dry_run else "ViT-B-32",
            batch=row["batch"],
            precision="fp32" if args.cpu_dry_run else "bf16",
            grad_checkpointing=row["ckpt"],
            buckets=4,
        )
        objective = "sigmoid" if row["objective"] == "alip_sigmoid" else "softmax"
        step = Step(step_args, row["objective"] != "clip", row["trim"], device, objective=objective)
        if row["compile"]:
            step.net.compile()  # BiPathCLIP.compile: the whole forward untrimmed, else the towers
        warmup, timed = (1, 1) if args.cpu_dry_run else (4 + 6 * row["compile"], 10)
        image_size = 64 if args.cpu_dry_run else 224
        data = batches(lengths_b, step_args, image_size, warmup + timed)  # length distribution (b)
        seconds, _ = measure(step, data, warmup)
        # Model FLOPs per step, averaged over the steps run (their text lengths differ).
        flops = step_flops(step.clip, row["batch"] * len(data), step.net.take_text_calls()) / len(data)
        tflops = flops / seconds / 1e12
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        out.append(
            {
                "stage": "train",
                **row,
                "samples_per_s": round(row["batch"] / seconds, 1),
                "tflops_per_s": round(tflops, 1),
                "mfu": round(tflops / peak, 3) if peak else None,
                "peak_mem_gib": round(mem, 1),
            }
        )
        print(json.dumps(out[-1]), flush=True)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return out


def run_script(stage: str, argv: list[str], timeout: float) -> list[dict]:
    """Run a sibling benchmark and turn its figures into rows.

    Scripts that take `--json FILE` get one; the probe benchmark prints its JSON on stdout; the
    tests stage reports pytest's summary line.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "figures.json"
        if stage in JSON_FLAG_STAGES:
            argv = [*argv, "--json", str(json_path)]
        try:
            res = subprocess.run(
                [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=HERE.parent
            )
        except subprocess.TimeoutExpired:
            return [{"stage": stage, "status": f"timed out after {timeout:.0f} s"}]
        figures = json.loads(json_path.read_text()) if json_path.is_file() else _stdout_json(res.stdout)
    rows = [{"stage": stage, **r} for r in _rows(figures)]
    lines = [line for line in res.stdout.strip().splitlines() if line.strip()]
    if stage == "tests" and lines:
        rows.append({"stage": stage, "pytest": lines[-1]})
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        rows.append({"stage": stage, "status": f"exit {res.returncode}: {' | '.join(tail)}"})
    rows.append({"stage": stage, "seconds": round(time.perf_counter() - t0, 1)})
    return rows


JSON_FLAG_STAGES = ("loss", "caption", "dali")


def _stdout_json(stdout: str) -> object:
    start = stdout.find("{")
    try:
        return json.loads(stdout[start:]) if start >= 0 else None
    except ValueError:
        return None


def _rows(figures: object) -> list[dict]:
    """A benchmark's JSON as table rows: its scalar fields as one row, then each entry of any list
    of objects ("results", "rows") as a row of its own."""
    if not isinstance(figures, dict):
        return []
    scalars = {k: v for k, v in figures.items() if isinstance(v, (int, float, str, bool)) or v is None}
    lists = [v for v in figures.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
    return ([scalars] if scalars else []) + [r for rows in lists for r in rows]


def script_stages(args: argparse.Namespace) -> dict[str, list[str]]:
    """The command line of each sibling-benchmark stage, at GPU or dry-run sizes."""
    dry = args.cpu_dry_run
    dev = "cpu" if dry else "cuda"
    dali = [
        "benchmarks/loader_throughput.py",
        "--records",
        "64" if dry else "2048",
        "--per-shard",
        "32" if dry else "256",
    ]
    dali += (
        ["--batches", "2", "--repeats", "1", "--warmup", "1"]
        if dry
        else ["--batch-size", "256", "--threads", "8", "--workers", "12"]
    )
    return {
        "tests": ["-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"],
        "loss": ["benchmarks/loss_cost.py", "--device", dev]
        + (
            [
                "--global-batches",
                "64",
                "--batch",
                "16",
                "--reps",
                "1",
                "--model",
                "ALIP-Tiny",
                "--model-micro-batch",
                "2",
            ]
            if dry
            else ["--amp"]
        ),
        "probe": ["benchmarks/eval_linear_probe_speed.py", "--device", dev]
        + (["--n", "500", "--n-test", "100", "--dim", "16", "--classes", "5"] if dry else []),
        "caption": ["benchmarks/caption_throughput.py", "--device", dev]
        + (
            ["--model-size", "tiny", "--images", "8", "--batch-size", "4", "--workers", "0", "--warmup", "1"]
            if dry
            else [
                "--model-size",
                "base",
                "--dtype",
                "bf16",
                "--batch-size",
                "128",
                "--images",
                "1024",
                "--workers",
                "8",
            ]
        ),
        "dali": dali,
    }


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def versions() -> str:
    """The software the figures were measured with, for RESULTS.md (the lent machine's is not ours)."""
    import importlib.metadata as md
    import platform

    found = []
    for name in ("torchvision", "transformers", "numpy", "open_clip_torch", "nvidia-dali-cuda130"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} absent")
    return f"Python {platform.python_version()}; " + "; ".join(found)


def print_table(rows: list[dict]) -> None:
    print("\n=== GPU suite ===")
    print(
        f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (dry run)'}; "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}); {versions()}"
    )
    for row in rows:
        stage = row.get("stage")
        rest = ", ".join(f"{k}={v}" for k, v in row.items() if k != "stage")
        print(f"{stage:8s} {rest}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="every code path at tiny sizes on the CPU")
    p.add_argument("--stages", default="tests,train,loss,probe,caption,dali", help="comma-separated subset")
    p.add_argument("--out", type=Path, help="JSON lines of every figure (default: $OUT/gpu_suite.jsonl if $OUT is set)")
    p.add_argument(
        "--train-budget",
        type=float,
        default=None,
        help="seconds for the train stage: rows not started by then are reported as skipped (default 210; dry run 400)",
    )
    args = p.parse_args()
    if args.train_budget is None:
        args.train_budget = 400.0 if args.cpu_dry_run else 210.0
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --cpu-dry-run to exercise the code paths on the CPU", file=sys.stderr)
        return 2
    out = args.out or (Path(os.environ["OUT"]) / "gpu_suite.jsonl" if os.environ.get("OUT") else None)
    budgets = {"tests": 90, "loss": 60, "probe": 60, "caption": 90, "dali": 60}  # seconds; train: --train-budget
    if args.cpu_dry_run:
        budgets = {k: 120 for k in budgets}
    rows: list[dict] = []
    scripts = script_stages(args)
    for stage in args.stages.split(","):
        t0 = time.perf_counter()
        if stage == "train":
            try:
                rows += train_stage(args)
            except Exception as e:  # report and go on: the other stages are worth their minutes
                rows.append({"stage": "train", "status": f"failed: {type(e).__name__}: {e}"})
        elif stage == "dali" and not dali_available():
            rows.append({"stage": "dali", "status": "skipped: nvidia.dali is not installed on this machine"})
        elif stage in scripts:
            rows += run_script(stage, scripts[stage], budgets[stage])
        else:
            p.error(f"unknown stage {stage!r}")
        print(f"[{stage} done in {time.perf_counter() - t0:.0f} s]", flush=True)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
