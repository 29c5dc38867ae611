"""`alip-filter` / `python -m alip.filter`: keep the pairs a trained ALIP model's gates trust, as a new shard set.

The input is a scores CSV of `alip-score` (or a checkpoint, and the scoring runs first) and the shards
it scored. A rule picks the records to keep by a signal, higher = more trusted:

    --by weight_sample            the sample weight (default); or weight_raw, weight_caption,
                                  s_raw_caption, s_image_raw, s_image_caption; several, comma
                                  separated, combine by their minimum (a pair must pass each)
    --keep-fraction 0.7           the best 70% of all records by the signal
    --min-weight 0.5              the records whose signal is at least 0.5
    --keep-fraction auto          the records more likely in the upper of two Gaussians fitted to the
                                  signal (the rule of DivideMix and of noisy-label learning): the
                                  fraction kept is the mixture's own estimate of the clean share

The output is a shard set the loaders and every tool read: one output shard per source shard, with
the kept records copied byte for byte (header, label and JPEG: never decoded or re-encoded), their
texts sidecar entries, a meta JSON that records the source shards, the rule, the scores' and the
checkpoint's sha256 and the counts kept and dropped per reason, and `<prefix>.dropped.csv`: every
dropped record's scores row with its reason.

Runs are deterministic (ties in the signal keep shard order) and resumable: each output shard is
written to a temporary name and renamed, then recorded in `<stem>.done.json`; a rerun of the same
command skips the finished shards and writes byte-identical files. Another rule or other scores in
the same folder are refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alip.cli import add_debug_flag, guarded
from alip.data.format import schema
from alip.data.format.recordio import RecordIOReader, read_idx_arrays
from alip.files import FolderLock, claim_folder, refuse_overlap, sha256_file, write_json_atomic
from alip.score.rule import SIGNALS, FilterInputError, Rule, combined_signal, decide

logger = logging.getLogger(__name__)

PLAN_VERSION = 1


# ---------------------------------------------------------------- inputs


@dataclass
class Scores:
    """The scores CSV's columns the filter needs, one entry per record, in the CSV's row order."""

    path: Path
    record_key: np.ndarray  # int64 [N]
    sample_key: Any  # pyarrow StringArray [N], or None without the column
    signals: dict[str, np.ndarray]  # float64 [N] per column of SIGNALS
    sha256: str


def read_scores(path: Path) -> Scores:
    """Read the columns of an `alip-score` CSV the filter needs, columnar (pyarrow.csv: a 15M-row CSV
    would be tens of millions of Python objects through the csv module)."""
    import pyarrow as pa
    from pyarrow import csv as pacsv

    if not path.is_file():
        raise FileNotFoundError(f"scores CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in ("record_key", *SIGNALS) if c not in header]
    if missing:
        raise FilterInputError(f"{path} is not an alip-score CSV: no column(s) {', '.join(missing)}")
    types = {"record_key": pa.int64(), "sample_key": pa.string(), **{name: pa.float64() for name in SIGNALS}}
    columns = [c for c in types if c in header]
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(newlines_in_values=True),  # captions may hold newlines
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=columns),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # "CSV conversion error ... row N" or a ragged row
        raise FilterInputError(f"{path}: {str(e).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise FilterInputError(f"{path} holds no scored records")
    if any(table[c].null_count for c in ("record_key", *SIGNALS)):
        raise FilterInputError(f"{path}: a record_key or score is empty")
    record_key = table["record_key"].to_numpy()
    if len(np.unique(record_key)) != len(record_key):
        raise FilterInputError(f"{path}: a record_key appears more than once; is it two score files joined?")
    sample_key = table["sample_key"].combine_chunks() if "sample_key" in columns else None
    signals = {name: table[name].to_numpy().astype(np.float64) for name in SIGNALS}
    return Scores(path, record_key, sample_key, signals, sha256_file(path))


@dataclass
class Source:
    """The source shards, their record keys in reading order, and the meta JSON they came with."""

    spec: list[str]
    shards: list[schema.ShardInfo]
    keys: list[np.ndarray]  # int64 per shard, file order
    meta: dict[str, Any] | None  # the source meta JSON as read, when the spec is one
    # per shard, the record key of each texts sidecar line in line order (None: no sidecar); filled
    # by `match`, which reads every sidecar once, so the copy pairs lines with keys without parsing
    text_keys: list[np.ndarray | None] = field(default_factory=list)

    @property
    def num_records(self) -> int:
        return sum(len(k) for k in self.keys)


def read_source(spec: list[str]) -> Source:
    from alip.data.loaders.preflight import prepare_shards

    checks = prepare_shards(spec if len(spec) > 1 else spec[0])  # a broken shard fails here, naming it
    by_rec = {str(Path(s.rec)): s for s in schema.resolve_shards(spec)}
    shards = [by_rec[str(c.rec_path)] for c in checks]
    keys = []
    for shard in shards:
        keys.append(read_idx_arrays(shard.idx)[0])
    meta = None
    first = Path(spec[0])
    meta_file = (
        first
        if first.suffix == ".json"
        else (next(iter(sorted(first.glob("*.meta.json"))), None) if first.is_dir() else None)
    )
    if len(spec) == 1 and meta_file is not None:
        meta = json.loads(Path(meta_file).read_text(encoding="utf-8"))
    return Source(spec, shards, keys, meta)


def _sidecar_path(shard: schema.ShardInfo) -> Path | None:
    path = Path(shard.texts) if shard.texts else Path(shard.rec).with_suffix(".texts.jsonl")
    return path if path.is_file() else None


def _sidecar_lines(path: Path) -> list[str]:
    """The sidecar's entries verbatim (so copies are byte-identical), blank lines left out."""
    with open(path, encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def _sidecar_keys(path: Path) -> tuple[np.ndarray, list[str]]:
    """(record key, sample key) of each sidecar entry, in line order."""
    keys, sample_keys = [], []
    for lineno, line in enumerate(_sidecar_lines(path), 1):
        try:
            entry = json.loads(line)
            keys.append(int(entry["key"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise FilterInputError(f"{path}: entry {lineno}: not a texts sidecar entry") from None
        sample_keys.append("" if entry.get("sample_key") is None else str(entry["sample_key"]))
    return np.asarray(keys, dtype=np.int64), sample_keys


def match(scores: Scores, source: Source) -> np.ndarray:
    """For each record of the source, in reading order, its row in the scores CSV.

    The scores must cover exactly the source's records. Record keys are positions (0..N-1) in any
    data2rec output, so two datasets of the same size share them: where both have sample keys (the
    texts sidecars), those must agree too."""
    keys = np.concatenate(source.keys)
    if len(np.unique(keys)) != len(keys):
        raise FilterInputError(f"the shards {source.spec} hold a record key more than once: cannot match scores")
    order = np.argsort(scores.record_key)
    pos = np.searchsorted(scores.record_key, keys, sorter=order).clip(max=len(order) - 1)
    rows = order[pos]
    unscored = scores.record_key[rows] != keys
    extra = len(scores.record_key) - int((~unscored).sum())
    if unscored.any() or extra:
        example = f"e.g. record key {int(keys[unscored][0])} has no score; " if unscored.any() else ""
        raise FilterInputError(
            f"the scores CSV {scores.path} does not match the shards {' '.join(source.spec)}: "
            f"{int(unscored.sum())} of {len(keys)} records have no score and {extra} scored keys are not in the "
            f"shards ({example}was it made from other shards?)"
        )
    _check_sample_keys(scores, source, rows)
    return rows


def _check_sample_keys(scores: Scores, source: Source, rows: np.ndarray) -> None:
    """Each shard's sidecar sample keys against the scores' (where both have one); records the
    sidecars' key order in `source.text_keys` for the copy."""
    start = 0
    source.text_keys = []
    for shard, keys in zip(source.shards, source.keys, strict=True):
        shard_rows = rows[start : start + len(keys)]
        start += len(keys)
        path = _sidecar_path(shard)
        if path is None:
            source.text_keys.append(None)
            continue
        text_keys, text_samples = _sidecar_keys(path)
        source.text_keys.append(text_keys)
        if scores.sample_key is None:
            continue
        said = dict(zip(keys.tolist(), scores.sample_key.take(shard_rows).to_pylist(), strict=True))
        for key, sample in zip(text_keys.tolist(), text_samples, strict=True):
            if said.get(key) and sample != said[key]:
                raise FilterInputError(
                    f"the scores CSV {scores.path} does not match {shard.rec}: record key {key} is sample "
                    f"{sample!r} in the shard but {said[key]!r} in the scores"
                )


# ---------------------------------------------------------------- output


@dataclass
class ShardDone:
    stem: str
    source: str
    records: int
    bytes: int
    sha256: str
    texts: str | None


def _plan_fingerprint(scores: Scores, source: Source, rule: Rule, prefix: str) -> str:
    plan = {
        "version": PLAN_VERSION,
        "scores_sha256": scores.sha256,
        "rule": rule.describe(),
        "prefix": prefix,
        "source": [(s.rec, s.records, s.sha256, len(k)) for s, k in zip(source.shards, source.keys, strict=True)],
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def own_files(prefix: str, num_shards: int) -> set[str]:
    """The names the filter writes for `num_shards` source shards: what --overwrite may remove. The scores
    that --checkpoint wrote stay (a rerun reuses them)."""
    return schema.shard_set_names(prefix, num_shards, (".filter-plan.json", ".dropped.csv"))


def _claim(out: Path, prefix: str, fingerprint: str, overwrite: bool, num_shards: int) -> None:
    """Refuse to mix two filter runs in one folder, as data2rec does, and to write over files the filter did
    not write. --overwrite removes what the earlier run's plan says the filter wrote, and only that."""
    plan_path = out / f"{prefix}.filter-plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else None
    state = "none" if plan is None else "same" if plan.get("fingerprint") == fingerprint else "other"
    # a plan from before num_shards was recorded: its shards are the ones its done stamps name
    earlier = int(plan.get("num_shards", len(list(out.glob(f"{prefix}-*.done.json"))))) if plan else 0
    claim_folder(
        out, prefix, "alip-filter", plan=state, earlier=own_files(prefix, earlier), names=own_files(prefix, num_shards),
        overwrite=overwrite, error=FilterInputError, log=logger,
        keep=frozenset({f"{prefix}.scores.csv", f"{prefix}.scores.summary.json"}),  # --checkpoint's scores: read now
    )  # fmt: skip
    if state != "same" or overwrite:
        write_json_atomic(plan_path, {"fingerprint": fingerprint, "num_shards": num_shards})


def _load_done(path: Path) -> ShardDone | None:
    if not path.exists():
        return None
    done = ShardDone(**json.loads(path.read_text()))
    rec = path.parent / f"{done.stem}.rec"
    return done if rec.exists() and rec.stat().st_size == done.bytes else None


def copy_shard(
    shard: schema.ShardInfo, keep: np.ndarray, text_keys: np.ndarray | None, out: Path, stem: str
) -> ShardDone:
    """Copy the kept records of one shard (`keep`: a mask over its .idx entries) in file order, with
    their texts sidecar lines; to temporary names, renamed when complete."""
    tmp = {ext: out / f"{stem}.{ext}.tmp" for ext in ("rec", "idx", "texts.jsonl")}
    count = _copy_frames(shard, keep, tmp["rec"], tmp["idx"])
    texts = None
    if text_keys is not None:
        path = _sidecar_path(shard)
        lines = _sidecar_lines(path)
        if len(lines) != len(text_keys):  # the sidecar changed since `match` read it
            raise FilterInputError(f"{path} changed while the filter ran; run it again")
        kept_keys = read_idx_arrays(shard.idx)[0][keep]
        tmp["texts.jsonl"].write_text(
            "".join(line for line, k in zip(lines, np.isin(text_keys, kept_keys), strict=True) if k), encoding="utf-8"
        )
        texts = f"{stem}.texts.jsonl"
        os.replace(tmp["texts.jsonl"], out / texts)
    os.replace(tmp["idx"], out / f"{stem}.idx")
    os.replace(tmp["rec"], out / f"{stem}.rec")  # the .rec last: its size is what marks a shard finished
    rec = out / f"{stem}.rec"
    done = ShardDone(stem, shard.rec, count, rec.stat().st_size, sha256_file(rec), texts)
    write_json_atomic(out / f"{stem}.done.json", asdict(done))
    return done


def _copy_frames(shard: schema.ShardInfo, keep: np.ndarray, rec_path: Path, idx_path: Path) -> int:
    """The kept records' RecordIO frames, byte for byte: header, label and JPEG are never decoded or
    re-encoded. Each frame's extent comes from walking its headers (which also checks them); the
    bytes are sliced from a memory map, so the copy costs what the disk does."""
    import mmap

    keys, offsets = read_idx_arrays(shard.idx)
    pos = 0
    with (
        RecordIOReader(shard.rec, shard.idx, read_index=False) as reader,
        open(shard.rec, "rb") as src,
        mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as data,
        open(rec_path, "wb") as rec,
        open(idx_path, "w", encoding="ascii") as idx,
    ):
        for key, offset in zip(keys[keep].tolist(), offsets[keep].tolist(), strict=True):
            _, end = reader.parts(offset, what=f"record key {key}")
            rec.write(data[offset:end])
            idx.write(f"{key}\t{pos}\n")
            pos += end - offset
    return int(keep.sum())


def _write_dropped(path: Path, scores: Scores, reasons_by_row: dict[int, str]) -> None:
    """Every dropped record's scores row, in the CSV's order, with the reason first."""
    tmp = path.with_name(path.name + ".tmp")
    with open(scores.path, newline="", encoding="utf-8") as src, open(tmp, "w", newline="", encoding="utf-8") as dst:
        reader = csv.reader(src)
        writer = csv.writer(dst)
        writer.writerow(["reason", *next(reader)])
        for row_number, row in enumerate(reader):
            reason = reasons_by_row.get(row_number)
            if reason:
                writer.writerow([reason, *row])
    os.replace(tmp, path)


# ---------------------------------------------------------------- the run


@dataclass
class FilterReport:
    meta: Path
    records_in: int
    kept: int
    dropped: dict[str, int]
    dropped_report: Path
    shards_written: int
    shards_reused: int


def _iter_shards(source: Source, kept: np.ndarray) -> Iterator[tuple[int, schema.ShardInfo, np.ndarray]]:
    """(index, shard, its slice of the kept mask) per shard, in reading order."""
    start = 0
    for i, (shard, keys) in enumerate(zip(source.shards, source.keys, strict=True)):
        yield i, shard, kept[start : start + len(keys)]
        start += len(keys)


def filter_shards(
    scores_csv: str | Path,
    shards: str | Path | list[str | Path],
    out_dir: str | Path,
    rule: Rule,
    *,
    prefix: str = "train",
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> FilterReport:
    """Write the records of `shards` that `rule` keeps by the scores in `scores_csv` to `out_dir`.

    See the module docstring. Raises FilterInputError when the scores do not match the shards or the
    rule keeps nothing, FolderLockedError while another run writes into the folder."""
    out = Path(out_dir)
    refuse_overlap(("--out-dir", out), input_paths(_spec(shards), scores_csv, checkpoint, out, prefix))
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "alip-filter"):
        return _filter(Path(scores_csv), _spec(shards), out, rule, prefix, checkpoint, overwrite, progress)


def input_paths(
    spec: list[str], scores_csv: str | Path | None, checkpoint: str | Path | None, out: Path, prefix: str
) -> list[tuple[str, str | Path]]:
    """What the filter reads, with the option that named it: the output folder may be none of them, nor
    hold or lie inside one. The shards as named (a folder, a meta JSON, a glob) and every file of theirs."""
    paths: list[tuple[str, str | Path]] = [("--shards", f) for f in schema.dataset_files(spec)]
    csv = Path(scores_csv) if scores_csv is not None else None
    # <out>/<prefix>.scores.csv is where --checkpoint writes its scores: the filter's own file, which
    # it never deletes or rewrites, so it may be read from there
    if csv is not None and Path(os.path.realpath(csv)) != Path(os.path.realpath(out / f"{prefix}.scores.csv")):
        paths += [("--scores", csv), ("--scores", csv.with_name(f"{csv.stem}.summary.json"))]
    paths += [("--checkpoint", checkpoint)] if checkpoint is not None else []
    return paths


def _spec(shards: str | Path | list[str | Path]) -> list[str]:
    return [str(s) for s in shards] if isinstance(shards, (list, tuple)) else [str(shards)]


def _filter(scores_csv, spec, out, rule, prefix, checkpoint, overwrite, progress) -> FilterReport:
    from tqdm import tqdm

    scores = read_scores(scores_csv)
    source = read_source(spec)
    rows = match(scores, source)  # rows[i]: the scores row of the i-th record in reading order
    signal = combined_signal({k: v[rows] for k, v in scores.signals.items()}, rule.by)
    reasons = decide(signal, rule)
    kept = reasons == ""
    if not kept.any():
        raise FilterInputError(
            f"the rule {rule.describe()} keeps none of the {len(kept)} records (the signal ranges from "
            f"{signal.min():.4f} to {signal.max():.4f}); nothing written"
        )
    _claim(out, prefix, _plan_fingerprint(scores, source, rule, prefix), overwrite, len(source.shards))
    results, reused = [], 0
    with tqdm(total=len(source.shards), unit="shard", desc="alip-filter", disable=not progress) as bar:
        for i, shard, keep in _iter_shards(source, kept):
            stem = schema.shard_stem(prefix, i)
            done = _load_done(out / f"{stem}.done.json")
            reused += done is not None
            results.append(done if done is not None else copy_shard(shard, keep, source.text_keys[i], out, stem))
            bar.update(1)
    dropped_report = out / f"{prefix}.dropped.csv"
    _write_dropped(
        dropped_report, scores, {int(r): str(why) for r, why in zip(rows[~kept], reasons[~kept], strict=True)}
    )
    counts = dict(sorted(Counter(reasons[~kept].tolist()).items()))
    copied = sum(r.records for r in results)
    if copied != int(kept.sum()):  # every record is copied once or dropped with a reason
        raise RuntimeError(f"bookkeeping error: {copied} records copied, {int(kept.sum())} kept")
    meta_path = schema.meta_path(out, prefix)
    write_json_atomic(meta_path, _meta(source, results, scores, rule, checkpoint, counts, len(kept), dropped_report))
    return FilterReport(meta_path, len(kept), int(kept.sum()), counts, dropped_report, len(results) - reused, reused)


def _checkpoint_info(scores: Scores, checkpoint: str | Path | None) -> dict[str, Any]:
    """The checkpoint that made the scores: given, or named in the scores' summary JSON beside the CSV."""
    if checkpoint is None:
        summary = scores.path.with_name(f"{scores.path.stem}.summary.json")
        if summary.is_file():
            checkpoint = json.loads(summary.read_text(encoding="utf-8")).get("checkpoint")
    if checkpoint is None:
        return {"checkpoint": None, "checkpoint_sha256": None}
    path = Path(checkpoint)
    return {"checkpoint": str(path), "checkpoint_sha256": sha256_file(path) if path.is_file() else None}


def _meta(source, results, scores, rule, checkpoint, counts, records_in, dropped_report) -> dict[str, Any]:
    """The output meta JSON: the source meta's fields (tokenizer, layout, text slots) with the new
    shards, and a "filter" block saying where they came from. No timestamp, so reruns are identical."""
    meta = dict(source.meta) if source.meta else schema.DatasetMeta(shards=[], tokenizer={}).to_json()
    kept = [r for r in results if r.records > 0]  # DALI cannot read an empty shard
    meta["shards"] = [
        asdict(schema.ShardInfo(f"{r.stem}.rec", f"{r.stem}.idx", r.records, r.bytes, r.sha256, r.texts)) for r in kept
    ]
    meta["num_records"] = sum(r.records for r in kept)
    meta["source"] = {
        "kind": "filter",
        "filter": {
            "source_shards": [
                {"rec": s.rec, "records": len(k), "sha256": s.sha256}
                for s, k in zip(source.shards, source.keys, strict=True)
            ],
            "source_spec": source.spec,
            "source_meta_source": (source.meta or {}).get("source"),
            "scores": str(scores.path),
            "scores_sha256": scores.sha256,
            **_checkpoint_info(scores, checkpoint),
            "rule": rule.describe(),
            "records_in": records_in,
            "kept": meta["num_records"],
            "dropped": sum(counts.values()),
            "dropped_by_reason": counts,
            "dropped_report": dropped_report.name,
        },
    }
    return meta


# ---------------------------------------------------------------- command line


def _score_first(args: argparse.Namespace, out: Path) -> Path:
    """--checkpoint: score the shards with it (alip-score's code) into <out>/<prefix>.scores.csv; a rerun
    with the same checkpoint reuses that file instead of scoring again."""
    from alip.score.scorer import score_from_args

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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier filtered set with this prefix: only the files it wrote are deleted",
    )
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
    # before scoring writes into the folder: --checkpoint's scores are an output there, not an input
    refuse_overlap(("--out-dir", out), input_paths(_spec(args.shards), args.scores, args.checkpoint, out, args.prefix))
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
