"""Loader start-up checks at scale (issue 12, item 4): the default quick check (sizes and counts
against the meta JSON, the .idx, three records per shard) still catches a truncated shard, a
mismatched .idx and a wrong record count; the opt-in full check walks every record and catches a
record split inside its IRHeader that the quick check does not sample. And benchmarks/scale.py runs
end to end at tiny sizes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shard_factory import FIXTURES

from alip.config import Config
from alip.data.format import recordio as rio
from alip.data.format import schema
from alip.data.format.recordio import RecordIOError, quick_check_shard, read_idx, read_idx_arrays
from alip.data.loaders.config import LoaderConfig
from alip.data.loaders.preflight import prepare_shards
from alip.data.loaders.torch_loader import TorchLoader
from alip.train.resume import applies_on_resume


def config(**kw) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": 4, "image_size": 32, "num_threads": 1, "num_workers": 0, **kw})


def copy_shards(shards, dest):
    shutil.copytree(shards.meta.parent, dest)
    return dest / shards.meta.name


def test_read_idx_arrays_equals_read_idx(tmp_path):
    for idx in (FIXTURES / "alip_official.idx", FIXTURES / "mxnet_basic.idx"):
        keys, offsets = read_idx_arrays(idx)
        assert keys.dtype == offsets.dtype == np.int64
        assert list(zip(keys.tolist(), offsets.tolist(), strict=True)) == read_idx(idx)
    odd = tmp_path / "odd.idx"
    odd.write_text("0\t0\n\n1\t64\t\n2\t128")  # a blank line, a trailing tab, no last newline
    assert list(zip(*(a.tolist() for a in read_idx_arrays(odd)), strict=True)) == [(0, 0), (1, 64), (2, 128)]
    odd.write_text("0\t0\nnot a line\n")
    with pytest.raises(RecordIOError, match=r"odd\.idx:2: expected 'key<TAB>offset'"):
        read_idx_arrays(odd)
    odd.write_text("")
    assert read_idx_arrays(odd)[1].size == 0


def test_quick_check_agrees_with_the_full_check_on_good_shards(shards):
    assert quick_check_shard(FIXTURES / "alip_official.rec", label_length=154, expected_records=7) == rio.check_shard(
        FIXTURES / "alip_official.rec", label_length=154, expected_records=7
    )
    assert quick_check_shard(FIXTURES / "mxnet_basic.rec").num_records == 6
    assert prepare_shards(shards.meta) == prepare_shards(shards.meta, full=True)


def test_default_check_catches_a_truncated_shard(shards, tmp_path):
    meta = copy_shards(shards, tmp_path / "s")
    rec = tmp_path / "s" / "train-00001.rec"
    offsets = [offset for _, offset in read_idx(rec.with_suffix(".idx"))]
    with open(rec, "r+b") as f:
        f.truncate(offsets[4] + 100)  # in the middle of the fifth record of ten
    # with the meta JSON: its size no longer matches
    with pytest.raises(RecordIOError, match=r"train-00001\.rec: \d+ bytes, but the meta JSON says \d+: truncated"):
        prepare_shards(meta)
    with pytest.raises(RecordIOError, match=r"train-00001\.rec"):
        TorchLoader(meta, config())
    # without it (a bare .rec): the .idx reaches past the end; the record that was cut is named
    with pytest.raises(RecordIOError, match=rf"train-00001\.rec: record key 14 at byte {offsets[4]}: .*truncated"):
        prepare_shards(rec)


def test_default_check_catches_a_mismatched_idx(shards, tmp_path):
    meta = copy_shards(shards, tmp_path / "s")
    folder = tmp_path / "s"
    # Same record count, other offsets: shard 1's index beside shard 0's records.
    shutil.copy(folder / "train-00001.idx", folder / "train-00000.idx")
    with pytest.raises(RecordIOError, match=r"train-00000\.rec: .*(\.idx does not match|truncated|beyond the end)"):
        prepare_shards(meta)
    with pytest.raises(RecordIOError, match=r"train-00000"):
        prepare_shards(folder / "train-00000.rec")  # no meta JSON to compare sizes with
    shutil.copy(shards.meta.parent / "train-00000.idx", folder / "train-00000.idx")
    # One offset moved inside its record (the 8th of 10, not one of the three whose framing is read).
    idx = folder / "train-00001.idx"
    lines = idx.read_text().splitlines()
    key, offset = lines[7].split("\t")
    lines[7] = f"{key}\t{int(offset) + 6}"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=rf"record key {key} at byte {int(offset) + 6} is not on a 4-byte"):
        prepare_shards(meta)
    # An .idx that lost its last line: the last record it names no longer ends the file.
    lines = (shards.meta.parent / "train-00001.idx").read_text().splitlines(keepends=True)
    idx.write_text("".join(lines[:-1]))
    with pytest.raises(RecordIOError, match="records missing from the .idx, or trailing garbage"):
        prepare_shards(folder / "train-00001.rec")


def test_default_check_catches_a_wrong_record_count(shards, tmp_path):
    meta = copy_shards(shards, tmp_path / "s")
    d = schema.read_meta(meta)
    d.shards[2].records += 1
    schema.write_meta(meta, d)
    with pytest.raises(RecordIOError, match=r"train-00002\.idx: 4 records, but the meta JSON says 5"):
        prepare_shards(meta)
    with pytest.raises(RecordIOError, match="the meta JSON says 5"):
        TorchLoader(meta, config())


def _shard_with_a_header_split(folder, position: int, count: int = 9):
    """A shard of `count` records whose record at `position` has the magic number as its id: dmlc
    splits the record inside its IRHeader, which DALI cannot read."""
    folder.mkdir()
    raw = np.zeros(77, np.int64)
    raw[:2] = [49406, 49407]
    label = schema.encode_label(raw, raw)
    with rio.RecordIOWriter(folder / "x.rec", folder / "x.idx") as w:
        for key in range(count):
            rid = rio.MAGIC if key == position else key
            w.write(key, rio.pack(rio.IRHeader(schema.LABEL_LENGTH, label, rid, 0), b"\xff\xd8" + bytes(100)))
    return folder / "x.rec"


def test_full_check_catches_a_record_split_inside_its_header(tmp_path):
    rec = _shard_with_a_header_split(tmp_path / "s", position=2)
    # The quick check reads the framing of records 0, 4 and 8 only: record 2 passes it.
    assert prepare_shards(rec)[0].num_records == 9
    with pytest.raises(RecordIOError, match=r"x\.rec: record key 2 at byte \d+ is split inside its IRHeader"):
        prepare_shards(rec, full=True)
    with pytest.raises(RecordIOError, match="split inside its IRHeader"):
        TorchLoader(rec, config(full_check=True))
    # one of the three records it samples: the quick check sees it too
    rec = _shard_with_a_header_split(tmp_path / "t", position=4)
    with pytest.raises(RecordIOError, match=r"record key 4 at byte \d+ is split inside its IRHeader"):
        prepare_shards(rec)


def test_full_check_is_a_start_up_option(tmp_path):
    assert LoaderConfig(batch_size=2).full_check is False
    assert Config().data.full_check is False
    assert applies_on_resume("data.full_check")
    # data.full_check=true reaches the training loader
    import torch

    from alip.config import RunShape, load_config
    from alip.train.trainer import build_loader

    rec = _shard_with_a_header_split(tmp_path / "s", position=2)
    shape = RunShape(world_size=1, per_rank_batch=2, micro_batch=2)
    cfg = load_config(None, [f"data.train={rec}", "data.loader=torch", "data.num_workers=0"])
    assert len(build_loader(cfg, shape, torch.device("cpu"))) == 4
    cfg = load_config(None, [f"data.train={rec}", "data.loader=torch", "data.num_workers=0", "data.full_check=true"])
    with pytest.raises(RecordIOError, match="split inside its IRHeader"):
        build_loader(cfg, shape, torch.device("cpu"))


def test_duplicate_keys_compares_only_colliding_hashes():
    from alip.data.ingest.shard_plan import duplicate_keys

    assert duplicate_keys([]) == [] and duplicate_keys(["a"]) == []
    keys = [f"k{i}" for i in range(1000)] + ["k7", "k999", "k7"]
    assert duplicate_keys(keys) == ["k7", "k999"]


def test_merge_counts_what_landed_without_reading_it_back(tmp_path):
    from alip.caption.sidecar import CaptionEntry, count_entries, write_sidecar

    entries = [
        CaptionEntry(f"k{i}", f"caption {i}" if i % 3 else None, reason=None if i % 3 else "bad: x") for i in range(7)
    ]
    for name in ("s.jsonl", "s.parquet"):
        write_sidecar(tmp_path / name, {"captioner": {}}, entries)
        assert count_entries(tmp_path / name) == 7


def test_scale_benchmark_runs_at_tiny_sizes(tmp_path):
    """benchmarks/scale.py end to end at 300 and 600 records: inputs, one child per stage and size,
    the fit, the table on stdout and the JSON (about 10 s)."""
    root = Path(__file__).resolve().parents[1]
    stages = ["index", "plan", "plan_parquet", "merge", "caption_start"]
    out = tmp_path / "scale.json"
    cmd = [sys.executable, "benchmarks/scale.py", "--work", str(tmp_path / "work"), "--sizes", "300", "600"]
    cmd += ["--stages", *stages, "--repeat", "1", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    got = {(r["stage"], r["n"]): r for r in data["results"]}
    assert sorted(got) == sorted((s, n) for s in stages for n in (300, 600))
    for r in got.values():
        assert "error" not in r, r
        assert 0 < r["seconds"] < 30 and 0 < r["base"] <= r["peak_rss"] < 2**31, r
    assert got["plan", 600]["index_s"] > 0 and got["plan_parquet", 600]["index_s"] > 0
    assert len(list((tmp_path / "work" / "600" / "parquet").glob("train-*.parquet"))) == 1
    rows = {row["stage"]: row for row in data["rows"]}
    assert list(rows) == stages
    for row in rows.values():
        assert row["time_slope"] is not None and row["peak_rss_15000000"] >= row["by_size"]["600"]["base"]
        assert row["seconds_100000000"] >= row["seconds_15000000"] > 0
    lines = done.stdout.splitlines()
    top = lines.index(next(line for line in lines if line.startswith("| stage | 300: time / peak RSS")))
    assert [line.split(" | ")[0] for line in lines[top + 2 : top + 2 + len(stages)]] == [f"| {s}" for s in stages]
    cpu = lines.index("| stage | 300: CPU time | 600: CPU time | slope (CPU time) |")  # merge does not record it
    with_cpu = ["| index", "| plan", "| plan_parquet", "| caption_start"]
    assert [line.split(" | ")[0] for line in lines[cpu + 2 :]] == with_cpu
    assert all(got[s, 600]["cpu_seconds"] > 0 for s in [*stages[:3], "caption_start"])
    assert 0 < got["caption_start", 600]["held"] < got["caption_start", 600]["peak_rss"]
    assert data["info"]["pyarrow"] and data["info"]["command"].startswith(".venv/bin/python benchmarks/scale.py")
