"""The ranked rows of `alip score` (one per record, most likely noisy first) and writing them.

The CSV's columns and the ranking rule are public constants: `alip.demo.report` and the tests read
the CSV by these names.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from alip.columns import CHUNK
from alip.data.loaders.torch_loader import RecordDataset
from alip.score.signals import ScoreInputError, ShardTexts, Warnings

WEIGHTS = ("weight_sample", "weight_raw", "weight_caption")
SIMILARITIES = ("s_raw_caption", "s_image_raw", "s_image_caption")
BASE_COLUMNS = (
    "rank",
    "record_key",
    "sample_key",
    *WEIGHTS,
    *SIMILARITIES,
    "raw_text",
    "caption",
)
RANKING = "ascending s_raw_caption (most likely noisy first; ties keep shard order)"


class RankedRows(Sequence):
    """The ranked records in columns, most likely noisy first: the model pass's NumPy arrays as they
    are, the ranking as an order over them, the strings in the texts sidecars' `StringColumn`s (16 bytes
    a record beside those, where the dicts per record of the code before cost about 1,000). Indexing,
    slicing and iterating give one dict per row, made on demand; `chunks` gives the CSV's rows a chunk at
    a time."""

    def __init__(
        self,
        order: np.ndarray,
        record_key: np.ndarray,
        weights: np.ndarray,
        sims: np.ndarray,
        text_rows: np.ndarray,
        texts: ShardTexts,
    ) -> None:
        self.order = order  # [N] int64: the record at each rank (the arrays below are in record order)
        self.record_key = record_key  # [N] int64
        self.weights = weights  # [N, 3]: weight_sample, weight_raw, weight_caption
        self.sims = sims  # [N, 3]: s_raw_caption, s_image_raw, s_image_caption
        self.text_rows = text_rows  # [N] int64: the row of `texts` (its blank row without an entry)
        self.texts = texts
        self.noisy: np.ndarray | None = None  # [N] int8 by rank with --truth: 1 noisy, 0 clean, -1 no truth entry
        self.noise: np.ndarray | None = None  # [N] int32 by rank with --truth: index in noise_kinds, -1 for None
        self.noise_kinds: list[str] = []

    def __len__(self) -> int:
        return len(self.order)

    def sample_keys(self, positions: np.ndarray) -> list[str]:
        """The sample keys of the rows at `positions` (ranks - 1)."""
        return self.texts.sample_key.take(self.text_rows[self.order[positions]])

    def ranked(self, name: str, positions: np.ndarray) -> np.ndarray:
        """A weight or similarity column (`WEIGHTS`, `SIMILARITIES`) at `positions`, in float64."""
        values, j = (self.weights, WEIGHTS.index(name)) if name in WEIGHTS else (self.sims, SIMILARITIES.index(name))
        return values[self.order[positions], j].astype(np.float64)

    def _columns(self, positions: np.ndarray) -> dict[str, list[Any]]:
        records = self.order[positions]
        rows = self.text_rows[records]
        weights, sims = self.weights[records], self.sims[records]  # tolist: the values as float() gives them
        out: dict[str, list[Any]] = {
            "rank": (positions + 1).tolist(),
            "record_key": self.record_key[records].tolist(),
            "sample_key": self.texts.sample_key.take(rows),
            **{name: weights[:, j].tolist() for j, name in enumerate(WEIGHTS)},
            **{name: sims[:, j].tolist() for j, name in enumerate(SIMILARITIES)},
            "raw_text": self.texts.raw_text.take(rows),
            "caption": self.texts.caption.take(rows),
        }
        if self.noisy is not None and self.noise is not None:
            noisy, noise = self.noisy[positions].tolist(), self.noise[positions].tolist()
            out["noisy"] = [None if v < 0 else bool(v) for v in noisy]
            out["noise"] = [None if v < 0 else self.noise_kinds[v] for v in noise]
        return out

    def chunks(self, columns: Sequence[str]) -> Iterator[list[tuple[Any, ...]]]:
        """The rows' values in `columns`' order, CHUNK rows at a time (a column the rows lack is blank)."""
        for first in range(0, len(self), CHUNK):
            got = self._columns(np.arange(first, min(first + CHUNK, len(self)), dtype=np.int64))
            blank = [""] * len(got["rank"])
            yield list(zip(*(got.get(name, blank) for name in columns), strict=True))

    def _dicts(self, positions: np.ndarray) -> list[dict[str, Any]]:
        got = self._columns(positions)
        names = list(got)
        return [dict(zip(names, values, strict=True)) for values in zip(*got.values(), strict=True)]

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(i, slice):
            return self._dicts(np.arange(len(self), dtype=np.int64)[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self._dicts(np.array([i % n], np.int64))[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for first in range(0, len(self), CHUNK):
            yield from self._dicts(np.arange(first, min(first + CHUNK, len(self)), dtype=np.int64))


@dataclass
class ScoreResult:
    """Ranked rows (the CSV's columns, most likely noisy first) and the summary."""

    rows: RankedRows
    summary: dict[str, Any]
    columns: list[str] = field(default_factory=lambda: list(BASE_COLUMNS))

    def write(self, csv_path: str | Path, summary_path: str | Path | None = None) -> tuple[Path, Path]:
        """Write the CSV (a chunk of rows at a time) and the summary JSON, each atomically; returns their paths.

        The summary goes to `<csv stem>.summary.json` beside the CSV unless `summary_path` is given.
        """
        csv_path = Path(csv_path)
        summary_path = Path(summary_path) if summary_path is not None else default_summary_path(csv_path)
        self.summary["csv"] = str(csv_path)
        self.summary["summary"] = str(summary_path)
        for path in (csv_path, summary_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            for chunk in self.rows.chunks(self.columns):
                writer.writerows(chunk)
        os.replace(tmp, csv_path)
        tmp = summary_path.with_name(summary_path.name + ".tmp")
        tmp.write_text(json.dumps(self.summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, summary_path)
        return csv_path, summary_path


def default_summary_path(csv_path: str | Path) -> Path:
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}.summary.json")


def _shard_ids(records: RecordDataset) -> np.ndarray:
    """The shard of every record (`RecordDataset` keeps them in an array; else one call a record)."""
    ids = getattr(records, "_shard_ids", None)
    if ids is not None:
        return np.asarray(ids)
    return np.fromiter((records.shard_of(i) for i in range(len(records))), np.int64, len(records))


def ranked_rows(
    records: RecordDataset,
    keys: np.ndarray,
    sims: np.ndarray,
    w: np.ndarray,
    texts: ShardTexts,
    warnings: Warnings,
) -> tuple[RankedRows, int]:
    """The ranked records with their original strings, most likely noisy first; and how many
    records found their strings."""
    text_rows, with_text, missing_text = texts.rows_of(_shard_ids(records), np.asarray(keys, np.int64))
    if missing_text:
        warnings.add(f"{missing_text} records have no entry in their shard's texts sidecar: their strings are blank")
    order = np.argsort(sims[:, 0], kind="stable")  # stable: ties keep shard order
    return RankedRows(order, np.asarray(keys, np.int64), w, sims, text_rows, texts), with_text


TRUTH_COLUMNS = ("noisy", "noise")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}


def roc_auc(scores: Sequence[float] | np.ndarray | torch.Tensor, labels: Sequence[bool] | np.ndarray) -> float:
    """ROC-AUC of `scores` (higher = more likely positive) against boolean `labels`.

    The Mann-Whitney U statistic with average ranks for ties, so a tie between a positive and a
    negative counts one half (as sklearn.metrics.roc_auc_score). Raises ValueError when the labels
    hold only one class or a score is not finite.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC-AUC needs both classes, got {n_pos} positive and {n_neg} negative labels")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first occurrence
    ranks = (first + (counts - 1) / 2.0)[inverse.ravel()]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _auc_or_none(scores: np.ndarray, labels: np.ndarray) -> float | None:
    try:
        return roc_auc(scores, labels)
    except ValueError:
        return None


def parse_noisy(value: Any, where: str) -> bool:
    """A truth flag or a CSV cell as a bool: true/false, 1/0, yes/no (case-insensitive)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ScoreInputError(f"{where}: 'noisy' must be a boolean (true/false/1/0), got {value!r}")


def read_truth(path: str | Path) -> dict[str, tuple[bool, str | None]]:
    """Ground truth: sample key -> (noisy, noise kind or None).

    JSONL lines {"key": ..., "noisy": bool, "noise": kind or null, ...} (other fields ignored), or a
    CSV with columns key,noisy[,noise].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"truth file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    is_csv = path.suffix.lower() == ".csv" or (
        path.suffix.lower() not in (".jsonl", ".json", ".ndjson") and not text.lstrip().startswith("{")
    )
    entries: list[tuple[str, Mapping[str, Any]]] = []
    if is_csv:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = {"key", "noisy"} - set(reader.fieldnames or [])
        if missing:
            raise ScoreInputError(f"{path}: a truth CSV needs columns key,noisy[,noise]; missing {sorted(missing)}")
        entries = [(f"{path}:{i}", row) for i, row in enumerate(reader, 2)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreInputError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(entry, Mapping) or "key" not in entry or "noisy" not in entry:
                raise ScoreInputError(
                    f"{path}:{lineno}: truth lines need 'key' and 'noisy', got {line.strip()[:200]!r}"
                )
            entries.append((f"{path}:{lineno}", entry))
    truth: dict[str, tuple[bool, str | None]] = {}
    for where, entry in entries:
        key = str(entry["key"])
        if key in truth:
            raise ScoreInputError(f"{where}: sample key {key!r} appears twice in the truth file")
        noisy = parse_noisy(entry["noisy"], where)
        noise = entry.get("noise")
        noise = None if noise is None or str(noise) == "" or not noisy else str(noise)
        truth[key] = (noisy, noise)
    if not truth:
        raise ScoreInputError(f"{path}: the truth file has no entries")
    return truth


def _truth_summary(rows: RankedRows, truth: dict[str, tuple[bool, str | None]]) -> dict[str, Any]:
    """AUCs and precision@#noisy over the ranked rows that have a truth entry (sets the rows' noisy/noise)."""
    n = len(rows)
    noisy = np.full(n, -1, np.int8)
    noise = np.full(n, -1, np.int32)
    kinds: dict[str, int] = {}
    matched_keys = set()
    for first in range(0, n, CHUNK):
        for j, key in enumerate(rows.sample_keys(np.arange(first, min(first + CHUNK, n), dtype=np.int64)), first):
            entry = truth.get(key) if key else None
            if entry is None:
                continue
            matched_keys.add(key)
            noisy[j] = bool(entry[0])
            if entry[1] is not None:
                noise[j] = kinds.setdefault(entry[1], len(kinds))
    rows.noisy, rows.noise, rows.noise_kinds = noisy, noise, list(kinds)
    ranked = np.flatnonzero(noisy >= 0)  # already in rank order
    out: dict[str, Any] = {
        "truth_entries": len(truth),
        "truth_matched_records": len(ranked),
        "truth_keys_not_in_shards": len(truth.keys() - matched_keys),
        "records_without_truth": n - len(ranked),
    }
    if not len(ranked):
        return out
    y = noisy[ranked] == 1
    w_s = rows.ranked("weight_sample", ranked)
    w_t = rows.ranked("weight_raw", ranked)
    s_tc = rows.ranked("s_raw_caption", ranked)
    n_noisy = int(y.sum())
    out.update(
        noisy=n_noisy,
        clean=int(len(y) - n_noisy),
        noise_rate=n_noisy / len(y),
        auc_weight_sample=_auc_or_none(1.0 - w_s, y),
        auc_s_raw_caption=_auc_or_none(-s_tc, y),
        auc_weight_min=_auc_or_none(1.0 - np.minimum(w_s, w_t), y),
        precision_at_noisy=float(y[:n_noisy].mean()) if n_noisy else None,
        flagged_precision=float(y[w_s < 1.0].mean()) if (w_s < 1.0).any() else None,
        flagged_recall=float((w_s[y] < 1.0).mean()) if n_noisy else None,
    )
    names = list(rows.noise_kinds)
    if "unspecified" not in kinds:
        names.append("unspecified")
    unspecified = names.index("unspecified")  # noisy rows without a kind count as this one
    code = np.where(noise[ranked] >= 0, noise[ranked], unspecified)
    counts = np.bincount(code[y], minlength=len(names))
    clean = ~y
    by_noise = {}
    for name, c in sorted((names[c], c) for c in np.flatnonzero(counts).tolist()):
        sel = (y & (code == c)) | clean
        by_noise[name] = {"count": int(counts[c]), "auc_weight_sample": _auc_or_none(1.0 - w_s[sel], y[sel])}
    out["by_noise"] = by_noise
    return out


def join_truth(
    rows: RankedRows,
    truth_map: dict[str, tuple[bool, str | None]],
    truth: str | Path,
    *,
    no_texts: bool,
    warnings: Warnings,
) -> dict[str, Any]:
    """The truth summary (AUCs, counts); a clear error when no record matches the truth file."""
    report = _truth_summary(rows, truth_map)
    if not report["truth_matched_records"]:
        if no_texts:
            why = "the shards have no texts sidecar, so their sample keys are unknown"
        else:
            chunks = (rows.sample_keys(np.arange(a, min(a + CHUNK, len(rows)))) for a in range(0, len(rows), CHUNK))
            example = next((key for chunk in chunks for key in chunk if key), "")
            why = f"the shards' sample keys look like {example!r}"
        raise ScoreInputError(
            f"no record of the shards matches a key of the truth file {truth} "
            f"({report['truth_entries']} keys, e.g. {next(iter(truth_map))!r}): {why}"
        )
    if report["truth_keys_not_in_shards"] or report["records_without_truth"]:
        warnings.add(
            f"truth join: {report['truth_keys_not_in_shards']} truth keys are not in the shards, "
            f"{report['records_without_truth']} records have no truth entry (both left out of the AUCs)"
        )
    return {"truth": str(truth), **report}
