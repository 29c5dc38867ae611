"""Ground truth for `alip score`: reading noise flags, ROC-AUC and how well the ranking finds the noise.

`roc_auc`, `parse_noisy` and `read_truth` are pure (no model, no logging); `_join_truth` sets the
ranked rows' `noisy`/`noise` and returns the summary's truth part.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alip.data.sample_index import CHUNK
from alip.score.common import ScoreInputError, _Warnings

if TYPE_CHECKING:
    from alip.score.ranking import RankedRows

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


def _join_truth(
    rows: RankedRows,
    truth_map: dict[str, tuple[bool, str | None]],
    truth: str | Path,
    *,
    no_texts: bool,
    warnings: _Warnings,
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
