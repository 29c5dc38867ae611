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

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alip.data import schema
from alip.data.recordio import RecordIOReader, RecordIOWriter
from alip.files import FolderLock, sha256_file, write_json_atomic
from alip.score.filter_rule import SIGNALS, FilterInputError, Rule, combined_signal, decide

logger = logging.getLogger(__name__)

PLAN_VERSION = 1


# ---------------------------------------------------------------- inputs


@dataclass
class Scores:
    """The scores CSV's columns the filter needs, one entry per record, in the CSV's row order."""

    path: Path
    record_key: np.ndarray  # int64 [N]
    sample_key: list[str]
    signals: dict[str, np.ndarray]  # float64 [N] per column of SIGNALS
    sha256: str


def read_scores(path: Path) -> Scores:
    """Read the columns of an `alip-score` CSV the filter needs; a clear error names the row at fault."""
    if not path.is_file():
        raise FileNotFoundError(f"scores CSV not found: {path}")
    keys, sample_keys, values = [], [], {name: [] for name in SIGNALS}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("record_key", *SIGNALS) if c not in (reader.fieldnames or [])]
        if missing:
            raise FilterInputError(f"{path} is not an alip-score CSV: no column(s) {', '.join(missing)}")
        for row in reader:
            try:
                keys.append(int(row["record_key"]))
                for name in SIGNALS:
                    values[name].append(float(row[name]))
            except (TypeError, ValueError):
                raise FilterInputError(
                    f"{path}: row {reader.line_num}: a record_key or score is not a number"
                ) from None
            sample_keys.append(row.get("sample_key") or "")
    if not keys:
        raise FilterInputError(f"{path} holds no scored records")
    record_key = np.asarray(keys, dtype=np.int64)
    signals = {name: np.asarray(v, dtype=np.float64) for name, v in values.items()}
    if len(np.unique(record_key)) != len(record_key):
        raise FilterInputError(f"{path}: a record_key appears more than once; is it two score files joined?")
    return Scores(path, record_key, sample_keys, signals, sha256_file(path))


@dataclass
class Source:
    """The source shards, their record keys in reading order, and the meta JSON they came with."""

    spec: list[str]
    shards: list[schema.ShardInfo]
    keys: list[np.ndarray]  # int64 per shard, file order
    meta: dict[str, Any] | None  # the source meta JSON as read, when the spec is one

    @property
    def num_records(self) -> int:
        return sum(len(k) for k in self.keys)


def read_source(spec: list[str]) -> Source:
    from alip.data.loader_config import prepare_shards

    checks = prepare_shards(spec if len(spec) > 1 else spec[0])  # a broken shard fails here, naming it
    by_rec = {str(Path(s.rec)): s for s in schema.resolve_shards(spec)}
    shards = [by_rec[str(c.rec_path)] for c in checks]
    keys = []
    for shard in shards:
        with RecordIOReader(shard.rec, shard.idx) as reader:
            keys.append(np.asarray(reader.keys, dtype=np.int64))
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


