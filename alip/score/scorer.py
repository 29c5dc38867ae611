"""`score_shards`: the steps of `alip score`, in order, from a checkpoint and shards to a `ScoreResult`.

Everything a user can get wrong (checkpoint, shards, truth file, model name, gate options) is
checked before the model is built, so a mistake costs seconds, not a model pass.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alip.cli import add_debug_flag, guarded
from alip.data.format import schema
from alip.data.format.recordio import ShardCheck
from alip.data.loaders.preflight import prepare_shards
from alip.data.loaders.torch_loader import RecordDataset
from alip.files import refuse_overlap
from alip.gates import PAIR_GATES
from alip.score.ranking import (
    BASE_COLUMNS,
    RANKING,
    TRUTH_COLUMNS,
    ScoreResult,
    default_summary_path,
    join_truth,
    ranked_rows,
    read_truth,
)
from alip.score.signals import (
    EMA_NAMES,
    CheckpointInfo,
    Gated,
    ScoredRecords,
    ScoreInputError,
    Warnings,
    gate_weights_of,
    load_model,
    pick_device,
    read_checkpoint,
    require_finite,
    shard_texts,
    similarities,
)


@dataclass
class _Shards:
    spec: str | list[str]  # as given, for the summary
    checks: list[ShardCheck]  # the non-empty shards, preflighted, in reading order
    infos: list[schema.ShardInfo]  # the same shards' meta (texts sidecar paths)


@dataclass
class _Settings:
    model: str
    power: float
    pair_gate: str


def _resolve_shards(shards: str | Path | Sequence[str | Path]) -> _Shards:
    """Find and preflight the shards; a missing path or a broken shard fails here, naming the file."""
    spec = [str(s) for s in shards] if isinstance(shards, (list, tuple)) else str(shards)
    for one in spec if isinstance(spec, list) else [spec]:
        if not any(ch in one for ch in "*?[") and not Path(one).exists():
            raise FileNotFoundError(f"shards not found: {one}")
    checks = prepare_shards(spec)  # preflight: a broken shard fails here, naming the file and record
    by_rec = {str(Path(info.rec)): info for info in schema.resolve_shards(spec)}
    return _Shards(spec, checks, [by_rec[str(c.rec_path)] for c in checks])


def _resolve_settings(
    ckpt: CheckpointInfo, model: str | None, power: float | None, pair_gate: str | None, warnings: Warnings
) -> _Settings:
    """The model name, power and pair_gate: the caller's, else the checkpoint's, else the defaults."""
    model_name = model or ckpt.model_name
    if model_name is None:
        raise ScoreInputError(
            f"{ckpt.path} is a weights file without a training config, so the architecture is unknown: "
            "pass --model NAME (the open_clip model name, e.g. ViT-B-32 or ALIP-Tiny)"
        )
    if model and ckpt.model_name and model != ckpt.model_name:
        warnings.add(f"--model {model} overrides the checkpoint's model {ckpt.model_name}")
    if ckpt.kind == "weights":
        warnings.add(
            f"{ckpt.path} is a weights file with no EMA state: using the dataset means of the similarities as mu"
        )
    power = float(power if power is not None else ckpt.power if ckpt.power is not None else 2.0)
    pair_gate = pair_gate or ckpt.pair_gate or "official"
    if not power > 0.0:
        raise ScoreInputError(f"power must be > 0, got {power}")
    if pair_gate not in PAIR_GATES:
        raise ScoreInputError(f"pair_gate must be one of {PAIR_GATES}, got {pair_gate!r}")
    return _Settings(model_name, power, pair_gate)


def _summary(
    *,
    records: int,
    shards: _Shards,
    ckpt: CheckpointInfo,
    checkpoint_format: str,
    settings: _Settings,
    gated: Gated,
    with_text: int,
    device: torch.device,
) -> dict[str, Any]:
    """The summary JSON before the truth join, warnings and time (its keys in this order)."""
    w_s = gated.weights[:, 0]
    return {
        "records": records,
        "shards": len(shards.infos),
        "shard_spec": shards.spec,
        "checkpoint": str(ckpt.path),
        "checkpoint_kind": ckpt.kind,
        "checkpoint_format": checkpoint_format,
        "model": settings.model,
        "ema": gated.mu,
        "ema_source": gated.ema_source,
        "dataset_mean": gated.means,
        "power": settings.power,
        "pair_gate": settings.pair_gate,
        "ranking": RANKING,
        "flagged": int((w_s < 1.0).sum()),  # records whose sample weight the LCG lowers
        "flagged_fraction": float((w_s < 1.0).mean()),
        "mean_weight_sample": float(w_s.mean()),
        "records_with_text": with_text,
        "device": str(device),
    }


def score_shards(
    checkpoint: str | Path,
    shards: str | Path | Sequence[str | Path],
    *,
    model: str | None = None,
    truth: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    num_workers: int = 0,
    power: float | None = None,
    pair_gate: str | None = None,
) -> ScoreResult:
    """Score every record of `shards` with `checkpoint`'s model and gates; see the `alip.score` docstring.

    Args:
        checkpoint: an `alip.train` checkpoint (model name, EMA, power and pair_gate come from it) or any
            weights file `alip.load_checkpoint` reads (then `model` is required and mu = dataset means).
        shards: what `alip.data.format.schema.resolve_shards` accepts (meta JSON, folder, .rec glob, .rec, list).
        model: open_clip model name; overrides the training checkpoint's.
        truth: optional ground truth (JSONL or CSV of key, noisy[, noise]) joined on the sample key.
        device: default cuda if available, else cpu.
        num_workers: data loader processes decoding JPEGs (0: in this process).
        power, pair_gate: override the checkpoint's (defaults 2.0 and "official" when it has none).
    """
    started = time.perf_counter()
    if batch_size < 1:
        raise ScoreInputError(f"batch_size must be >= 1, got {batch_size}")
    warnings = Warnings()
    ckpt = read_checkpoint(Path(checkpoint), warnings)
    found = _resolve_shards(shards)
    truth_map = read_truth(truth) if truth is not None else None  # fail on a bad truth file before the model runs
    settings = _resolve_settings(ckpt, model, power, pair_gate, warnings)

    dev = pick_device(device)
    clip, preprocess, fmt = load_model(settings.model, ckpt.path, dev)
    texts = shard_texts(found.infos, warnings)
    records = RecordDataset(found.checks, None, train=False)
    keys, sims = similarities(clip, ScoredRecords(records, preprocess), dev, batch_size, num_workers, progress)
    require_finite(keys, sims)
    gated = gate_weights_of(sims, ckpt.ema, settings.power, settings.pair_gate)

    rows, with_text = ranked_rows(records, keys, sims, gated.weights, texts, warnings)
    summary = _summary(
        records=len(rows),
        shards=found,
        ckpt=ckpt,
        checkpoint_format=fmt,
        settings=settings,
        gated=gated,
        with_text=with_text,
        device=dev,
    )
    columns = list(BASE_COLUMNS)
    if truth_map is not None:
        no_texts = all(b is None for b in texts.bounds)
        summary.update(join_truth(rows, truth_map, truth, no_texts=no_texts, warnings=warnings))
        columns += TRUTH_COLUMNS
    summary["warnings"] = list(warnings)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return ScoreResult(rows, summary, columns)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_summary(result: ScoreResult, show: int = 10) -> str:
    """A short human-readable table of the summary and the top `show` ranked pairs."""
    s = result.summary
    lines = [
        f"records          {s['records']} in {s['shards']} shard(s)",
        f"checkpoint       {s['checkpoint']} ({s['checkpoint_kind']})",
        f"model            {s['model']}",
        "ema (tc/it/ic)   " + " / ".join(_fmt(s["ema"][k]) for k in EMA_NAMES) + f"   [{s['ema_source']}]",
        f"power, pair_gate {_fmt(s['power'])}, {s['pair_gate']}",
        f"flagged (w_s<1)  {s['flagged']} ({100 * s['flagged_fraction']:.1f}%)",
    ]
    if "truth" in s:
        lines += [
            f"truth            {s['truth_matched_records']} matched, {s['truth_keys_not_in_shards']} truth keys "
            f"not in shards, {s['records_without_truth']} records without truth",
        ]
        if "noisy" in s:
            lines += [
                f"noisy            {s['noisy']} of {s['truth_matched_records']}",
                f"AUC w_sample     {_fmt(s['auc_weight_sample'])}",
                f"AUC s_raw_capt.  {_fmt(s['auc_s_raw_caption'])}",
                f"AUC min(w_s,w_t) {_fmt(s['auc_weight_min'])}",
                f"precision@noisy  {_fmt(s['precision_at_noisy'])}",
            ]
            lines += [
                f"  {kind:14s} n={v['count']:<6d} AUC w_sample {_fmt(v['auc_weight_sample'])}"
                for kind, v in s["by_noise"].items()
            ]
    if show > 0 and result.rows:
        lines.append(f"most likely noisy (top {min(show, len(result.rows))}):")
        for r in result.rows[:show]:
            mark = "" if r.get("noisy") is None else (" [noisy]" if r["noisy"] else " [clean]")
            raw = r["raw_text"] if len(r["raw_text"]) <= 40 else r["raw_text"][:37] + "..."
            cap = r["caption"] if len(r["caption"]) <= 40 else r["caption"][:37] + "..."
            lines.append(
                f"  {r['rank']:>5d} key={r['sample_key'] or r['record_key']} w_s={r['weight_sample']:.3f} "
                f"s_tc={r['s_raw_caption']:.3f} raw={raw!r} caption={cap!r}{mark}"
            )
    return "\n".join(lines)


EPILOG = """\
outputs:
  CSV (--out): one row per record, most likely noisy first (ascending s_raw_caption), with columns
    rank, record_key, sample_key, weight_sample, weight_raw, weight_caption, s_raw_caption,
    s_image_raw, s_image_caption, raw_text, caption [, noisy, noise with --truth]
  summary JSON (--summary, default <out stem>.summary.json): counts, model, EMA values and their
    source, power, pair_gate; with --truth the ROC-AUCs of the gate weights as noise detectors
    (auc_weight_sample, auc_s_raw_caption, auc_weight_min, per noise kind) and precision_at_noisy.

