"""Records with K caption slots (issue 14, part 1): pack, meta "texts", inspect, both loaders, preflight.

K = 3 data is packed by the data2rec CLI from two caption columns and one caption sidecar (the format
tools/caption.py writes); every caption must come back from both loaders as the tokenizer's ids of its
source string, [B, 3, 77]. K = 1 stays the release's 154-float layout, byte for byte.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import ftfy
import numpy as np
import open_clip
import pytest
import torch
from shard_factory import PHOTOS, jpeg_bytes, photo

from alip.config import ConfigError, RunShape, load_config
from alip.data.format import schema
from alip.data.format.recordio import RecordIOError, RecordIOWriter
from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.sources import CaptionSource, Columns
from alip.data.loaders.config import LoaderConfig
from alip.data.loaders.preflight import prepare_dataset, prepare_shards

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
NUM = 7  # samples in the manifest; the last has no "ofa" caption in the sidecar
TEXTS = ["raw", "blip", "llm", "ofa"]


def ids(text: str) -> list[int]:
    return TOKENIZER([ftfy.fix_text(text)])[0].tolist()


def rows() -> list[dict]:
    return [
        {
            "image": f"img{i}.jpg",
            "text": f"raw web text {i}",
            "caption_blip": f"a photo of thing {i}",
            "caption_llm": f"a detailed description of thing number {i} on a table",
        }
        for i in range(NUM)
    ]


def ofa_caption(i: int) -> str:
    return f"ofa says object {i}"


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A JSONL manifest with two caption columns, and an "ofa" caption sidecar as tools/caption.py writes one
    (a header line, then {"key", "path", "caption"}; a failed image gets caption null)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(NUM):
        (folder / f"img{i}.jpg").write_bytes(jpeg_bytes(photo(PHOTOS[i % len(PHOTOS)])))
    manifest = folder / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    entries = [{"meta": {"model": "test"}}]
    entries += [{"key": str(i), "path": f"img{i}.jpg", "caption": ofa_caption(i)} for i in range(NUM - 1)]
    entries.append({"key": str(NUM - 1), "path": f"img{NUM - 1}.jpg", "caption": None, "reason": "failed"})
    sidecar = folder / "ofa.jsonl"
    sidecar.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return manifest, sidecar


def run_tool(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / tool), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """K = 3 shards written by the data2rec CLI: (meta path, {raw text ids: (raw text, [3 caption strings])})."""
    d = tmp_path_factory.mktemp("k3")
    manifest, sidecar = write_inputs(d / "in")
    out = d / "out"
    res = run_tool(
        "tools/data2rec.py",
        manifest,
        "--caption-col",
        "blip=caption_blip",
        "--caption-col",
        "llm=caption_llm",
        "--captions",
        f"ofa={sidecar}",
        "--out-dir",
        out,
        "--shard-records",
        "4",
        "--workers",
        "1",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    expected = {}
    for i, row in enumerate(rows()[: NUM - 1]):
        expected[tuple(ids(row["text"]))] = (row, [row["caption_blip"], row["caption_llm"], ofa_caption(i)])
    return out / "train.meta.json", expected


def test_meta_names_the_slots_and_a_missing_slot_caption_is_a_counted_skip(packed):
    meta_path, expected = packed
    meta = json.loads(meta_path.read_text())
    assert meta["texts"] == TEXTS and meta["num_records"] == NUM - 1
    assert meta["layout"]["header_flag"] == 77 * 4
    assert [f["name"] for f in meta["layout"]["fields"]] == [
        "raw_text_tokens",
        "caption_blip_tokens",
        "caption_llm_tokens",
        "caption_ofa_tokens",
    ]
    assert meta["source"]["skipped_by_reason"] == {"no ofa caption for this sample": 1}
    assert set(meta["source"]["captions"]) == {"blip", "llm", "ofa"}
    skipped = [json.loads(x) for x in (meta_path.parent / "train.skipped.jsonl").read_text().splitlines()]
    assert [Path(s["source"]).name for s in skipped] == [f"img{NUM - 1}.jpg"]
    # the texts sidecar holds every string; "caption" stays the first slot's for K = 1 readers
    for shard in schema.resolve_shards(meta_path):
        for line in Path(shard.texts).read_text().splitlines():
            entry = json.loads(line)
            row, captions = next(v for v in expected.values() if v[0]["text"] == entry["raw_text"])
            assert entry["captions"] == dict(zip(TEXTS[1:], captions, strict=True))
            assert entry["caption"] == captions[0]
            assert entry["captions_truncated"] == {"blip": False, "llm": False, "ofa": False}


def test_records_hold_every_slot_and_the_preflight_passes(packed):
    meta_path, expected = packed
    shards, slots = prepare_dataset(meta_path, full=True)
    assert slots.names == tuple(TEXTS) and sum(s.num_records for s in shards) == NUM - 1
    from alip.data.format.recordio import RecordIOReader

    for shard in shards:
        with RecordIOReader(shard.rec_path, shard.idx_path) as reader:
            for _, record in reader:
                _, raw, caps, _ = schema.parse_record(record, slots)
                assert caps.shape == (3, 77)
                _, captions = expected[tuple(raw.tolist())]
                assert caps.tolist() == [ids(c) for c in captions]
                assert not schema.label_faults(schema.split_record(record, slots)[1], slots)


def test_inspect_rec_shows_every_slot_by_name(packed):
    meta_path, expected = packed
    res = run_tool("tools/inspect_rec.py", meta_path, "-n", "2")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:5]] == TEXTS
    _, captions = next(v for v in expected.values() if v[0]["text"].lower() == lines[1].split(":", 1)[1].strip())
    assert lines[2].split(":", 1)[1].strip() == captions[0].lower()
    assert lines[4].split(":", 1)[1].strip() == captions[2].lower()
    res = run_tool("tools/inspect_rec.py", meta_path, "--check", "--deep")
    assert res.returncode == 0 and "2/2 shards ok, 6 records" in res.stdout, res.stdout + res.stderr


def _check_batches(batches, expected) -> int:
    seen = 0
    for batch in batches:
        assert batch["caption"].dtype == torch.int64 and batch["caption"].shape[1:] == (3, 77)
        assert batch["text"].shape[1:] == (77,)
        for raw, caps in zip(batch["text"].tolist(), batch["caption"].tolist(), strict=True):
            _, captions = expected[tuple(raw)]
            assert caps == [ids(c) for c in captions]
            seen += 1
    return seen


def test_torch_loader_yields_k_captions(packed, one_thread):
    from alip.data.loaders.torch_loader import TorchLoader

    meta_path, expected = packed
    config = LoaderConfig(batch_size=2, image_size=32, num_workers=0)
    loader = TorchLoader(meta_path, config, train=False, rank=0, world_size=1, device="cpu")
    assert loader.slots.captions == ("blip", "llm", "ofa")
    assert _check_batches(loader, expected) == NUM - 1
    loader.close()


def test_dali_loader_yields_k_captions(packed):
    from alip.data.loaders.dali import DaliLoader

    meta_path, expected = packed
    config = LoaderConfig(batch_size=4, image_size=32, num_threads=1)
    loader = DaliLoader(meta_path, config, train=False, rank=0, world_size=1, device="cpu")
    assert _check_batches(loader, expected) == NUM - 1
    loader.close()


def test_the_trainer_takes_k_caption_slots_and_checks_the_weights_against_them(packed, tmp_path):
    """Part 2 trains on them (tests/test_multi_caption_loss.py); weights naming other slots are refused."""
    from alip.train.trainer import Trainer

    meta_path, _ = packed
    base = [f"data.train={meta_path}", "data.num_workers=0", f"output_dir={tmp_path}", "train.deterministic=false"]
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [*base, "loss.caption_weights={blip: 1, llm: 2}"])
    with pytest.raises(ConfigError, match=r"names \['blip', 'llm'\], but data.train .* slots \['blip', 'llm', 'ofa'\]"):
        Trainer(cfg, RunShape(1, 2, 2), tmp_path, torch.device("cpu"))
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", base)
    trainer = Trainer(cfg, RunShape(1, 2, 2), tmp_path, torch.device("cpu"))
    assert trainer.loss_fn.caption_sources == ("blip", "llm", "ofa")
    trainer.loader.close()


# ---------------------------------------------------------------- K = 1 unchanged


def _k1_options(out: Path, folder: Path, **kw) -> ConvertOptions:
    return ConvertOptions(
        out_dir=out, image_root=folder, columns=Columns(caption="caption_blip"), workers=1, progress=False, **kw
    )


def test_k1_named_slot_writes_the_same_records_as_before(tmp_path):
    manifest, _ = write_inputs(tmp_path / "in")
    plain = convert([manifest], _k1_options(tmp_path / "plain", tmp_path / "in"))
    named = convert([manifest], _k1_options(tmp_path / "named", tmp_path / "in", caption_name="blip"))
    for a, b in zip(schema.resolve_shards(plain.meta_path), schema.resolve_shards(named.meta_path), strict=True):
        assert Path(a.rec).read_bytes() == Path(b.rec).read_bytes()
        assert Path(a.texts).read_text() == Path(b.texts).read_text()  # the K = 1 keys, no "captions"
        assert "captions" not in Path(a.texts).read_text()
    meta_plain, meta_named = (json.loads(r.meta_path.read_text()) for r in (plain, named))
    assert meta_plain["texts"] == ["raw", "caption"] and meta_named["texts"] == ["raw", "blip"]
    assert meta_plain["layout"] == meta_named["layout"] == schema.LAYOUT
    # the plan's fingerprint (what lets a rerun resume) is the one of a run made before caption slots
    assert (tmp_path / "plain/train.plan.json").read_text() == (tmp_path / "named/train.plan.json").read_text()


def test_k1_cli_plain_caption_col_keeps_todays_behaviour(tmp_path):
    manifest, _ = write_inputs(tmp_path / "in")
    res = run_tool(
        "tools/data2rec.py", manifest, "--caption-col", "caption_blip", "--out-dir", tmp_path / "out", "--workers", "1"
    )
    assert res.returncode == 0, res.stderr
    reference = convert([manifest], _k1_options(tmp_path / "ref", tmp_path / "in"))
    cli = schema.resolve_shards(tmp_path / "out/train.meta.json")
    for a, b in zip(schema.resolve_shards(reference.meta_path), cli, strict=True):
        assert Path(a.rec).read_bytes() == Path(b.rec).read_bytes()


def test_a_meta_without_texts_reads_as_k1(shards):
    meta = json.loads(shards.meta.read_text())
    assert "texts" not in meta  # as written before caption slots existed
    resolved = schema.resolve_dataset(shards.meta)
    assert {slots for _, slots in resolved} == {schema.TextSlots()}
    checks, slots = prepare_dataset(shards.meta)
    assert slots.num_captions == 1 and slots.label_length == 154 and len(checks) == 3


# ---------------------------------------------------------------- the preflight and the label helpers


def write_k_shard(folder: Path, stem: str, k: int, num: int = 3) -> tuple[Path, list[np.ndarray]]:
    """A shard of `num` records with K caption slots (caption j of record r: [49406, 100 * j + r, 49407])."""
    folder.mkdir(parents=True, exist_ok=True)
    rec, idx = folder / f"{stem}.rec", folder / f"{stem}.idx"
    jpeg = jpeg_bytes(photo("astronaut")[::8, ::8])
    captions = []
    with RecordIOWriter(rec, idx) as w:
        for r in range(num):
            raw = np.zeros(77, np.int64)
            raw[:3] = [49406, 1000 + r, 49407]
            caps = np.zeros((k, 77), np.int64)
            for j in range(k):
                caps[j, :3] = [49406, 100 * j + r, 49407]
            w.write(r, schema.make_record(r, jpeg, raw, caps if k > 1 else caps[0]))
            captions.append(caps)
    return rec, captions


def write_meta(folder: Path, rec: Path, texts: list[str] | None) -> Path:
    info = schema.ShardInfo(
        rec.name, rec.with_suffix(".idx").name, 3, rec.stat().st_size, hashlib.sha256(rec.read_bytes()).hexdigest()
    )
    path = folder / "train.meta.json"
    schema.write_meta(path, schema.DatasetMeta([info], {"name": "test"}, texts=texts))
    return path


@pytest.mark.parametrize("check", ["quick", "full", "deep"])
def test_a_label_length_disagreeing_with_the_meta_fails_the_preflight(tmp_path, check):
    rec, _ = write_k_shard(tmp_path, "train-00000", k=2)
    meta = write_meta(tmp_path, rec, None)  # no "texts": K = 1, but the records hold 2 captions
    kw = {"full": check == "full", "deep": check == "deep"}
    pattern = r"train-00000\.rec: record key \d at byte \d+: label has 231 floats, expected 154"
    with pytest.raises(RecordIOError, match=pattern + r".*the meta JSON names 2 texts \['raw', 'caption'\]"):
        prepare_shards(meta, **kw)
    meta = write_meta(tmp_path, rec, ["raw", "a", "b", "c"])  # K = 3 promised, K = 2 written
    with pytest.raises(RecordIOError, match=r"train-00000\.rec: record key \d .*label has 231 floats, expected 308"):
        prepare_shards(meta, **kw)
    meta = write_meta(tmp_path, rec, ["raw", "a", "b"])
    assert prepare_dataset(meta, **kw)[1].captions == ("a", "b")


def test_shards_without_meta_take_k_from_the_header_and_must_agree(tmp_path):
    rec, captions = write_k_shard(tmp_path / "k2", "x-00000", k=2)
    checks, slots = prepare_dataset(rec)
    assert slots.names == ("raw", "caption_1", "caption_2") and checks[0].num_records == 3
    other, _ = write_k_shard(tmp_path / "k2", "x-00001", k=1)
    with pytest.raises(RecordIOError, match=r"x-00001\.rec: records have 1 caption slot.*but .*x-00000\.rec has 2"):
        prepare_dataset(str(tmp_path / "k2" / "x-*.rec"))
    from alip.data.loaders.torch_loader import TorchLoader

    loader = TorchLoader(rec, LoaderConfig(batch_size=3, image_size=16, num_workers=0), train=False, device="cpu")
    batch = next(iter(loader))
    assert batch["caption"].tolist() == [c.tolist() for c in captions]


def test_label_helpers_with_k_slots():
    slots = schema.TextSlots(("raw", "blip", "llm"))
    raw = np.zeros(77, np.int64)
    raw[:2] = [49406, 49407]
    caps = np.zeros((2, 77), np.int64)
    caps[:, 0], caps[:, 1] = 49406, 49407
    label = schema.encode_label(raw, caps)
    assert label.shape == (231,) and label.dtype == np.float32
    got_raw, got_caps = schema.decode_label(label[None], slots)  # [1, 77], [1, 2, 77]
    assert got_raw.shape == (1, 77) and got_caps.shape == (1, 2, 77) and (got_caps[0] == caps).all()
    label[77 + 77 + 5] = -3.0
    assert schema.token_fault(label, slots)[1].startswith("llm caption token 5 is -3.0")
    assert schema.label_faults(label[:154], slots) == ["label has 154 floats, expected 231"]
    label[77 + 77 + 5] = 0
    label[77] = 5
    assert schema.label_faults(label, slots) == ["blip caption starts with token 5, not the start token 49406"]
    with pytest.raises(ValueError, match="expected 231"):
        schema.decode_label(np.zeros(154, np.float32), slots)
    with pytest.raises(ValueError, match="distinct"):
        schema.TextSlots(("raw", "a", "a"))
    # K = 1 keeps its names and messages
    assert schema.TextSlots().labels() == schema.SLOTS and schema.TextSlots().layout() == schema.LAYOUT


def test_data2rec_refuses_unclear_caption_sources(tmp_path):
    manifest, sidecar = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    res = run_tool(
        "tools/data2rec.py", manifest, "--caption-col", "caption_blip", "--caption-col", "x", "--out-dir", out
    )
    assert res.returncode == 2 and "give each a slot name" in res.stderr
    res = run_tool(
        "tools/data2rec.py", manifest, "--caption-col", "a=caption_blip", "--captions", sidecar, "--out-dir", out
    )
    assert res.returncode == 2 and "have no slot name" in res.stderr
    res = run_tool(
        "tools/data2rec.py",
        manifest,
        "--caption-col",
        "a=caption_blip",
        "--caption-col",
        "a=caption_llm",
        "--out-dir",
        out,
    )
    assert res.returncode == 2 and "given more than once" in res.stderr


def test_token_id_columns_fill_a_slot(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    write_inputs(folder)
    table = [dict(r, llm_ids=[t for t in ids(r["caption_llm"]) if t]) for r in rows()]
    manifest = folder / "m.parquet"
    pq.write_table(pa.Table.from_pylist(table), manifest)
    opts = ConvertOptions(
        out_dir=tmp_path / "out",
        columns=Columns(caption="caption_blip"),
        caption_name="blip",
        more_captions=(CaptionSource("llm", column="llm_ids"),),
        workers=1,
        progress=False,
    )
    report = convert([manifest], opts)
    assert report.num_records == NUM
    checks, slots = prepare_dataset(report.meta_path)
    from alip.data.format.recordio import RecordIOReader

    by_raw = {tuple(ids(r["text"])): r for r in rows()}
    for shard in checks:
        with RecordIOReader(shard.rec_path, shard.idx_path) as reader:
            for _, record in reader:
                _, raw, caps, _ = schema.parse_record(record, slots)
                row = by_raw[tuple(raw.tolist())]
                assert caps.tolist() == [ids(row["caption_blip"]), ids(row["caption_llm"])]
    entries = [
        json.loads(x) for s in schema.resolve_shards(report.meta_path) for x in Path(s.texts).read_text().splitlines()
    ]
    assert all(e["captions_decoded"] == {"blip": False, "llm": True} for e in entries)
    assert {e["captions"]["llm"] for e in entries} == {r["caption_llm"] for r in rows()}


def test_the_published_yfcc15m_form_gives_named_slots_from_the_token_column(tmp_path):
    """The hub release's `texts`: raw text, OFA caption and LLM description end to end, 231 ids a row;
    --token-slots 0,ofa=1,llm=2 packs all three (K = 2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [[f"raw {i}", f"ofa caption {i}", f"llm description {i}"] for i in range(4)]
    rows = [
        {"images": {"bytes": jpeg_bytes(photo(PHOTOS[i])[::8, ::8])}, "texts": sum((ids(t) for t in texts[i]), [])}
        for i in range(4)
    ]
    schema_ = pa.schema([("images", pa.struct([("bytes", pa.binary())])), ("texts", pa.list_(pa.int64()))])
    path = tmp_path / "part.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema_), path, row_group_size=2)
    out = tmp_path / "out"
    args = [path, "--image-col", "images", "--tokens-col", "texts", "--token-slots", "0,ofa=1,llm=2"]
    res = run_tool("tools/data2rec.py", *args, "--out-dir", out, "--workers", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "train.meta.json").read_text())
    assert meta["texts"] == ["raw", "ofa", "llm"] and meta["num_records"] == 4
    checks, slots = prepare_dataset(out / "train.meta.json")
    from alip.data.format.recordio import RecordIOReader

    with RecordIOReader(checks[0].rec_path, checks[0].idx_path) as reader:
        for _, record in reader:
            _, raw, caps, _ = schema.parse_record(record, slots)
            i = int(TOKENIZER.decode(raw[1:3].tolist()).split()[-1])
            assert raw.tolist() == ids(texts[i][0]) and caps.tolist() == [ids(t) for t in texts[i][1:]]
    entry = json.loads(Path(schema.resolve_shards(out / "train.meta.json")[0].texts).read_text().splitlines()[0])
    assert entry["captions_decoded"] == {"ofa": True, "llm": True} and entry["captions"]["llm"].startswith("llm")
    res = run_tool("tools/data2rec.py", *args[:-1], "0,1,2", "--out-dir", tmp_path / "o2")
    assert res.returncode == 2 and "name each" in res.stderr
