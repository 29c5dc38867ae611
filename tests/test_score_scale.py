"""`alip score`'s ranking at 15M records (issue 12): the texts sidecars, the ranked rows and the CSV are
held in columns (NumPy arrays, `StringColumn`s) and written a chunk at a time, never a dict per
record; the CSV and the truth summary are those of the dict-per-record code, byte for byte."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from shard_factory import memory_per_row

from alip import columns
from alip.data.ingest import sample_index
from alip.score import ranking, signals
from alip.score.ranking import BASE_COLUMNS, SIMILARITIES, TRUTH_COLUMNS, ScoreResult, join_truth, ranked_rows
from alip.score.signals import Warnings, shard_texts


def _text(i: int, words: int) -> str:
    return " ".join(f"w{(i * 7 + j * 13) % 9973}" for j in range(words))


class Records:
    """What `ranked_rows` asks of a RecordDataset: its length and each record's shard."""

    def __init__(self, counts: list[int]) -> None:
        self._shard_ids = np.repeat(np.arange(len(counts)), counts)

    def __len__(self) -> int:
        return len(self._shard_ids)

    def shard_of(self, i: int) -> int:
        return int(self._shard_ids[i])


def write_shards(folder: Path, n: int, shards: int, *, odd: bool = False) -> tuple[list, list[int]]:
    """Texts sidecars of `shards` shards of n records in all (keys 0..n-1, scale.py's texts: a 12-word raw
    text, a 10-word caption). With `odd`: the strings a sidecar may hold besides (a shard without a
    sidecar, missing and repeated keys, blank lines, non-string values, quotes, newlines, non-ASCII)."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = [n // shards + (s < n % shards) for s in range(shards)]
    infos, first = [], 0
    for s, count in enumerate(counts):
        path = folder / f"train-{s:05d}.texts.jsonl"
        lines = []
        for i in range(first, first + count):
            entry = {"key": i, "sample_key": f"k{i}", "raw_text": _text(i, 12), "caption": _text(i + 1, 10)}
            if odd and i % 11 == 0:
                continue  # no entry: blank strings
            if odd and i % 13 == 0:
                entry.update(raw_text=f'"quoted", naïve\nline {i} 😀', caption=None, key=str(i))
            if odd and i % 17 == 0:
                entry.update(raw_text=i / 8, sample_key=i, caption="")
            lines.append(json.dumps(entry, ensure_ascii=i % 2 == 0))
            if odd and i % 19 == 0:  # the key again: its last entry counts
                lines.append(json.dumps({**entry, "raw_text": f"again {i}", "sample_key": None}))
                lines.append("")
        if not (odd and s == 1):
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        infos.append(SimpleNamespace(rec=str(folder / f"train-{s:05d}.rec"), texts=str(path)))
        first += count
    return infos, counts


def signals_of(n: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    sims = rng.uniform(-0.1, 0.5, size=(n, 3))
    if ties:
        sims[::5, 0] = 0.25
    return np.arange(n, dtype=np.int64), sims, np.clip(sims * 3, 0, 1)


def reference(infos, counts, keys, sims, w, truth_map, out: Path) -> None:
    """The dict-per-record code this replaced (sidecars as dicts, one dict per row, sorted rows,
    DictWriter), with its truth join, kept here as the byte-for-byte reference."""
    texts = []
    for info in infos:
        path = Path(info.texts)
        if not path.is_file():
            texts.append(None)
            continue
        table = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                e = json.loads(line)
                table[int(e["key"])] = {
                    "sample_key": "" if e.get("sample_key") is None else str(e["sample_key"]),
                    "raw_text": e.get("raw_text") or "",
                    "caption": e.get("caption") or "",
                }
        texts.append(table)
    shard_ids = np.repeat(np.arange(len(counts)), counts)
    rows = []
    for i in range(len(keys)):
        table = texts[shard_ids[i]]
        blank = dict.fromkeys(("sample_key", "raw_text", "caption"), "")
        entry = (table.get(int(keys[i])) if table is not None else None) or blank
        rows.append(
            {
                "record_key": int(keys[i]),
                **entry,
                **{name: float(w[i, j]) for j, name in enumerate(("weight_sample", "weight_raw", "weight_caption"))},
                **{name: float(sims[i, j]) for j, name in enumerate(SIMILARITIES)},
            }
        )
    rows.sort(key=lambda r: r["s_raw_caption"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
        found = truth_map.get(row["sample_key"]) if row["sample_key"] else None
        row["noisy"], row["noise"] = found or (None, None)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*BASE_COLUMNS, *TRUTH_COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def small_chunks(monkeypatch):
    """Rows made Python objects at a time: at 20k rows, the default 8192 would dominate the peaks."""
    for module in (columns, sample_index, signals, ranking):
        monkeypatch.setattr(module, "CHUNK", 512)


def test_ranking_memory_per_row(tmp_path, small_chunks):
    """At 20k records (100 shards), reading the texts sidecars, ranking and writing the CSV peaks at
    about 250 bytes a record (its three strings are about 125) and keeps about 210 (the strings, their
    offsets, the order and each record's row in them; the model pass's arrays are the caller's).
    The code that held a dict per sidecar entry and a dict per ranked row peaked at 1,215 and kept 955
    (tracemalloc's count; the process's RSS grew by about 1,300 a record)."""
    n = 20_000
    infos, counts = write_shards(tmp_path / "shards", n, 100)
    keys, sims, w = signals_of(n)
    records = Records(counts)

    def rank_and_write():
        warnings = Warnings()
        rows, with_text = ranked_rows(records, keys, sims, w, shard_texts(infos, warnings), warnings)
        ScoreResult(rows, {"records": n}).write(tmp_path / "scores.csv")
        assert with_text == n and not warnings
        return rows

    rank_and_write()  # imports and one-off caches outside the measurement
    held, peak = memory_per_row(rank_and_write, n)
    assert held < 300 and peak < 350, (held, peak)
    with open(tmp_path / "scores.csv", newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert len(got) == n and [r["rank"] for r in got[:3]] == ["1", "2", "3"]
    first = int(np.argmin(sims[:, 0]))
    assert (got[0]["sample_key"], got[0]["raw_text"]) == (f"k{first}", _text(first, 12))


def test_csv_and_truth_as_the_dict_per_row_code(tmp_path, small_chunks):
    """Odd sidecars (see write_shards), tied similarities, a truth file with a kind named "unspecified"
    and kinds left unnamed: the CSV is the reference's byte for byte, the rows read back as dicts."""
    n = 3_000
    infos, counts = write_shards(tmp_path / "shards", n, 7, odd=True)
    keys, sims, w = signals_of(n, ties=True)
    kinds = ["swap", "unspecified", None, "filename"]
    truth_map = {f"k{i}": (i % 2 == 0, kinds[i // 6 % 4] if i % 2 == 0 else None) for i in range(0, n + 50, 3)}
    warnings = Warnings()
    rows, with_text = ranked_rows(Records(counts), keys, sims, w, shard_texts(infos, warnings), warnings)
    report = join_truth(rows, truth_map, "truth.jsonl", no_texts=False, warnings=warnings)
    ScoreResult(rows, {}, [*BASE_COLUMNS, *TRUTH_COLUMNS]).write(tmp_path / "scores.csv")
    reference(infos, counts, keys, sims, w, truth_map, tmp_path / "expected.csv")
    assert (tmp_path / "scores.csv").read_bytes() == (tmp_path / "expected.csv").read_bytes()

    assert any("no texts sidecar" in m for m in warnings) and any("no entry" in m for m in warnings)
    assert with_text < n - counts[1]
    assert set(report["by_noise"]) == {"swap", "unspecified", "filename"}
    assert report["truth_matched_records"] == sum(r["noisy"] is not None for r in rows)
    assert rows[0]["rank"] == 1 and rows[-1]["rank"] == n and len(rows[5:9]) == 4
    assert list(rows)[100] == rows[100] and rows[-1] == rows[n - 1]
    with pytest.raises(IndexError):
        rows[n]
