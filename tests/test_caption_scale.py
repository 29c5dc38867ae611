"""The caption tool at 15M samples (issue 12): its start (index, earlier entries, the work, the rank's
share) and its merge hold columns and arrays, never an object per sample; the outputs are those
of the list-based code (byte for byte: the merge's JSONL and parquet)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_factory import memory_per_row

from alip import columns
from alip.caption import run, sidecar
from alip.caption.run import CaptionOptions, SampleKeys, _ImageDataset, start_work
from alip.caption.sidecar import (
    CaptionEntry,
    SidecarError,
    load_existing,
    merge,
    part_path,
    read_sidecar,
    write_sidecar,
)
from alip.data.ingest import sample_index, shard_plan
from alip.data.ingest.sample_index import SampleIndex
from alip.data.ingest.sources import SourceSample

SETTINGS = {"model": "synthetic"}


def _text(i: int, words: int) -> str:
    return " ".join(f"w{(i * 7 + j * 13) % 9973}" for j in range(words))


def _path(i: int) -> str:
    return f"images/{i // 10000:05d}/{i:09d}.jpg"


def write_inputs(folder: Path, n: int, parts: int = 8, done_parts: int = 4) -> tuple[Path, Path]:
    """A manifest of n rows in scale.py's form (key, image path, 12-word text) and an interrupted run:
    part r of `parts` holds the keys k{i} with i % parts == r, for r < done_parts."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest, out = folder / "m.tsv", folder / "caps.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        f.write("key\timage\ttext\n")
        f.writelines(f"k{i}\t{_path(i)}\t{_text(i, 12)}\n" for i in range(n))
    for p in folder.glob("caps.jsonl*"):
        p.unlink()
    for r in range(done_parts):
        with open(part_path(out, r), "w", encoding="utf-8") as f:
            f.write(json.dumps({"meta": {"captioner": SETTINGS}}) + "\n")
            for i in range(r, n, parts):
                reason = "missing file: gone" if i % 17 == 0 else None
                row = {"key": f"k{i}", "path": _path(i), "caption": None if reason else _text(i + 1, 10)}
                f.write(json.dumps({**row, "reason": reason} if reason else row) + "\n")
    return manifest, out


def _opts(out: Path) -> CaptionOptions:
    return CaptionOptions(output=out, key_col="key", workers=0, progress=False)


@pytest.fixture
def small_chunks(monkeypatch):
    """Rows made Python objects at a time: at 20k rows, the default 8192 would dominate the peaks."""
    for module in (columns, sample_index, shard_plan, run, sidecar):
        monkeypatch.setattr(module, "CHUNK", 512)


def test_start_and_merge_memorymemory_per_row(tmp_path, small_chunks):
    """At 20k rows with half of them captioned by an interrupted run, the start (index, earlier keys,
    the work, rank 0 of 8's share) peaks at about 150 bytes a row and keeps 120 (the index); the merge
    peaks at about 165. The code that held a SourceSample per sample (a set of every key, the work as
    a list of SourceSamples, the earlier entries as CaptionEntry objects) peaked at 690 and kept 515
    at the start, and peaked at 470 in the merge."""
    n = 20_000
    manifest, out = write_inputs(tmp_path, n)
    start_work([manifest], _opts(out), SETTINGS, 0, 8)  # imports and one-off caches outside the measurement
    held, peak = memory_per_row(lambda: start_work([manifest], _opts(out), SETTINGS, 0, 8), n)
    assert held < 200 and peak < 250, (held, peak)

    write_inputs(tmp_path, n, done_parts=8)
    samples, _ = run.index_for_captioning([manifest], _opts(out))
    keys = SampleKeys(samples)
    _, merge_peak = memory_per_row(lambda: merge(out, keys, {"inputs": []}), n)
    assert merge_peak < 250, merge_peak
    assert [e.key for e in read_sidecar(out)[1]] == [f"k{i}" for i in range(n)]


def test_the_start_builds_no_sample_objects(tmp_path, small_chunks, monkeypatch):
    """The start reads keys from the index's key column: not one SourceSample is built (the code before
    built all of them and kept those without an entry in a list); the DataLoader's items build theirs."""
    n = 3_000
    manifest, out = write_inputs(tmp_path, n)
    built = []
    samples_of = SampleIndex.samples

    def counting(self, rows):
        built.append(len(rows))
        return samples_of(self, rows)

    monkeypatch.setattr(SampleIndex, "samples", counting)
    work = start_work([manifest], _opts(out), SETTINGS, 1, 3)
    gc.collect()
    assert not built and not [o for o in gc.get_objects() if type(o) is SourceSample]
    assert work.mine.dtype == np.int64 and (work.already, work.todo) == (1500, 1500)

    todo = [i for i in range(n) if i % 8 >= 4]
    assert work.mine.tolist() == todo[1::3]
    dataset = _ImageDataset(work.samples, work.mine, None, 1000)
    assert len(dataset) == len(todo[1::3])
    sample = dataset.samples[int(dataset.positions[5])]
    assert (sample.key, sample.path) == (f"k{todo[1::3][5]}", _path(todo[1::3][5])) and built == [1]


def test_ranks_share_the_work_and_strays_are_refused(tmp_path):
    n = 1_000
    manifest, out = write_inputs(tmp_path, n, done_parts=3)
    shares = [start_work([manifest], _opts(out), SETTINGS, r, 3).mine for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == [i for i in range(n) if i % 8 >= 3]
    with open(part_path(out, 7), "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": {"captioner": SETTINGS}}) + "\n")
        f.write(json.dumps({"key": "elsewhere", "caption": "x"}) + "\n")
    with pytest.raises(
        SidecarError, match=r"1 existing entries are for samples not in these inputs \(e.g. \['elsewhere'\]"
    ):
        start_work([manifest], _opts(out), SETTINGS, 0, 1)