def _texts_by_key(shard: schema.ShardInfo) -> dict[int, str] | None:
    """The shard's texts sidecar lines by record key (verbatim, so copies are byte-identical)."""
    path = Path(shard.texts) if shard.texts else Path(shard.rec).with_suffix(".texts.jsonl")
    if not path.is_file():
        return None
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out[int(json.loads(line)["key"])] = line
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise FilterInputError(f"{path}:{lineno}: not a texts sidecar entry") from None
    return out


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
    start = 0
    for shard, keys in zip(source.shards, source.keys, strict=True):
        texts = _texts_by_key(shard)
        shard_rows = rows[start : start + len(keys)]
        start += len(keys)
        if texts is None:
            continue
        for key, row in zip(keys.tolist(), shard_rows.tolist(), strict=True):
            line = texts.get(key)
            said = scores.sample_key[row]
            if line is not None and said and str(json.loads(line).get("sample_key")) != said:
                raise FilterInputError(
                    f"the scores CSV {scores.path} does not match {shard.rec}: record key {key} is sample "
                    f"{json.loads(line).get('sample_key')!r} in the shard but {said!r} in the scores"
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


def _claim(out: Path, prefix: str, fingerprint: str, overwrite: bool) -> None:
    """Refuse to mix two filter runs in one folder, as data2rec does; --overwrite clears the old one."""
    plan_path = out / f"{prefix}.filter-plan.json"
    if overwrite:
        for p in out.glob(f"{prefix}[-.]*"):
            if p.name != f"{prefix}.scores.csv" and p.name != f"{prefix}.scores.summary.json":
                p.unlink()
    elif plan_path.exists():
        if json.loads(plan_path.read_text()).get("fingerprint") == fingerprint:
            return
        raise FilterInputError(
            f"{out} already holds a filtered set '{prefix}' made with other scores, shards or rule; "
            "pass --overwrite to replace it, or choose another --out-dir/--prefix"
        )
    elif any(out.glob(f"{prefix}-*")) or (out / f"{prefix}.meta.json").exists():
        raise FilterInputError(f"{out} already holds files '{prefix}-*' not made by alip-filter; pass --overwrite")
    write_json_atomic(plan_path, {"fingerprint": fingerprint})


def _load_done(path: Path) -> ShardDone | None:
    if not path.exists():
        return None
    done = ShardDone(**json.loads(path.read_text()))
    rec = path.parent / f"{done.stem}.rec"
    return done if rec.exists() and rec.stat().st_size == done.bytes else None


def copy_shard(shard: schema.ShardInfo, keep: set[int], out: Path, stem: str) -> ShardDone:
    """Copy the kept records of one shard byte for byte, in file order, with their texts lines."""
    tmp = {ext: out / f"{stem}.{ext}.tmp" for ext in ("rec", "idx", "texts.jsonl")}
    texts = _texts_by_key(shard)
    with RecordIOReader(shard.rec, shard.idx) as reader, RecordIOWriter(tmp["rec"], tmp["idx"]) as writer:
        lines = []
        for key, record in reader:
            if key in keep:
                writer.write(key, record)  # the record as stored: header, label and JPEG untouched
                if texts is not None and key in texts:
                    lines.append(texts[key])
        count = writer.count
    has_texts = texts is not None
    if has_texts:
        tmp["texts.jsonl"].write_text("".join(lines), encoding="utf-8")
        os.replace(tmp["texts.jsonl"], out / f"{stem}.texts.jsonl")
    os.replace(tmp["idx"], out / f"{stem}.idx")
    os.replace(tmp["rec"], out / f"{stem}.rec")  # the .rec last: its size is what marks a shard finished
    rec = out / f"{stem}.rec"
    done = ShardDone(
        stem, shard.rec, count, rec.stat().st_size, sha256_file(rec), f"{stem}.texts.jsonl" if has_texts else None
    )
    write_json_atomic(out / f"{stem}.done.json", asdict(done))
    return done


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


def _iter_shards(source: Source, kept_keys: np.ndarray) -> Iterator[tuple[int, schema.ShardInfo, set[int]]]:
    start = 0
    for i, (shard, keys) in enumerate(zip(source.shards, source.keys, strict=True)):
        mask = kept_keys[start : start + len(keys)]
        start += len(keys)
        yield i, shard, set(keys[mask].tolist())


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
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "alip-filter"):
        return _filter(Path(scores_csv), _spec(shards), out, rule, prefix, checkpoint, overwrite, progress)


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
    _claim(out, prefix, _plan_fingerprint(scores, source, rule, prefix), overwrite)
    results, reused = [], 0
    with tqdm(total=len(source.shards), unit="shard", desc="alip-filter", disable=not progress) as bar:
        for i, shard, keep in _iter_shards(source, kept):
            stem = schema.shard_stem(prefix, i)
            done = _load_done(out / f"{stem}.done.json")
            reused += done is not None
            results.append(done if done is not None else copy_shard(shard, keep, out, stem))
            bar.update(1)
    dropped_report = out / f"{prefix}.dropped.csv"
    _write_dropped(
        dropped_report, scores, {int(r): str(why) for r, why in zip(rows[~kept], reasons[~kept], strict=True)}
    )
    counts = dict(sorted(Counter(reasons[~kept].tolist()).items()))
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
