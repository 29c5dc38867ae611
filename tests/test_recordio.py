"""Pure-Python RecordIO against files written by the real MXNet 1.9.1 (tests/fixtures/mxnet)."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from alip.data.format import recordio as rio
from alip.data.format import schema

FIX = Path(__file__).parent / "fixtures" / "mxnet"
MAGIC = struct.pack("<I", rio.MAGIC)


def basic_records():
    return json.loads((FIX / "mxnet_basic.json").read_text())["records"]


def official_samples():
    return json.loads((FIX / "alip_official_samples.json").read_text())


def test_reads_mxnet_basic_every_padding_case_and_label_form():
    want = basic_records()
    with rio.RecordIOReader(FIX / "mxnet_basic.rec") as reader:
        got = list(reader)
    assert [k for k, _ in got] == [r["key"] for r in want] == [0, 2, 4, 6, 8, 10]
    for (_, record), w in zip(got, want, strict=True):
        header, payload = rio.unpack(record)
        assert (header.flag, header.id, header.id2) == (w["flag"], w["id"], w["id2"])
        np.testing.assert_array_equal(np.asarray(header.label, np.float32), np.asarray(w["label"], np.float32))
        assert len(payload) == w["payload_len"]
        assert hashlib.sha256(payload).hexdigest() == w["payload_sha256"]


def test_writes_mxnet_basic_byte_for_byte(tmp_path):
    records = []
    with rio.RecordIOReader(FIX / "mxnet_basic.rec") as reader:
        for (key, record), w in zip(reader, basic_records(), strict=True):
            _, payload = rio.unpack(record)
            label = np.asarray(w["label"], np.float32) if isinstance(w["label"], list) else w["label"]
            records.append((key, rio.pack(rio.IRHeader(0, label, w["id"], w["id2"]), payload)))
    rio.write_records(tmp_path / "b.rec", tmp_path / "b.idx", records)
    assert (tmp_path / "b.rec").read_bytes() == (FIX / "mxnet_basic.rec").read_bytes()
    assert (tmp_path / "b.idx").read_bytes() == (FIX / "mxnet_basic.idx").read_bytes()


def test_official_layout_round_trips_through_the_schema(tmp_path):
    samples = official_samples()
    with rio.RecordIOReader(FIX / "alip_official.rec") as reader:
        parsed = [schema.parse_record(record) for _, record in reader]
    rebuilt = []
    for (key, raw, cap, jpeg), s in zip(parsed, samples, strict=True):
        assert key == s["record_index"]
        assert raw.tolist() == s["raw_tokens"] and cap.tolist() == s["caption_tokens"]
        assert jpeg[:2] == b"\xff\xd8"
        rebuilt.append((key, schema.make_record(key, jpeg, raw, cap)))
    rio.write_records(tmp_path / "o.rec", tmp_path / "o.idx", rebuilt)
    assert (tmp_path / "o.rec").read_bytes() == (FIX / "alip_official.rec").read_bytes()
    assert (tmp_path / "o.idx").read_bytes() == (FIX / "alip_official.idx").read_bytes()


def lrec(cflag, length):
    return struct.pack("<I", cflag << 29 | length)


@pytest.mark.parametrize(
    "data,expected",
    [
        # magic at an aligned offset: split into a first and a last part, magic dropped, padding by total length
        (b"abcd" + MAGIC + b"efghij", MAGIC + lrec(1, 4) + b"abcd" + MAGIC + lrec(3, 6) + b"efghij" + b"\0\0"),
        # magic at the very start and the very end
        (MAGIC + b"wxyz" + MAGIC, MAGIC + lrec(1, 0) + MAGIC + lrec(2, 4) + b"wxyz" + MAGIC + lrec(3, 0)),
        # unaligned magic is left alone
        (b"ab" + MAGIC + b"c", MAGIC + lrec(0, 7) + b"ab" + MAGIC + b"c" + b"\0"),
    ],
)
def test_dmlc_framing_escapes_aligned_magic(tmp_path, data, expected):
    assert rio.frame(data) == expected
    rio.write_records(tmp_path / "m.rec", tmp_path / "m.idx", [(0, data), (1, b"after")])
    with rio.RecordIOReader(tmp_path / "m.rec") as reader:
        assert list(reader) == [(0, data), (1, b"after")]
    assert rio.check_shard(tmp_path / "m.rec").num_records == 2


def test_reader_without_idx_scans_the_framing(tmp_path):
    shutil.copy(FIX / "mxnet_basic.rec", tmp_path / "basic.rec")
    with rio.RecordIOReader(tmp_path / "basic.rec") as scanned, rio.RecordIOReader(FIX / "mxnet_basic.rec") as indexed:
        assert [r for _, r in scanned] == [r for _, r in indexed]


def test_check_shard_passes_reference_files():
    assert rio.check_shard(FIX / "alip_official.rec", label_length=154, expected_records=7).num_records == 7
    assert rio.check_shard(FIX / "mxnet_basic.rec").num_records == 6


@pytest.fixture
def shard(tmp_path):
    for ext in (".rec", ".idx"):
        shutil.copy(FIX / f"alip_official{ext}", tmp_path / f"s{ext}")
    return tmp_path / "s.rec", tmp_path / "s.idx"


def test_truncated_shard_names_file_and_record(shard):
    rec, _ = shard
    data = rec.read_bytes()
    rec.write_bytes(data[: len(data) - 5000])  # cut inside the last record (key 6)
    with pytest.raises(rio.RecordIOError, match=r"s\.rec: record key 6 at byte 752320: .*truncated"):
        rio.check_shard(rec, label_length=154)


def test_idx_pointing_off_a_record_boundary(shard):
    rec, idx = shard
    lines = idx.read_text().splitlines()
    lines[3] = "3\t256132"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(rio.RecordIOError, match=r"record key 3 starts at byte 256132.*does not match"):
        rio.check_shard(rec)


def test_idx_offset_past_the_end(shard):
    rec, idx = shard
    idx.write_text(idx.read_text() + "7\t999999999\n")
    with pytest.raises(rio.RecordIOError, match=r"record key 7 has offset 999999999 beyond the end"):
        rio.check_shard(rec)


def test_missing_idx_entries_and_wrong_counts(shard):
    rec, idx = shard
    with pytest.raises(rio.RecordIOError, match="7 records, but the meta JSON says 8"):
        rio.check_shard(rec, expected_records=8)
    idx.write_text("".join(idx.read_text().splitlines(keepends=True)[:5]))
    with pytest.raises(rio.RecordIOError, match="records missing from the .idx"):
        rio.check_shard(rec)


def test_wrong_label_length_and_bad_idx_lines(tmp_path):
    with pytest.raises(rio.RecordIOError, match=r"record key 0 at byte 0: label has 0 floats, expected 154"):
        rio.check_shard(FIX / "mxnet_basic.rec", label_length=154)
    (tmp_path / "x.idx").write_text("0\t0\nnot a line\n")
    with pytest.raises(rio.RecordIOError, match=r"x\.idx:2: expected 'key<TAB>offset'"):
        rio.read_idx(tmp_path / "x.idx")
    with pytest.raises(rio.RecordIOError, match="shard file missing"):
        rio.check_shard(tmp_path / "nope.rec")


def test_label_helpers_reject_wrong_shapes():
    with pytest.raises(ValueError, match="shape"):
        schema.encode_label(np.zeros(76), np.zeros(77))
    with pytest.raises(ValueError, match="expected 154"):
        schema.decode_label(np.zeros(150, np.float32))


def test_split_inside_the_header_is_refused_before_dali_sees_it(tmp_path):
    # dmlc splits a record wherever the magic stands at an aligned offset; DALI re-joins splits in
    # the payload but not one inside the 24-byte IRHeader (here: id == magic, at offset 8)
    payload_split = rio.pack(rio.IRHeader(0, 1.0, 5, 0), b"abcd" * 2 + MAGIC + b"jpeg")
    header_split = rio.pack(rio.IRHeader(0, 1.0, rio.MAGIC, 0), b"jpeg")
    rio.write_records(tmp_path / "ok.rec", tmp_path / "ok.idx", [(0, payload_split)])
    assert rio.check_shard(tmp_path / "ok.rec", label_length=0).num_records == 1
    rio.write_records(tmp_path / "bad.rec", tmp_path / "bad.idx", [(0, header_split)])
    with pytest.raises(rio.RecordIOError, match="record key 0 at byte 0 is split inside its IRHeader"):
        rio.check_shard(tmp_path / "bad.rec", label_length=0)
