"""tools/data2rec.py and alip.data.ingest.convert on small real inputs with planted bad ones."""

import hashlib
import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import ftfy
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from shard_factory import PHOTOS, jpeg_bytes, photo, read_packed

from alip.data.format import schema
from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.sources import Columns, InputError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
LONG_TEXT = " ".join(f"word{i}" for i in range(200))


def png_bytes(img, mode):
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def write_manifest(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A manifest of good images and every kind of bad input. Returns (manifest, image dir, bad names)."""
    d = tmp_path_factory.mktemp("planted")
    img = d / "img"
    img.mkdir()
    rows = []

    def add(name, data, text=None, caption=None):
        if data is not None:
            (img / name).write_bytes(data)
        rows.append({"image": name, "text": text or f"raw text of {name}", "caption": caption or f"a photo, {name}"})

    for i in range(12):
        add(f"good{i}.jpg", jpeg_bytes(photo(PHOTOS[i % len(PHOTOS)])))
    good = jpeg_bytes(photo("astronaut"))
    add("corrupt.jpg", good[: len(good) // 2])  # truncated mid-scan
    add("garbage.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    add("zero.jpg", b"")
    add("missing.jpg", None)
    add("bomb.png", png_bytes(np.zeros((3000, 3000, 3), np.uint8), "L"))  # 9 Mpx, tiny file
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:32, ..., 3] = 255  # top half opaque red, bottom half fully transparent
    add("alpha.png", png_bytes(rgba, "RGBA"))
    add("gray.png", png_bytes(photo("camera"), "L"))
    add("gray.jpg", jpeg_bytes(np.asarray(Image.fromarray(photo("coffee")).convert("L"))))
    add("empty_text.jpg", jpeg_bytes(photo("chelsea")), text=" ")
    add("long_text.jpg", jpeg_bytes(photo("rocket")), text=LONG_TEXT, caption="Ünïcödé café ✓ " + LONG_TEXT)
    rows[-3]["text"] = ""
    manifest = write_manifest(d / "manifest.jsonl", rows)
    bad = {"corrupt.jpg", "garbage.jpg", "zero.jpg", "missing.jpg", "bomb.png"}
    return manifest, img, bad, rows


def opts_for(out, **kw):
    kw.setdefault("columns", Columns(caption="caption"))
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return ConvertOptions(out_dir=out, **kw)


def read_all(meta_path):
    """{sample source: (record key, raw tokens, caption tokens, jpeg, entry)} over all shards of a meta."""
    out = read_packed(meta_path, "source")
    assert len(out) == schema.read_meta(meta_path).num_records
    return out


def test_planted_bad_inputs_are_reported_and_the_rest_is_clean(planted, tmp_path):
    manifest, img, bad, rows = planted
    report = convert([manifest], opts_for(tmp_path, image_root=img, shard_records=5, max_pixels=5_000_000))
    skipped = [json.loads(line) for line in (tmp_path / "train.skipped.jsonl").read_text().splitlines()]
    assert {Path(s["source"]).name for s in skipped} == bad
    reasons = {Path(s["source"]).name: s["reason"] for s in skipped}
    assert reasons["zero.jpg"] == "empty file (0 bytes)" and reasons["missing.jpg"] == "missing file"
    assert reasons["bomb.png"].startswith("decompression bomb: 3000x3000")
    assert reasons["corrupt.jpg"].startswith("corrupt or unreadable image")
    assert not any(" at 0x" in r for r in reasons.values())  # no memory addresses: reports are reproducible
    assert report.num_records + len(skipped) == report.num_inputs == len(rows)

    records = read_all(report.meta_path)
    assert {Path(s).name for s in records} == {r["image"] for r in rows} - bad
    for source, (_, raw, cap, jpeg, entry) in records.items():
        row = next(r for r in rows if r["image"] == Path(source).name)
        assert entry["raw_text"] == row["text"] and entry["caption"] == row["caption"]
        assert raw.tolist() == TOKENIZER([ftfy.fix_text(row["text"])])[0].tolist()
        assert cap.tolist() == TOKENIZER([ftfy.fix_text(row["caption"])])[0].tolist()
        decoded = Image.open(io.BytesIO(jpeg))
        assert decoded.format == "JPEG" and decoded.mode in ("RGB", "L")
    by_name = {Path(s).name: v for s, v in records.items()}
    assert by_name["good0.jpg"][3] == (img / "good0.jpg").read_bytes()  # RGB JPEG passes through unchanged
    alpha = np.asarray(Image.open(io.BytesIO(by_name["alpha.png"][3])))
    assert alpha.shape == (64, 64, 3)
    assert np.abs(alpha[8, 8].astype(int) - [200, 0, 0]).max() < 12  # opaque red stays red
    assert alpha[56, 8].min() > 240  # transparent -> white, not black
    gray = np.asarray(Image.open(io.BytesIO(by_name["gray.png"][3])).convert("RGB")).astype(int)
    assert gray.shape[2] == 3 and np.abs(gray[..., 0] - gray[..., 1]).max() <= 2
    raw_long, cap_long = by_name["long_text.jpg"][1], by_name["long_text.jpg"][2]
    assert raw_long[-1] == 49407 and cap_long[-1] == 49407  # truncated to 77, ending with the end token
    assert by_name["empty_text.jpg"][1][:3].tolist() == [49406, 49407, 0]
    meta = json.loads(report.meta_path.read_text())
    assert meta["source"]["stats"]["truncated_raw_text"] == 1 and meta["source"]["stats"]["empty_raw_text"] == 2
    assert meta["tokenizer"]["context_length"] == 77 and meta["layout"]["header_flag"] == 154


def test_official_release_texts_give_the_release_tokens(tmp_path):
    """Raw texts and captions of the MXNet-written fixture tokenise to exactly its labels."""
    samples = json.loads((ROOT / "tests/fixtures/mxnet/alip_official_samples.json").read_text())
    (tmp_path / "img").mkdir()
    rows = []
    for s in samples:
        name = s["image"].rsplit(".", 1)[0] + ".jpg"
        (tmp_path / "img" / name).write_bytes(jpeg_bytes(photo("coffee")))
        rows.append({"image": name, "text": s["raw_text"], "caption": s["caption"], "id": s["record_index"]})
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    report = convert(
        [manifest],
        opts_for(tmp_path / "out", image_root=tmp_path / "img", columns=Columns(caption="caption", key="id")),
    )
    got = {v[4]["sample_key"]: v for v in read_all(report.meta_path).values()}
    for s in samples:
        _, raw, cap, _, _ = got[str(s["record_index"])]
        assert raw.tolist() == s["raw_tokens"] and cap.tolist() == s["caption_tokens"], s["image"]


@pytest.mark.slow
def test_global_shuffle_is_seeded_and_output_is_deterministic(planted, tmp_path):
    manifest, img, _, _ = planted
    digests = []
    for run, (seed, workers) in enumerate([(0, 1), (0, 2), (1, 1)]):
        out = tmp_path / f"run{run}"
        convert([manifest], opts_for(out, image_root=img, shard_records=4, seed=seed, workers=workers))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("train-*.rec"))])
    assert digests[0] == digests[1]  # 1 or 2 worker processes: byte-identical shards
    assert digests[0] != digests[2]  # another seed: another order
    keys_in_order = [
        json.loads(line)["sample_key"] for line in (tmp_path / "run0/train-00000.texts.jsonl").read_text().splitlines()
    ]
    assert keys_in_order != sorted(keys_in_order, key=int)  # shuffled across the whole dataset


@pytest.mark.slow
def test_kill_midway_and_rerun_gives_the_clean_result(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i in range(240):  # re-encoded (max-side) so the run lasts long enough to be killed midway
        name = f"{i}.jpg"
        if i < len(PHOTOS):
            (img / name).write_bytes(jpeg_bytes(photo(PHOTOS[i])))
        else:
            (img / name).symlink_to(img / f"{i % len(PHOTOS)}.jpg")
        rows.append({"image": name, "text": f"text {i}", "caption": f"caption {i}"})
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    cmd = [sys.executable, str(ROOT / "tools/data2rec.py"), str(manifest), "--image-root", str(img)]
    cmd += ["--caption-col", "caption", "--shard-records", "6", "--workers", "1", "--max-side", "200", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out-dir", str(killed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(killed.glob("*.done.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "data2rec ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(killed.glob("*.done.json")))
    assert done_at_kill < 40 and not (killed / "train.meta.json").exists()  # really interrupted

    assert subprocess.run([*cmd, "--out-dir", str(killed)], capture_output=True).returncode == 0
    clean = tmp_path / "clean"
    assert subprocess.run([*cmd, "--out-dir", str(clean)], capture_output=True).returncode == 0
    resumed, fresh = read_all(killed / "train.meta.json"), read_all(clean / "train.meta.json")
    assert len(fresh) == 240 and resumed.keys() == fresh.keys()
    for source, (key, raw, cap, jpeg, _) in fresh.items():
        r = resumed[source]
        assert r[0] == key and np.array_equal(r[1], raw) and np.array_equal(r[2], cap) and r[3] == jpeg
    assert not list(killed.glob("*.tmp"))


def test_img2dataset_tars_with_a_caption_sidecar(tmp_path):
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(5):
            key = f"{i:09d}"
            members = {
                f"{key}.jpg": jpeg_bytes(photo(PHOTOS[i])),
                f"{key}.txt": f"web text {i}".encode(),
                f"{key}.json": json.dumps({"key": key, "caption": f"web text {i}"}).encode(),
            }
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sidecar = tmp_path / "captions.jsonl"
    lines = [{"meta": {"model": "test"}}] + [
        {"key": f"{i:09d}", "caption": f"a synthetic caption {i}"} for i in range(4)
    ]
    sidecar.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = convert([tar_path], opts_for(tmp_path / "out", columns=Columns(), captions=sidecar))
    records = read_all(report.meta_path)
    assert report.num_records == 4 and dict(report.skipped) == {"no caption for this sample": 1}
    for _, _raw, cap, jpeg, entry in records.values():
        i = int(entry["sample_key"])
        assert entry["caption"] == f"a synthetic caption {i}" and entry["raw_text"] == f"web text {i}"
        assert cap.tolist() == TOKENIZER([f"a synthetic caption {i}"])[0].tolist()
        assert jpeg == jpeg_bytes(photo(PHOTOS[i]))


def test_shards_cut_by_size(planted, tmp_path):
    manifest, img, bad, rows = planted
    sizes = [p.stat().st_size for p in img.glob("good*.jpg")]
    report = convert([manifest], opts_for(tmp_path, image_root=img, shard_bytes=2 * max(sizes), max_pixels=5_000_000))
    meta = schema.read_meta(report.meta_path)
    assert len(meta.shards) >= len(rows) // 3
    assert all(s.bytes <= 2 * max(sizes) + 4096 for s in meta.shards)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools/data2rec.py"), *map(str, args)], capture_output=True, text=True
    )


def test_cli_errors_are_clear_and_non_zero(planted, tmp_path):
    manifest, img, _, _ = planted
    res = run_cli(manifest, "--image-root", img, "--caption-col", "cap", "--out-dir", tmp_path / "a")
    assert res.returncode == 2 and "column(s) ['cap'] not found" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "empty.tsv").write_text("image\ttext\tcaption\n")
    res = run_cli(tmp_path / "empty.tsv", "--caption-col", "caption", "--out-dir", tmp_path / "b")
    assert res.returncode == 2 and "has no rows" in res.stderr
    res = run_cli(manifest, "--image-root", img, "--out-dir", tmp_path / "c")
    assert res.returncode == 2 and "no caption source" in res.stderr
    allbad = write_manifest(tmp_path / "bad.jsonl", [{"image": "zero.jpg", "text": "t", "caption": "c"}] * 1)
    res = run_cli(allbad, "--image-root", img, "--caption-col", "caption", "--out-dir", tmp_path / "d")
    assert res.returncode == 2 and "failed" in res.stderr and (tmp_path / "d/train.skipped.jsonl").exists()
    assert "--shard-records" in run_cli("--help").stdout


def test_rerun_with_other_inputs_refuses_to_mix_plans(planted, tmp_path):
    manifest, img, _, _ = planted
    convert([manifest], opts_for(tmp_path, image_root=img))
    with pytest.raises(InputError, match="pass --overwrite"):
        convert([manifest], opts_for(tmp_path, image_root=img, seed=5))
    convert([manifest], opts_for(tmp_path, image_root=img, seed=5, overwrite=True))
    assert json.loads((tmp_path / "train.meta.json").read_text())["source"]["seed"] == 5


def test_dali_reads_the_shards_of_a_run_with_planted_bad_inputs_end_to_end(planted, tmp_path):
    from alip.data.loaders.config import LoaderConfig
    from alip.data.loaders.dali import DaliLoader

    manifest, img, bad, rows = planted
    report = convert([manifest], opts_for(tmp_path, image_root=img, shard_records=5, max_pixels=5_000_000))
    records = read_all(report.meta_path)
    by_tokens = {(tuple(raw.tolist()), tuple(cap.tolist())): entry for _, raw, cap, _, entry in records.values()}
    config = LoaderConfig(batch_size=4, image_size=64, num_threads=1)
    loader = DaliLoader(report.meta_path, config, train=False, rank=0, world_size=1, device="cpu")
    seen = []
    for batch in loader:  # eval mode: the last batch is short, nothing is repeated
        assert batch["image"].shape[1:] == (3, 64, 64) and len(batch["image"]) <= 4
        assert torch.isfinite(batch["image"]).all()
        for raw, cap in zip(batch["text"].tolist(), batch["caption"].tolist(), strict=True):
            entry = by_tokens[(tuple(raw), tuple(cap))]  # each row is one of the records data2rec wrote
            seen.append(entry["key"])
    loader.close()
    assert sorted(seen) == sorted(v[0] for v in records.values()) and len(records) == len(rows) - len(bad)


@pytest.mark.parametrize("fmt", ["tsv", "csv", "parquet"])
def test_every_manifest_format_and_a_parquet_sidecar(planted, tmp_path, fmt):
    _, img, _, _ = planted
    rows = [{"path": f"good{i}.jpg", "title": f"title, with comma {i}", "uid": f"u{i}"} for i in range(4)]
    captions = [{"path": f"good{i}.jpg", "caption": f"caption {i}"} for i in range(4)]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        manifest = tmp_path / "m.parquet"
        pq.write_table(pa.Table.from_pylist(rows), manifest)
        sidecar = tmp_path / "caps.parquet"
        pq.write_table(pa.Table.from_pylist(captions), sidecar)
    else:
        import csv

        manifest = tmp_path / f"m.{fmt}"
        with open(manifest, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
        sidecar = tmp_path / "caps.jsonl"
        sidecar.write_text("".join(json.dumps(c) + "\n" for c in captions))
    cols = Columns(image="path", text="title", key="uid")
    report = convert([manifest], opts_for(tmp_path / "out", image_root=img, columns=cols, captions=sidecar))
    got = {v[4]["sample_key"]: v[4] for v in read_all(report.meta_path).values()}
    assert got.keys() == {"u0", "u1", "u2", "u3"}
    assert all(got[f"u{i}"]["raw_text"] == f"title, with comma {i}" for i in range(4))
    assert all(got[f"u{i}"]["caption"] == f"caption {i}" for i in range(4))
    with pytest.raises(
        InputError, match=r"column\(s\) \['text'\] not found; the manifest has \['path', 'title', 'uid'\]"
    ):
        convert([manifest], opts_for(tmp_path / "bad", image_root=img, columns=Columns(image="path"), captions=sidecar))


def test_pil_own_bomb_guard_is_reported_and_not_disabled():
    from alip.data.format.images import BadImage, prepare_image

    buf = io.BytesIO()
    Image.new("1", (15000, 13000)).save(buf, format="PNG")  # 195 Mpx: over PIL's 2 x MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match="decompression bomb"):
        prepare_image(buf.getvalue(), max_pixels=10**12)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # importing alip changes no process-wide PIL setting
