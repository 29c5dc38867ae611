"""The ranked rows of `alip score` (one per record, most likely noisy first) and writing them.

The CSV's columns and the ranking rule are public constants: `alip.demo.report` and the tests read
the CSV by these names.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alip.data.torch_loader import RecordDataset
from alip.score.common import _Warnings

SIMILARITIES = ("s_raw_caption", "s_image_raw", "s_image_caption")
BASE_COLUMNS = (
    "rank",
    "record_key",
    "sample_key",
    "weight_sample",
    "weight_raw",
    "weight_caption",
    *SIMILARITIES,
    "raw_text",
    "caption",
)
RANKING = "ascending s_raw_caption (most likely noisy first; ties keep shard order)"


@dataclass
class ScoreResult:
    """Ranked rows (the CSV's columns, most likely noisy first) and the summary."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    columns: list[str] = field(default_factory=lambda: list(BASE_COLUMNS))

    def write(self, csv_path: str | Path, summary_path: str | Path | None = None) -> tuple[Path, Path]:
        """Write the CSV and the summary JSON, each atomically; returns their paths.

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
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, csv_path)
        tmp = summary_path.with_name(summary_path.name + ".tmp")
        tmp.write_text(json.dumps(self.summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, summary_path)
        return csv_path, summary_path


def default_summary_path(csv_path: str | Path) -> Path:
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}.summary.json")


def _ranked_rows(
    records: RecordDataset,
    keys: np.ndarray,
    sims: np.ndarray,
    w: np.ndarray,
    texts: list[dict[int, dict[str, str]] | None],
    warnings: _Warnings,
) -> tuple[list[dict[str, Any]], int]:
    """One CSV row per record with its original strings, most likely noisy first; and how many
    records found their strings."""
    rows = []
    missing_text = with_text = 0
    for i in range(len(records)):
        shard_id = records.shard_of(i)
        entry = texts[shard_id].get(int(keys[i])) if texts[shard_id] is not None else None
        if texts[shard_id] is not None:
            missing_text += entry is None
            with_text += entry is not None
        entry = entry or {"sample_key": "", "raw_text": "", "caption": ""}
        rows.append(
            {
                "rank": 0,
                "record_key": int(keys[i]),
                "sample_key": entry["sample_key"],
                "weight_sample": float(w[i, 0]),
                "weight_raw": float(w[i, 1]),
                "weight_caption": float(w[i, 2]),
                "s_raw_caption": float(sims[i, 0]),
                "s_image_raw": float(sims[i, 1]),
                "s_image_caption": float(sims[i, 2]),
                "raw_text": entry["raw_text"],
                "caption": entry["caption"],
            }
        )
    if missing_text:
        warnings.add(f"{missing_text} records have no entry in their shard's texts sidecar: their strings are blank")
    rows.sort(key=lambda r: r["s_raw_caption"])  # stable: ties keep shard order
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows, with_text
