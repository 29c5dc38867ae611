"""data2rec on the hub's parquet form: embedded images (bytes, datasets Image structs), token-id texts,
a --tokens-npy file, --show-schema; and the packed shards train.

The parquet files are written here with pyarrow, in the types the Hugging Face `datasets` library
writes (an Image feature is struct<bytes: binary, path: string>), with small row groups so that
rows are read across several of them.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_factory import PHOTOS, jpeg_bytes, photo, read_packed

from alip.data.format import schema
from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.sources import Columns, InputError
from alip.data.ingest.typed_columns import BadTokens, check_token_ids

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
SOT, EOT = 49406, 49407
N_GOOD = 14

_spec = importlib.util.spec_from_file_location("data2rec_tool", ROOT / "tools" / "data2rec.py")
data2rec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data2rec)
run_data2rec = data2rec.guarded(data2rec.main)  # as on the command line: user errors -> one line, status 2


def ids_of(text: str) -> list[int]:
    """The unpadded CLIP ids of a text, as a pre-tokenised dataset stores them."""
    row = TOKENIZER([text])[0].tolist()
    return row[: row.index(EOT) + 1]


def padded(ids: list[int]) -> list[int]:
    return (ids + [0] * 77)[:77]


@pytest.fixture(scope="module")
def hub_parquet(tmp_path_factory):
    """A parquet like a hub image dataset: good rows, then one bad row of each kind. Returns (path, rows)."""
    d = tmp_path_factory.mktemp("hub")
    rows = []
    for i in range(N_GOOD):
        jpeg = jpeg_bytes(photo(PHOTOS[i % len(PHOTOS)])[::8, ::8])  # 64 px: the tiny model's size
        raw = ids_of(f"raw web title number {i}")
        cap = ids_of(f"a synthetic caption of photo {i}")
        rows.append(
            {"id": 100 + i, "image": {"bytes": jpeg, "path": f"{i}.jpg"}, "jpg": jpeg, "raw": raw, "cap": padded(cap)}
        )
    rows[1]["raw"] = [SOT] + [320] * 100 + [EOT]  # too long: cut to 77 keeping the end token
    rows[2]["cap"] = ids_of("padded the hugging face way") + [EOT] * 77  # HF's CLIP tokenizer pads with EOT
    rows[2]["cap"] = rows[2]["cap"][:77]
    good = rows[0]
    bad = {
        "corrupt": dict(
            good, image={"bytes": good["jpg"][: len(good["jpg"]) // 2], "path": None}, jpg=good["jpg"][:300]
        ),
        "big_id": dict(good, raw=[SOT, 49408, EOT]),
        "no_end": dict(good, cap=padded([SOT, 320, 321])),
        "null_image": dict(good, image=None, jpg=None),
        "null_ids": dict(good, raw=None),
    }
    for i, (name, row) in enumerate(bad.items()):
        rows.append(dict(row, id=900 + i, name=name))
    schema_ = pa.schema(
        [
            ("id", pa.int64()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("jpg", pa.binary()),
            ("raw", pa.list_(pa.int32())),
            ("cap", pa.list_(pa.int64(), 77)),  # fixed 77-id rows
        ]
    )
    table = pa.Table.from_pylist([{k: r[k] for k in schema_.names} for r in rows], schema=schema_)
    path = d / "part-00000.parquet"
    pq.write_table(table, path, row_group_size=4)
    return path, rows


def opts_for(out, **kw):
    kw.setdefault("columns", Columns(image="image", text="raw", caption="cap", key="id"))
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return ConvertOptions(out_dir=out, **kw)


def read_records(meta_path) -> dict[str, tuple]:
    """{sample key: (raw ids [77], caption ids [77], jpeg, texts entry)} over all shards."""
    return {k: v[1:] for k, v in read_packed(meta_path, "sample_key").items()}


def skip_reasons(out_dir) -> dict[str, str]:
    lines = (Path(out_dir) / "train.skipped.jsonl").read_text().splitlines()
    return {json.loads(line)["source"].rsplit(":", 1)[1]: json.loads(line)["reason"] for line in lines}


def expected_row(ids) -> list[int]:
    return check_token_ids(ids).tolist()


@pytest.mark.parametrize("image_col", ["image", "jpg"])
def test_embedded_images_and_token_ids_pack_and_bad_rows_are_reported(hub_parquet, tmp_path, image_col):
    path, rows = hub_parquet
    columns = Columns(image=image_col, text="raw", caption="cap", key="id")
    report = convert([path], opts_for(tmp_path, columns=columns, shard_records=5))
    assert report.num_inputs == len(rows) and report.num_records == N_GOOD
    records = read_records(report.meta_path)
    assert sorted(records) == sorted(str(r["id"]) for r in rows[:N_GOOD])
    for row in rows[:N_GOOD]:
        raw, cap, jpeg, entry = records[str(row["id"])]
        assert jpeg == row["jpg"]  # an RGB JPEG blob passes through byte for byte
        assert raw.tolist() == expected_row(row["raw"]) and cap.tolist() == expected_row(row["cap"])
        assert entry["raw_decoded"] and entry["caption_decoded"]
    long_raw = records["101"][0]
    assert long_raw.tolist() == [SOT] + [320] * 75 + [EOT]  # cut to 77, the end token kept
    assert records["102"][1].tolist() == padded(ids_of("padded the hugging face way"))  # EOT padding -> zeros
    assert records["100"][3]["raw_text"] == "raw web title number 0"  # the decoded text in the sidecar
    assert records["100"][3]["caption"] == "a synthetic caption of photo 0"

    reasons = skip_reasons(tmp_path)
    assert set(reasons) == {str(r["id"]) for r in rows[N_GOOD:]}
    by_name = {r["name"]: reasons[str(r["id"])] for r in rows[N_GOOD:]}
    assert by_name["corrupt"].startswith("corrupt or unreadable image")
    assert by_name["big_id"].startswith("bad token ids (raw text): id 49408 at position 1")
    assert by_name["no_end"] == "bad token ids (caption): no end token 49407"
    assert by_name["null_image"] == f"missing field(s) ['{image_col}']"
    assert by_name["null_ids"] == "missing field(s) ['raw']"
    meta = json.loads(report.meta_path.read_text())
    assert meta["source"]["stats"]["token_id_texts"] == 2 * N_GOOD and meta["source"]["stats"]["passthrough"] == N_GOOD

    # a rerun of the same command finds every shard done
    again = convert([path], opts_for(tmp_path, columns=columns, shard_records=5))
    assert again.images_written == 0 and again.num_records == N_GOOD


def test_row_groups_are_shuffled_as_blocks_and_every_row_lands_once(hub_parquet, tmp_path):
    path, rows = hub_parquet
    report = convert([path], opts_for(tmp_path, shard_records=3))
    meta = schema.read_meta(report.meta_path)
    assert meta.num_records == N_GOOD and len(meta.shards) >= 5
    keys = [entry[3]["sample_key"] for entry in read_records(report.meta_path).values()]
    assert sorted(keys) == sorted(str(r["id"]) for r in rows[:N_GOOD])


def test_tokens_npy_joins_by_row_order_and_a_length_mismatch_is_refused(hub_parquet, tmp_path, capsys):
    path, rows = hub_parquet
    n = len(rows)
    labels = np.zeros((n, 154), np.float32)  # the release's layout and dtype: float ids
    for i in range(n):
        labels[i, :77] = padded(ids_of(f"npy raw {chr(97 + i)}"))  # letters: CLIP splits digits
        labels[i, 77:] = padded(ids_of(f"npy caption {chr(97 + i)}"))
    labels[3, 80] = 0.5  # not an integer: that row is a skip
    npy = tmp_path / "labels.npy"
    np.save(npy, labels)
    out = tmp_path / "out"
    rc = run_data2rec(
        [
            str(path),
            "--image-col",
            "jpg",
            "--key-col",
            "id",
            "--tokens-npy",
            str(npy),
            "--out-dir",
            str(out),
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    records = read_records(out / "train.meta.json")
    for i, row in enumerate(rows):
        if row["jpg"] is None or i == 3 or row.get("name") == "corrupt":
            assert str(row["id"]) not in records
            continue
        raw, cap, _, entry = records[str(row["id"])]
        assert (
            raw.tolist() == labels[i, :77].astype(int).tolist() and cap.tolist() == labels[i, 77:].astype(int).tolist()
        )
        assert entry["raw_text"] == f"npy raw {chr(97 + i)}" and entry["caption_decoded"]
    assert skip_reasons(out)[str(rows[3]["id"])].startswith(
        "bad token ids (caption, --tokens-npy): id 0.5 at position 3"
    )

    np.save(npy, labels[:-1])
    rc = run_data2rec([str(path), "--image-col", "jpg", "--tokens-npy", str(npy), "--out-dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert f"has {n - 1} rows but the inputs have {n} rows" in err
    np.save(npy, labels[:, :100])
    assert run_data2rec([str(path), "--tokens-npy", str(npy), "--out-dir", str(tmp_path / "o3")]) == 2
    assert "shape" in capsys.readouterr().err


def test_show_schema_names_kinds_and_flags(hub_parquet, tmp_path, capsys):
    path, _ = hub_parquet
    assert data2rec.main(["--show-schema", str(path)]) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()[0] != "e.g."}
    assert "HF image struct" in lines["image"] and "--image-col" in lines["image"]
    assert "image bytes" in lines["jpg"] and "token ids" in lines["raw"] and "token ids" in lines["cap"]
    assert "--key-col" in lines["id"]
    assert "--image-col image --text-col raw --caption-col cap --key-col id" in text
    # a manifest of paths: the string column is recognised as image paths
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"file": "a/b.jpg", "title": "t", "blip_caption": "c"}) + "\n")
    assert data2rec.main(["--show-schema", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert (
        "image path" in text
        and "--image-col file --image-root IMAGE_FOLDER --text-col title --caption-col blip_caption" in text
    )


def test_check_token_ids_rules():
    assert check_token_ids(np.array([SOT, 5, EOT] + [0] * 74, np.float64)).tolist() == padded([SOT, 5, EOT])
    assert not check_token_ids([0] * 77).any()  # all padding: an empty text
    for bad, reason in [
        ([5, EOT], "not the start token"),
        ([SOT, -1, EOT], "not a token id"),
        ([SOT, 5, EOT, 7], "after the end token"),
        ([], "not the start token"),
    ]:
        with pytest.raises(BadTokens, match=reason):
            check_token_ids(bad)


def test_a_wrong_image_column_type_is_refused(hub_parquet, tmp_path):
    path, _ = hub_parquet
    with pytest.raises(InputError, match="image column 'raw'"):
        convert([path], opts_for(tmp_path, columns=Columns(image="raw", text="raw", caption="cap")))


def test_packed_parquet_shards_train(hub_parquet, tmp_path):
    import torch

    from alip.config import load_config
    from alip.train.run import train

    path, _ = hub_parquet
    report = convert([path], opts_for(tmp_path / "shards", columns=Columns(image="image", text="raw", caption="cap")))
    run = tmp_path / "run"
    overrides = [f"data.train={report.meta_path}", f"output_dir={run}", "train.max_steps=2", "checkpoint.export=false"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(load_config(ROOT / "configs" / "tiny_cpu.yaml", overrides))
    finally:  # train.deterministic switches the process-wide flag on: restore it for other test files
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    losses = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2] and all(np.isfinite(r["loss"]) for r in losses)


def test_the_published_yfcc15m_form_texts_in_label_layout(tmp_path, capsys):
    """The hub release's form: `images` struct<bytes> and `texts` float32 lists of 77-id texts end to end
    (here three: raw text, caption, a third text), picked with --tokens-col and --token-slots."""
    rows = []
    for i in range(6):
        texts = [padded(ids_of(f"{kind} {chr(97 + i)}")) for kind in ("raw", "caption", "description")]
        rows.append({"images": {"bytes": jpeg_bytes(photo(PHOTOS[i])[::8, ::8])}, "texts": sum(texts, [])})
    rows[5]["texts"] = rows[5]["texts"][:100]  # not whole 77-id texts: a skip
    schema_ = pa.schema([("images", pa.struct([("bytes", pa.binary())])), ("texts", pa.list_(pa.float32()))])
    path = tmp_path / "train-00001-of-01507.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema_), path, row_group_size=2)

    assert data2rec.main(["--show-schema", str(path)]) == 0
    text = capsys.readouterr().out
    assert "--tokens-col (3 texts of 77 ids" in text and "--image-col images --tokens-col texts --out-dir" in text

    out = tmp_path / "out"
    argv = [str(path), "--image-col", "images", "--tokens-col", "texts", "--token-slots", "0,2", "--out-dir", str(out)]
    assert run_data2rec([*argv, "--workers", "1", "--no-progress"]) == 0
    records = read_records(out / "train.meta.json")
    assert sorted(records) == ["0", "1", "2", "3", "4"]
    for key, (raw, cap, jpeg, entry) in records.items():
        i = int(key)
        assert jpeg == rows[i]["images"]["bytes"]
        assert raw.tolist() == padded(ids_of(f"raw {chr(97 + i)}"))
        assert cap.tolist() == padded(ids_of(f"description {chr(97 + i)}"))  # slot 2, not slot 1
        assert entry["caption"] == f"description {chr(97 + i)}" and entry["caption_decoded"]
    assert skip_reasons(out)["5"].startswith("bad token ids (--tokens-col): 100 ids")


def test_workers_in_processes_read_row_groups_and_the_npy(hub_parquet, tmp_path):
    """Spawned workers: samples with parquet locations pickle, each worker maps the .npy itself."""
    path, rows = hub_parquet
    labels = np.zeros((len(rows), 154), np.int64)
    for i in range(len(rows)):
        labels[i, :77], labels[i, 77:] = padded(ids_of("a")), padded(ids_of(f"b {chr(97 + i)}"))
    np.save(tmp_path / "t.npy", labels)
    opts = opts_for(
        tmp_path / "out",
        columns=Columns(image="image", text=None),
        tokens_npy=tmp_path / "t.npy",
        workers=2,
        shard_records=6,
    )
    report = convert([path], opts)
    assert report.num_records == N_GOOD + 3  # the bad-id rows have good .npy ids; corrupt and null images skip
    records = read_records(report.meta_path)
    for key, (_, cap, _, _) in records.items():
        assert cap.tolist() == labels[int(key), 77:].tolist()  # default keys: the row numbers


@pytest.mark.parametrize("image_col", ["image", "jpg"])
def test_parquet_is_read_by_row_group_and_the_index_never_reads_images(hub_parquet, tmp_path, monkeypatch, image_col):
    """Indexing reads only the cheap columns; the workers read their rows by row group, never a whole file."""
    from alip.data.ingest.shard_plan import index_inputs

    path, rows = hub_parquet

    def whole_file(*args, **kwargs):
        raise AssertionError("a whole parquet file was read (ParquetFile.read / read_table)")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    calls = []  # (row group, the columns asked for; None: all of them)
    read_row_group = pq.ParquetFile.read_row_group

    def recording(self, i, columns=None, **kwargs):
        calls.append((i, None if columns is None else tuple(columns)))
        return read_row_group(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", recording)
    groups = pq.ParquetFile(path).num_row_groups
    assert groups == 5  # 19 rows in row groups of 4
    opts = opts_for(tmp_path, columns=Columns(image=image_col, text="raw", caption="cap", key="id"), shard_records=5)

    samples, skips = index_inputs([path], opts)
    assert len(samples) == len(rows) and not skips  # nulls and bad ids are found when the rows are read
    assert sorted(i for i, _ in calls) == list(range(groups))  # each row group once
    for _, cols in calls:
        assert cols is not None and image_col not in cols and not {"raw", "cap"} & set(cols), cols  # only "id"

    calls.clear()
    report = convert([path], opts)
    assert report.num_records == N_GOOD
    packing = [(i, cols) for i, cols in calls if cols is not None and image_col in cols]
    assert {i for i, _ in packing} == set(range(groups))  # every row group's images read, by row group
    assert all(cols is not None for _, cols in calls)  # never every column of a row group
    assert all(set(cols) <= {"id", image_col, "raw", "cap"} for _, cols in calls)
    records = read_records(report.meta_path)
    for row in rows[:N_GOOD]:
        assert records[str(row["id"])][2] == row["jpg"]


def test_tokens_npy_of_77_ids_gives_the_raw_text_alone(hub_parquet, tmp_path):
    """An [N, 77] .npy holds raw text ids only: the caption comes from its own column."""
    path, rows = hub_parquet
    n = len(rows)
    raw = np.array([padded(ids_of(f"only the raw text {chr(97 + i)}")) for i in range(n)], np.int32)
    npy = tmp_path / "raw77.npy"
    np.save(npy, raw)
    out = tmp_path / "out"
    argv = [str(path), "--image-col", "jpg", "--key-col", "id", "--tokens-npy", str(npy), "--caption-col", "cap"]
    assert run_data2rec([*argv, "--out-dir", str(out), "--workers", "1", "--no-progress"]) == 0
    records = read_records(out / "train.meta.json")
    replaced = [r for r in rows[N_GOOD:] if r["name"] in ("big_id", "null_ids")]  # bad only in the raw column
    assert sorted(records) == sorted(str(r["id"]) for r in rows[:N_GOOD] + replaced)
    for i, row in enumerate(rows):
        if str(row["id"]) not in records:
            continue
        r, cap, jpeg, entry = records[str(row["id"])]
        assert r.tolist() == raw[i].tolist() and entry["raw_text"] == f"only the raw text {chr(97 + i)}"
        assert cap.tolist() == expected_row(row["cap"]) and entry["raw_decoded"] and entry["caption_decoded"]
        assert jpeg == row["jpg"]
    reasons = skip_reasons(out)
    by_name = {r["name"]: reasons.get(str(r["id"])) for r in rows[N_GOOD:]}
    assert by_name["big_id"] is None and by_name["null_ids"] is None
    assert by_name["no_end"] == "bad token ids (caption): no end token 49407"


def test_show_schema_of_a_tokens_npy(tmp_path, capsys):
    npy = tmp_path / "labels.npy"
    np.save(npy, np.zeros((3, 154), np.float32))
    assert data2rec.main(["--show-schema", str(npy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{npy} (3 rows)"
    assert lines[2].split() == ["(array", "[3,", "154])", "float32", "token", "ids", "--tokens-npy"]
    assert len(lines) == 3  # no command is suggested from an .npy alone: it joins a manifest
    np.save(npy, np.zeros((3, 100), np.int64))
    assert run_data2rec(["--show-schema", str(npy)]) == 2
    assert "shape (3, 100)" in capsys.readouterr().err


def test_image_struct_without_bytes_follows_its_path(tmp_path):
    """A datasets Image that references a file ({bytes: None, path}) reads the file, relative to the
    parquet's folder or to --image-root; a path that is not there is a reported skip."""
    images = tmp_path / "imgs"
    images.mkdir()
    jpegs = []
    for i in range(3):
        jpegs.append(jpeg_bytes(photo(PHOTOS[i])[::8, ::8]))
        (images / f"{i}.jpg").write_bytes(jpegs[-1])
    rows = [
        {"id": 0, "image": {"bytes": None, "path": "imgs/0.jpg"}, "raw": ids_of("zero")},
        {"id": 1, "image": {"bytes": jpegs[1], "path": "elsewhere/1.jpg"}, "raw": ids_of("one")},  # bytes win
        {"id": 2, "image": {"bytes": None, "path": "imgs/2.jpg"}, "raw": ids_of("two")},
        {"id": 3, "image": {"bytes": None, "path": "imgs/missing.jpg"}, "raw": ids_of("three")},
        {"id": 4, "image": {"bytes": None, "path": None}, "raw": ids_of("four")},
    ]
    schema_ = pa.schema(
        [
            ("id", pa.int64()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("raw", pa.list_(pa.int64())),
        ]
    )
    path = tmp_path / "refs.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema_), path, row_group_size=2)
    columns = Columns(image="image", text="raw", key="id")
    report = convert([path], opts_for(tmp_path / "out", columns=columns, require_caption=False))
    assert report.num_records == 3
    records = read_records(report.meta_path)
    assert {k: v[2] for k, v in records.items()} == {"0": jpegs[0], "1": jpegs[1], "2": jpegs[2]}
    assert records["2"][0].tolist() == padded(ids_of("two"))
    reasons = skip_reasons(tmp_path / "out")
    assert reasons["3"].startswith("unreadable file: ") and reasons["3"].endswith("(imgs/missing.jpg)")
    assert reasons["4"] == "missing field(s) ['image']"

    moved = tmp_path / "moved"
    moved.mkdir()
    path.rename(moved / path.name)  # the paths no longer resolve next to the parquet: --image-root says where
    # the output outside the image root: a folder inside it is refused (an input's folder, see issue 21)
    out2 = tmp_path.with_name(tmp_path.name + "-out2")
    opts = opts_for(out2, columns=columns, require_caption=False, image_root=tmp_path)
    report = convert([moved / path.name], opts)
    assert sorted(read_records(report.meta_path)) == ["0", "1", "2"]
