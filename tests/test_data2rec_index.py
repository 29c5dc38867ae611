"""data2rec's columnar index (issue 12: the index of 15M rows under 8 GB). The samples live in columns
(`SampleIndex`: strings in Arrow's layout, numbers in NumPy), not one `SourceSample` per row; a shard's
samples are built when it is written; caption sidecars join by sorted hashes (`CaptionTable`). The
outputs stay byte-identical (tests/test_data2rec*.py); these tests check the structure, its memory per
row and that every path through it gives the values the per-row objects gave."""

from __future__ import annotations

import gc
import itertools
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from shard_factory import memory_per_row

from alip import columns
from alip.columns import StringColumn, StringColumnBuilder
from alip.data.ingest import sample_index, shard_plan, sources
from alip.data.ingest.sample_index import CaptionTable, SampleIndex
from alip.data.ingest.shard_plan import (
    ConvertOptions,
    index_inputs,
    plan_fingerprint,
    plan_shards,
    shard_stamp,
    stat_images,
)
from alip.data.ingest.sources import Columns, SourceSample, manifest_samples, read_caption_sidecar


def _text(i: int, words: int) -> str:
    return " ".join(f"w{(i * 7 + j * 13) % 9973}" for j in range(words))


def write_manifests(folder: Path, n: int) -> tuple[Path, Path, Path]:
    """A TSV with captions, the same without, and a JSONL caption sidecar by key (benchmarks/scale.py's form)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (
        open(folder / "m.tsv", "w", encoding="utf-8") as m,
        open(folder / "nocap.tsv", "w", encoding="utf-8") as nc,
        open(folder / "cap.jsonl", "w", encoding="utf-8") as c,
    ):
        m.write("key\timage\ttext\tcaption\n")
        nc.write("key\timage\ttext\n")
        for i in range(n):
            path = f"images/{i // 10000:05d}/{i:09d}.jpg"
            m.write(f"k{i}\t{path}\t{_text(i, 12)}\t{_text(i + 1, 10)}\n")
            nc.write(f"k{i}\t{path}\t{_text(i, 12)}\n")
            c.write(json.dumps({"key": f"k{i}", "caption": _text(i + 1, 10)}) + "\n")
    return folder / "m.tsv", folder / "nocap.tsv", folder / "cap.jsonl"


def opts_for(tmp_path: Path, **kw) -> ConvertOptions:
    return ConvertOptions(out_dir=tmp_path / "out", progress=False, workers=1, **kw)


def test_the_index_holds_columns_and_reads_as_the_samples_it_replaces(tmp_path):
    manifest, _, _ = write_manifests(tmp_path / "in", 500)
    columns = Columns(key="key", caption="caption")
    samples, skips = index_inputs([manifest], opts_for(tmp_path, columns=columns))
    assert isinstance(samples, SampleIndex) and not skips
    assert all(isinstance(c, StringColumn) and isinstance(c.data, bytes | bytearray) for c in samples.strings.values())
    assert samples.ints["input_row"].dtype == np.int64 and samples.ints["tar_offset"] is None  # -1 everywhere
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is SourceSample]  # no per-row objects held

    expected, _ = manifest_samples(manifest, None, columns)
    assert len(samples) == len(expected) == 500
    assert list(samples) == expected
    assert samples[7] == expected[7] and samples[-1] == expected[-1] and samples[3:9] == expected[3:9]
    with pytest.raises(IndexError):
        samples[500]


def test_index_join_and_plan_memorymemory_per_row(tmp_path, monkeypatch):
    """At 20k rows of scale.py's form (texts of 12 and 10 words) the index's columns hold ~260 bytes a row,
    and the peaks (tracemalloc, NumPy included) stay far below those of one SourceSample a row: about 760
    bytes a row indexing, 1060 joining a caption sidecar, 890 planning (130 over the index). At 20k rows a
    chunk of 8192 rows of Python strings adds ~150 bytes a row to each peak; at 1M it is gone."""
    n = 20_000
    for module in (
        columns,
        sample_index,
        shard_plan,
    ):  # rows made Python objects at a time: at 20k rows, 8192 would dominate
        monkeypatch.setattr(module, "CHUNK", 512)
    manifest, nocap, sidecar = write_manifests(tmp_path / "in", n)
    index_opts = opts_for(tmp_path, columns=Columns(key="key", caption="caption"))
    join_opts = opts_for(tmp_path, columns=Columns(key="key"), captions=sidecar)
    index_inputs([manifest], index_opts)  # imports and one-off caches outside the measurement
    index_inputs([nocap], join_opts)

    _, index_peak = memory_per_row(lambda: index_inputs([manifest], index_opts), n)
    _, join_peak = memory_per_row(lambda: index_inputs([nocap], join_opts), n)
    samples, _ = index_inputs([nocap], join_opts)
    stored = samples.nbytes / n

    def plan():
        stat_images(samples)
        tasks = plan_shards(samples, index_opts)
        plan_fingerprint(tasks, index_opts)
        return [shard_stamp(t) for t in tasks]

    _, plan_peak = memory_per_row(plan, n)
    assert stored < 280 and index_peak < 550 and join_peak < 750 and plan_peak < 140, (
        stored,
        index_peak,
        join_peak,
        plan_peak,
    )


def test_string_columns_round_trip_every_value():
    values = ["", "a", None, "Ünïcödé café ☕", "日本語", "emoji 🐶", "lone \ud800 surrogate", "x" * 1000, None]
    values.append("tab\tnl\n")
    builder = StringColumnBuilder()
    for i, v in enumerate(values * 3):
        builder.pending.append(v)
        if i % 4 == 3:
            builder.flush()
    column = builder.finish()
    assert list(column) == values * 3 and len(column) == 30
    assert column.take(np.array([3, 2, 0])) == [values[3], None, ""] and column[6] == values[6]
    assert column.has_none()
    assert list(StringColumn.full("", 4)) == [""] * 4 and not StringColumn.full("", 4).has_none()
    assert list(StringColumn.full(None, 3)) == [None] * 3 and list(StringColumn.full("ab", 3)) == ["ab"] * 3


@pytest.mark.parametrize("collide", [False, True])
def test_caption_table_joins_as_the_sidecar_dicts(tmp_path, monkeypatch, collide):
    """Same captions as `by_key.get(key) or (by_path.get(path) if path else None)` over read_caption_sidecar's
    dicts: the last entry of a key wins, null captions are no entry, an empty caption by key falls back
    to the path; with every hash colliding too."""
    if collide:
        monkeypatch.setattr(sample_index, "_hash", lambda s: len(s) % 3)
    rng = random.Random(0)
    sidecar = tmp_path / "side.jsonl"
    with open(sidecar, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": {"captioner": {"model": "m"}}}) + "\n")
        for _ in range(400):
            entry = {"caption": rng.choice([None, "", f"c{rng.randrange(50)} é"])}
            if rng.random() < 0.7:
                entry["key"] = f"k{rng.randrange(120)}"
            if rng.random() < 0.5 or "key" not in entry:
                entry["path"] = f"p/{rng.randrange(120)}.jpg"
            f.write(json.dumps(entry) + "\n")
    by_key, by_path = read_caption_sidecar(sidecar)
    keys = [f"k{i}" for i in range(150)]
    paths = [rng.choice([None, "", f"p/{i}.jpg"]) for i in range(150)]
    expected = [by_key.get(k) or (by_path.get(p) if p else None) for k, p in zip(keys, paths, strict=True)]
    assert CaptionTable(sidecar).captions(keys, paths) == expected
    assert any(e is not None for e in expected) and None in expected


def test_a_shard_task_travels_without_the_index_and_keeps_the_fingerprint(tmp_path):
    manifest, _, _ = write_manifests(tmp_path / "in", 300)
    opts = opts_for(tmp_path, columns=Columns(key="key", caption="caption"), shard_records=70)
    samples, _ = index_inputs([manifest], opts)
    tasks = plan_shards(samples, opts)
    assert [t.num_samples for t in tasks] == [70, 70, 70, 70, 20]
    sent = [pickle.loads(pickle.dumps(t)) for t in tasks]  # what a worker gets
    assert all(t.source is None for t in sent)
    assert len(pickle.dumps(tasks[-1])) < 20 * 1000  # its 20 samples, not the 300 rows of the index
    assert [t.items for t in sent] == [t.items for t in tasks]
    assert [k for t in tasks for k, _ in t.items] == list(range(300))  # record keys: the shuffled positions
    assert plan_fingerprint(sent, opts) == plan_fingerprint(tasks, opts)  # columns and objects agree
    assert [shard_stamp(t) for t in sent] == [shard_stamp(t) for t in tasks]
    # a list of SourceSamples plans exactly as the index does
    assert [t.items for t in plan_shards(list(samples), opts)] == [t.items for t in tasks]


def test_image_paths_are_the_strings_pathlib_makes():
    """The manifest reader joins root and path as strings where pathlib would give the same string."""
    parts = ["", ".", "..", "a", "b.jpg", "/", "//", "./", " ", "é", "\\", "x/", ".hidden"]
    roots = [Path("."), Path("/"), Path("/data"), Path("data/sub"), Path("/data/x/"), Path("..")]
    rels = {"".join(c) for k in (1, 2, 3) for c in itertools.product(parts, repeat=k)} - {""}
    for root in roots:
        for rel in rels:
            assert sources.image_path(root, rel) == str(root / rel), (root, rel)
