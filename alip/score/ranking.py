"""The ranked rows of `alip score` (one per record, most likely noisy first) and writing them.

The CSV's columns and the ranking rule are public constants: `alip.demo.report` and the tests read
the CSV by these names.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from alip.data.sample_index import CHUNK
from alip.data.torch_loader import RecordDataset
from alip.score.common import _Warnings
from alip.score.signals import ShardTexts

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


def _ranked_rows(
    records: RecordDataset,
    keys: np.ndarray,
    sims: np.ndarray,
    w: np.ndarray,
    texts: ShardTexts,
    warnings: _Warnings,
) -> tuple[RankedRows, int]:
    """The ranked records with their original strings, most likely noisy first; and how many
    records found their strings."""
    text_rows, with_text, missing_text = texts.rows_of(_shard_ids(records), np.asarray(keys, np.int64))
    if missing_text:
        warnings.add(f"{missing_text} records have no entry in their shard's texts sidecar: their strings are blank")
    order = np.argsort(sims[:, 0], kind="stable")  # stable: ties keep shard order
    return RankedRows(order, np.asarray(keys, np.int64), w, sims, text_rows, texts), with_text