examples:
  alip-score --checkpoint runs/yfcc/checkpoints/step-00100000.pt --shards /data/yfcc15m_rec/ --out yfcc_scores.csv
  alip-score --checkpoint final.safetensors --model ALIP-Tiny --shards demo/shards/train.meta.json \\
      --truth demo/data/train_truth.jsonl --out demo_scores.csv
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alip-score",
        description=(
            "Score training pairs with a trained ALIP model's gates and rank them, most likely noisy first. "
            "Computes per record s_raw_caption = cos(raw text, caption) (the Language Consistency Gate's "
            "input), s_image_raw and s_image_caption (the pair gates' inputs) and the gate weights under the "
            "checkpoint's EMA state; optionally measures them against ground-truth noise flags."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="alip.train checkpoint (.pt), or a weights file with --model")
    p.add_argument(
        "--shards", required=True, nargs="+", help="shard meta JSON, folder holding one, .rec glob or .rec file(s)"
    )
    p.add_argument("--model", default=None, help="open_clip model name; required for a weights file")
    p.add_argument("--truth", default=None, help="ground truth JSONL {key, noisy, noise} or CSV key,noisy[,noise]")
    p.add_argument("--out", default="scores.csv", help="ranked CSV (default: scores.csv)")
    p.add_argument("--summary", default=None, help="summary JSON (default: <out stem>.summary.json beside --out)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="JPEG decoding processes (0: in this process)")
    p.add_argument("--power", type=float, default=None, help="override the checkpoint's gate power (default 2)")
    p.add_argument("--pair-gate", choices=["official", "paper"], default=None, help="override the checkpoint's")
    p.add_argument("--show", type=int, default=10, help="print this many top-ranked pairs (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="INFO")
    add_debug_flag(p)
    return p


def score_from_args(args: argparse.Namespace) -> ScoreResult:
    """`score_shards` with the options of this command line; `alip-filter --checkpoint` has the same
    ones but --truth, --power and --pair-gate (then the defaults)."""
    return score_shards(
        args.checkpoint,
        args.shards if len(args.shards) > 1 else args.shards[0],
        model=args.model,
        truth=getattr(args, "truth", None),
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        num_workers=args.workers,
        power=getattr(args, "power", None),
        pair_gate=getattr(args, "pair_gate", None),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line; returns the summary. User errors raise (`cli` turns them into one line)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # before the model pass: the CSV and the summary are written over whatever has their names
    inputs = [("--shards", f) for f in schema.dataset_files(args.shards)] + [("--checkpoint", args.checkpoint)]
    inputs += [("--truth", args.truth)] if args.truth else []
    summary = args.summary if args.summary is not None else default_summary_path(args.out)
    for option, path in (("--out", args.out), ("--summary", summary)):
        refuse_overlap((option, path), inputs)
    result = score_from_args(args)
    csv_path, summary_path = result.write(args.out, args.summary)
    print(format_summary(result, show=args.show))
    print(f"wrote {csv_path} and {summary_path}")
    return result.summary


@guarded
def cli(argv: list[str] | None = None) -> int:
    """Console-script entry point (`alip-score`): a user error is one `error: ...` line and exit status 2."""
    main(argv)
    return 0
