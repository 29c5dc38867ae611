"""The command line of `alip score` (`alip-score`, `python -m alip.score`): options, printed summary, exit status.

Named `command`, not `cli`, so that `alip.score.cli` stays the console-script function.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from alip.cli import add_debug_flag, guarded
from alip.score.core import score_shards
from alip.score.ranking import ScoreResult
from alip.score.signals import EMA_NAMES


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