def test_hash_collisions_are_compared_by_string(tmp_path, monkeypatch):
    """Keys are found by 64-bit hashes; forced collisions (8 hash values for all keys) change nothing."""
    monkeypatch.setattr(sidecar, "_hash", lambda k: hash(k) % 8)
    n = 400
    manifest, out = write_inputs(tmp_path, n)
    work = start_work([manifest], _opts(out), SETTINGS, 0, 1)
    assert work.mine.tolist() == [i for i in range(n) if i % 8 >= 4]
    with open(part_path(out, 5), "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": {"captioner": SETTINGS}}) + "\n")
        f.writelines(json.dumps({"key": f"k{i}", "caption": "x"}) + "\n" for i in (21, 13, 8, 13))
    with pytest.raises(SidecarError, match="'k8' occurs twice"):  # the first key met a second time
        load_existing(out)
    part_path(out, 5).unlink()
    write_inputs(tmp_path, n, done_parts=8)
    samples, _ = run.index_for_captioning([manifest], _opts(out))
    report = merge(out, SampleKeys(samples), {})
    assert report.num_samples == n and report.failures == {"missing file": len(range(0, n, 17))}
    assert [e.key for e in read_sidecar(out)[1]] == [f"k{i}" for i in range(n)]


def _old_merge_bytes(folder: Path, expected: list[tuple[str, str | None]], suffix: str) -> bytes:
    """The sidecar the list-based merge wrote: every entry in input order, then pq.write_table or JSONL."""
    out = folder / f"caps{suffix}"
    _, entries = read_sidecar(part_path(out, 0))
    by_key = {e.key: e for e in entries}
    ordered = [by_key[k] for k, _ in expected]
    failed = [e for e in ordered if e.caption is None]
    kinds: dict[str, int] = {}
    for e in failed:
        kind = e.reason.split(":", 1)[0] if e.reason else "unknown"
        kinds[kind] = kinds.get(kind, 0) + 1
    meta = {"x": 1, "num_samples": len(ordered), "num_captioned": len(ordered) - len(failed)}
    meta |= {"num_failed": len(failed), "failures": dict(sorted(kinds.items()))}
    old = folder / f"old{suffix}"
    if suffix == ".parquet":
        rows = [{"key": e.key, "path": e.path, "caption": e.caption, "reason": e.reason} for e in ordered]
        schema = pa.schema(
            [(name, pa.string()) for name in ("key", "path", "caption", "reason")],
            metadata={sidecar._PARQUET_META_KEY: json.dumps(meta, ensure_ascii=False).encode()},
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), old, row_group_size=sidecar.PARQUET_ROW_GROUP)
    else:
        old.write_text(
            "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in [{"meta": meta}, *(e.to_json() for e in ordered)]
            ),
            encoding="utf-8",
        )
    return old.read_bytes()


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_merge_streams_the_bytes_the_list_based_merge_wrote(tmp_path, monkeypatch, suffix):
    """Entries in another order than the inputs (one part, shuffled), unicode, null paths and captions;
    parquet in row groups of 1024 written from batches of 100 entries: the bytes of one pq.write_table."""
    monkeypatch.setattr(sidecar, "CHUNK", 100)
    monkeypatch.setattr(sidecar, "PARQUET_ROW_GROUP", 1000)  # a multiple of CHUNK, as the defaults are
    n = 2_345
    expected = [(f"ключ{i}", None if i % 5 == 0 else f"img/{i}é.jpg") for i in range(n)]
    entries = [
        CaptionEntry(k, None if i % 7 == 0 else f"a «thing» {i}", p, "bad: x" if i % 14 == 0 else None)
        for i, (k, p) in enumerate(expected)
    ]
    order = np.random.default_rng(0).permutation(n).tolist()
    out = tmp_path / f"caps{suffix}"
    with sidecar.PartWriter(part_path(out, 0), {"captioner": SETTINGS}) as w:
        w.write([entries[i] for i in order])
    want = _old_merge_bytes(tmp_path, expected, suffix)
    report = merge(out, expected, {"x": 1})
    assert out.read_bytes() == want and report.num_failed == len(range(0, n, 7))
    if suffix == ".parquet":
        assert pq.ParquetFile(out).num_row_groups == 3
    write_sidecar(out, {}, [])  # no entries: one empty table, as pq.write_table writes it
    assert read_sidecar(out) == ({}, [])


def test_merge_reads_its_keys_once_and_refuses_duplicate_inputs(tmp_path, monkeypatch):
    """The keys may come as a generator (read once, a chunk at a time); an input key given twice is refused,
    within a chunk or across chunks."""
    monkeypatch.setattr(sidecar, "CHUNK", 7)
    out = tmp_path / "caps.jsonl"
    with sidecar.PartWriter(part_path(out, 0), {"captioner": SETTINGS}) as w:
        w.write([CaptionEntry(f"k{i}", f"c{i}") for i in range(20)])
    for keys in (["k1", "k2", "k1"], [f"k{i}" for i in range(10)] + ["k3"]):
        with pytest.raises(SidecarError, match="the inputs have duplicate sample keys"):
            merge(out, keys, {})
    report = merge(out, (f"k{i}" for i in reversed(range(20))), {})
    assert report.num_samples == 20 and [e.key for e in read_sidecar(out)[1]] == [f"k{i}" for i in range(19, -1, -1)]
