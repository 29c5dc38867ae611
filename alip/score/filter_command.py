"""The command line of the filter: `alip-filter`, `python -m alip.filter` (see alip.score.filter)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from alip.cli import add_debug_flag, guarded
from alip.files import sha256_file
from alip.score.filter import FilterReport, filter_shards
from alip.score.filter_rule import SIGNALS, FilterInputError, Rule

logger = logging.getLogger("alip.score.filter")


# ---------------------------------------------------------------- command line


def _score_first(args: argparse.Namespace, out: Path) -> Path:
    """--checkpoint: score the shards with it (alip-score's code) into <out>/<prefix>.scores.csv; a rerun
    with the same checkpoint reuses that file instead of scoring again."""
    from alip.score.command import score_from_args

    csv_path = out / f"{args.prefix}.scores.csv"
    summary = csv_path.with_name(f"{csv_path.stem}.summary.json")
    digest = sha256_file(args.checkpoint) if Path(args.checkpoint).is_file() else None
    if digest is None:
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if csv_path.is_file() and summary.is_file():
        if json.loads(summary.read_text(encoding="utf-8")).get("checkpoint_sha256") == digest:
            logger.info("reusing the scores in %s (same checkpoint)", csv_path)
            return csv_path
    out.mkdir(parents=True, exist_ok=True)
    result = score_from_args(args)
    result.summary["checkpoint_sha256"] = digest
    result.write(csv_path)
    return csv_path


def parse_rule(args: argparse.Namespace) -> Rule:
    auto = args.keep_fraction == "auto"
    fraction = None
    if args.keep_fraction is not None and not auto:
        try:
            fraction = float(args.keep_fraction)
        except ValueError:
            raise FilterInputError(
                f"--keep-fraction must be a number in (0, 1] or 'auto', got {args.keep_fraction!r}"
            ) from None
    by = tuple(s.strip() for s in args.by.split(",") if s.strip())
    return Rule(by=by, keep_fraction=fraction, min_weight=args.min_weight, auto=auto)


EPILOG = """\
outputs (in --out-dir):
  <prefix>-NNNNN.rec/.idx/.texts.jsonl  the kept records, copied byte for byte, one shard per source shard
  <prefix>.meta.json                    the new shard set; "source" -> "filter" records the source shards,
                                        the rule, the scores' and checkpoint's sha256, counts per reason
  <prefix>.dropped.csv                  every dropped record's scores row, with its reason first
  <prefix>.scores.csv                   with --checkpoint: the scores the rule read

examples:
  alip-score --checkpoint runs/alip/final.pt --shards /data/yfcc_rec --out yfcc_scores.csv
  alip-filter --scores yfcc_scores.csv --shards /data/yfcc_rec --keep-fraction 0.7 --out-dir /data/yfcc_kept70
  alip-filter --checkpoint runs/alip/final.pt --shards demo_out/shards --keep-fraction auto \\
      --by s_raw_caption --out-dir demo_out/shards_kept
  python -m alip.train configs/demo/clip.yaml data.train=demo_out/shards_kept/train.meta.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alip-filter",
        description=(
            "Keep the training pairs a trained ALIP model's gates trust, as a new shard set the loaders read. "
            "Reads alip-score's CSV (or scores with --checkpoint first) and copies the kept records byte for "
            "byte; every dropped record is listed with its scores and reason."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="alip-score CSV of these shards")
    src.add_argument("--checkpoint", help="score the shards with this checkpoint first (alip-score's options below)")
    p.add_argument(
        "--shards", required=True, nargs="+", help="the scored shards: meta JSON, folder, .rec glob or files"
    )
    p.add_argument("--out-dir", required=True, help="folder for the filtered shard set")
    p.add_argument("--prefix", default="train", help="output shard name prefix (default: train)")
    p.add_argument(
        "--by", default="weight_sample", help=f"signal(s), comma separated, combined by min: {', '.join(SIGNALS)}"
    )
    p.add_argument("--keep-fraction", default=None, help="keep the best F of all records (0 < F <= 1), or 'auto'")
    p.add_argument("--min-weight", type=float, default=None, help="keep records whose signal is >= this")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier filtered set with this prefix")
    p.add_argument("--model", default=None, help="with --checkpoint: open_clip model name for a weights file")
    p.add_argument("--device", default=None, help="with --checkpoint: default cuda if available, else cpu")
    p.add_argument("--batch-size", type=int, default=256, help="with --checkpoint (default 256)")
    p.add_argument("--workers", type=int, default=4, help="with --checkpoint: JPEG decoding processes (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="INFO")
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> FilterReport:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    rule = parse_rule(args)  # a bad rule fails before any scoring
    out = Path(args.out_dir)
    scores = Path(args.scores) if args.scores else _score_first(args, out)
    report = filter_shards(
        scores,
        args.shards,
        out,
        rule,
        prefix=args.prefix,
        checkpoint=args.checkpoint,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    share = 100.0 * report.kept / report.records_in
    why = ", ".join(f"{k} {v}" for k, v in report.dropped.items()) or "none"
    print(f"kept {report.kept} of {report.records_in} records ({share:.1f}%); dropped: {why}")
    print(
        f"wrote {report.meta} ({report.shards_written} shards written, {report.shards_reused} reused) "
        f"and {report.dropped_report}"
    )
    return report


@guarded
def cli(argv: list[str] | None = None) -> int:
    """Console-script entry point (`alip-filter`): a user error is one `error: ...` line and exit status 2."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
