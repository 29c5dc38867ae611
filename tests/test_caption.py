"""tools/caption.py and alip.caption with a tiny randomly initialised BLIP saved in the test (no downloads)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it: nothing may be fetched

import importlib.util
import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import ftfy
import open_clip
import pytest
import torch
from dist_harness import join_rank_env, run_ranks
from shard_factory import PHOTOS, jpeg_bytes, photo

from alip.caption.captioner import Captioner, DecodeSettings, ModelLoadError
from alip.caption.run import CaptionOptions, caption_inputs, merge_parts
from alip.caption.sidecar import (
    CaptionEntry,
    PartWriter,
    SidecarError,
    merge,
    part_path,
    read_sidecar,
)
from alip.cli import guarded
from alip.data.format import schema
from alip.data.format.images import decode_image
from alip.data.format.recordio import RecordIOReader
from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.sources import read_caption_sidecar, read_sidecar_header
from alip.data.loaders.preflight import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "a an the photo picture of dog cat man woman child on in with at near beach street table room "
    "red blue green white black and sitting standing running holding two some small large"
).split()
# greedy, so runs are deterministic; min_length > 0 because a random model often ends at once
GREEDY = DecodeSettings(num_beams=1, min_length=3, max_length=10)
GREEDY_CLI = ["--num-beams", "1", "--min-length", "3", "--max-length", "10", "--no-progress"]
BAD = {"corrupt.jpg": "corrupt or unreadable image", "zero.jpg": "empty file (0 bytes)"}


def save_tiny_blip(folder: Path) -> Path:
    """A randomly initialised BLIP (1-layer ViT on 32x32 inputs, 1-layer text decoder) + a 40-word tokenizer."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    # initializer_range 0.2 instead of 0.02: with the default the random model ignores the image
    # and writes the same words for every photo, which would hide a caption landing on the wrong key
    config = BlipConfig(
        vision_config=dict(**small, image_size=32, patch_size=8, initializer_range=0.2),
        text_config=dict(
            **small,
            vocab_size=len(tok),
            max_position_embeddings=64,
            encoder_hidden_size=32,
            bos_token_id=tok.cls_token_id,
            pad_token_id=tok.pad_token_id,
            sep_token_id=tok.sep_token_id,
            eos_token_id=tok.sep_token_id,
            initializer_range=0.2,
        ),
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A manifest of the six skimage photos plus a truncated JPEG and a zero-byte file. (manifest, image dir)"""
    d = tmp_path_factory.mktemp("photos")
    (d / "img").mkdir()
    rows = []
    for name in PHOTOS:
        (d / "img" / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name)))
        rows.append({"image": f"{name}.jpg", "text": f"web text about {name}"})
    good = jpeg_bytes(photo("astronaut"))
    (d / "img/corrupt.jpg").write_bytes(good[: len(good) // 3])
    (d / "img/zero.jpg").write_bytes(b"")
    rows += [{"image": "corrupt.jpg", "text": "t"}, {"image": "zero.jpg", "text": "t"}]
    return write_manifest(d / "manifest.jsonl", rows), d / "img"


@pytest.fixture(scope="module")
def clean(tiny_blip, photos, tmp_path_factory):
    """One clean single-process run over `photos`: (sidecar path, report, {image name: caption})."""
    torch.set_num_threads(1)
    manifest, img = photos
    out = tmp_path_factory.mktemp("clean") / "caps.jsonl"
    captioner = Captioner.from_pretrained(str(tiny_blip), GREEDY)
    report = caption_inputs([manifest], captioner, CaptionOptions(out, image_root=img, batch_size=3, workers=0))
    _, entries = read_sidecar(out)
    return out, report, {e.path: e.caption for e in entries}


def test_sidecar_has_one_entry_per_image_failures_with_reasons(clean, photos, tiny_blip):
    out, report, _ = clean
    meta, entries = read_sidecar(out)
    assert [e.key for e in entries] == [str(i) for i in range(len(PHOTOS) + 2)]  # data2rec's row-number keys
    by_path = {e.path: e for e in entries}
    for name in PHOTOS:
        caption = by_path[f"{name}.jpg"].caption
        assert caption and set(caption.split()) <= set(WORDS), caption
    for name, reason in BAD.items():
        assert by_path[name].caption is None and by_path[name].reason.startswith(reason)
    assert len({by_path[f"{n}.jpg"].caption for n in PHOTOS}) >= 4  # captions depend on the image
    assert meta["captioner"] == {
        "model": str(tiny_blip),
        "model_class": "BlipForConditionalGeneration",
        "dtype": "float32",
        "prompt": "",
        "num_beams": 1,
        "max_length": 10,
        "min_length": 3,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 3,
        "strip_prompt": True,
    }
    assert (meta["num_samples"], meta["num_captioned"], meta["num_failed"]) == (8, 6, 2)
    assert meta["failures"] == {"corrupt or unreadable image": 1, "empty file (0 bytes)": 1}
    assert report.merged.num_samples == 8 and not list(out.parent.glob("*.part*"))  # parts merged away
    # the batched run gives what the model says about each image alone (no mix-up inside a batch)
    captioner = Captioner.from_pretrained(str(tiny_blip), GREEDY)
    for name in PHOTOS:
        image = decode_image((photos[1] / f"{name}.jpg").read_bytes(), max_pixels=10**8)
        pixels = captioner.image_processor(images=image, return_tensors="pt")["pixel_values"]
        assert captioner.caption(pixels) == [by_path[f"{name}.jpg"].caption], name


def test_data2rec_joins_the_sidecar_and_the_shards_hold_its_tokens(clean, photos, tmp_path):
    out, _, captions = clean
    by_key, by_path = read_caption_sidecar(out)  # data2rec's own reader
    assert len(by_key) == len(by_path) == len(PHOTOS)
    manifest, img = photos
    opts = ConvertOptions(out_dir=tmp_path / "rec", image_root=img, captions=out, workers=1, progress=False)
    report = convert([manifest], opts)
    assert report.num_records == len(PHOTOS)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    seen = set()
    for shard in schema.resolve_shards(report.meta_path):
        texts = [json.loads(line) for line in Path(shard.texts).read_text().splitlines()]
        with RecordIOReader(shard.rec, shard.idx) as reader:
            for (_, record), entry in zip(reader, texts, strict=True):
                _, _, cap_tokens, _ = schema.parse_record(record)
                name = Path(entry["source"]).name
                assert entry["caption"] == captions[name]
                assert cap_tokens.tolist() == tokenizer([ftfy.fix_text(captions[name])])[0].tolist()
                seen.add(name)
    assert seen == {f"{n}.jpg" for n in PHOTOS}
    skipped = {json.loads(line)["source"] for line in (tmp_path / "rec/train.skipped.jsonl").read_text().splitlines()}
    assert {Path(s).name for s in skipped} == set(BAD)  # the failures: "no caption", as documented


def _run_cli(*args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "tools/caption.py"), *map(str, args)], **kw)


def test_kill_midway_and_rerun_gives_every_key_once(clean, tiny_blip, tmp_path):
    _, _, clean_captions = clean
    (tmp_path / "img").mkdir()
    for name in PHOTOS:
        (tmp_path / "img" / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name)))
    rows = []
    for i in range(90):  # links to the six photos: long enough to be killed midway
        name = f"{i:03d}.jpg"
        (tmp_path / "img" / name).symlink_to(tmp_path / "img" / f"{PHOTOS[i % len(PHOTOS)]}.jpg")
        rows.append({"image": name, "id": f"id{i}"})
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "caps.jsonl"
    cmd = [manifest, "--image-root", tmp_path / "img", "--key-col", "id", "--out", out, "--model", tiny_blip]
    cmd += [*GREEDY_CLI, "--batch-size", "2", "--workers", "1"]  # workers=1: decoding in a DataLoader worker
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = _run_cli(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    part = part_path(out, 0)
    deadline = time.monotonic() + 120
    while not part.exists() or part.read_text().count("\n") < 7:  # header + 3 batches
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    _, before = read_sidecar(part)
    assert 6 <= len(before) < len(rows)  # really interrupted midway
    with open(part, "a") as f:
        f.write('{"key": "id89", "capt')  # and as if the kill had torn a write

    rerun = _run_cli(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr.decode()
    assert f"({len(before)} from earlier runs)" in stdout.decode()  # finished samples were not redone
    meta, entries = read_sidecar(out)
    assert [e.key for e in entries] == [r["id"] for r in rows]  # all, once each, in input order
    assert not list(tmp_path.glob("caps.jsonl.part*")) and meta["num_samples"] == len(rows)
    for i, e in enumerate(entries):  # the same captions as a clean run gives for these photos
        assert e.caption == clean_captions[f"{PHOTOS[i % len(PHOTOS)]}.jpg"], e


def _rank_worker(rank, port, model, manifest, img, out):
    join_rank_env(rank, 2, port)
    from alip.distributed import init_distributed

    init_distributed(timeout_s=120)
    captioner = Captioner.from_pretrained(model, GREEDY)
    report = caption_inputs([Path(manifest)], captioner, CaptionOptions(Path(out), Path(img), batch_size=2, workers=0))
    Path(f"{out}.rank{rank}").write_text(json.dumps([report.captioned, report.failed, report.merged is not None]))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_same_sidecar_as_one(clean, photos, tiny_blip, tmp_path):
    out = tmp_path / "caps.jsonl"
    run_ranks(_rank_worker, (str(tiny_blip), str(photos[0]), str(photos[1]), str(out)), nprocs=2, timeout=180)
    reports = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    assert [r[0] + r[1] for r in reports] == [4, 4] and [r[2] for r in reports] == [True, False]
    assert out.read_bytes() == clean[0].read_bytes()  # deterministic (greedy) and independent of the world size


def test_tars_parquet_sidecar_and_prompt(tiny_blip, tmp_path):
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(3):
            for name, data in {f"{i:09d}.jpg": jpeg_bytes(photo(PHOTOS[i])), f"{i:09d}.txt": b"web"}.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "caps.parquet"
    settings = DecodeSettings(prompt="a photo of", num_beams=2, min_length=2, max_length=6)
    captioner = Captioner.from_pretrained(str(tiny_blip), settings)
    caption_inputs([tar_path], captioner, CaptionOptions(out, batch_size=2, workers=0, progress=False))
    meta, entries = read_sidecar(out)
    assert meta["captioner"]["prompt"] == "a photo of" and meta["captioner"]["num_beams"] == 2
    assert read_sidecar_header(out) == meta  # data2rec's header reader (recorded per slot in the meta JSON)
    assert [(e.key, e.path) for e in entries] == [(f"{i:09d}", None) for i in range(3)]
    by_key, by_path = read_caption_sidecar(out)  # what data2rec --captions reads
    assert sorted(by_key) == [f"{i:09d}" for i in range(3)] and not by_path
    for caption in by_key.values():  # the echoed prompt is cut off; 2 to 6 generated words remain
        assert not caption.startswith("a photo of") and 2 <= len(caption.split()) <= 6, caption


def test_resume_refuses_other_settings_and_other_inputs(clean, tiny_blip, photos, tmp_path):
    manifest, img = photos
    out = tmp_path / "caps.jsonl"
    out.write_bytes(clean[0].read_bytes())
    beam = Captioner.from_pretrained(str(tiny_blip), DecodeSettings(num_beams=2, min_length=3, max_length=10))
    with pytest.raises(SidecarError, match="other settings"):
        caption_inputs([manifest], beam, CaptionOptions(out, image_root=img, workers=0, progress=False))
    greedy = Captioner.from_pretrained(str(tiny_blip), GREEDY)
    other = write_manifest(tmp_path / "other.jsonl", [{"image": "chelsea.jpg", "id": "x"}])
    with pytest.raises(SidecarError, match="not in these inputs"):
        caption_inputs([other], greedy, CaptionOptions(out, image_root=img, key_col="id", workers=0, progress=False))
    report = caption_inputs([manifest], greedy, CaptionOptions(out, image_root=img, workers=0, progress=False))
    assert report.already_done == 8 and report.captioned + report.failed == 0  # complete: nothing redone
    assert out.read_bytes() == clean[0].read_bytes()


def test_torn_last_line_is_ignored_and_cut_before_appending(tmp_path):
    part = tmp_path / "caps.jsonl.part00000.jsonl"
    with PartWriter(part, {"captioner": {"model": "m"}}) as w:
        w.write([CaptionEntry("0", "a dog", "0.jpg"), CaptionEntry("1", None, "1.jpg", "missing file")])
    with open(part, "a") as f:
        f.write('{"key": "2", "path": "2.jpg", "caption": "a ca')
    meta, entries = read_sidecar(part)
    assert meta == {"captioner": {"model": "m"}} and [e.key for e in entries] == ["0", "1"]
    with PartWriter(part, {"captioner": {"model": "m"}}) as w:  # reopening cuts the torn line, no second header
        w.write([CaptionEntry("2", "a cat", "2.jpg")])
    lines = part.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1]) == {"key": "2", "path": "2.jpg", "caption": "a cat"}
    part.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(SidecarError, match="only the last line may be torn"):
        read_sidecar(part)


def test_merge_checks_gaps_duplicates_and_strays(tmp_path):
    out = tmp_path / "caps.jsonl"
    header = {"captioner": {"model": "m"}}
    expected = [("0", "0.jpg"), ("1", "1.jpg"), ("2", "2.jpg")]
    with PartWriter(part_path(out, 0), header) as w:
        w.write([CaptionEntry("0", "a dog", "0.jpg")])
    with PartWriter(part_path(out, 1), header) as w:
        w.write([CaptionEntry("1", "a cat", "1.jpg")])
    with pytest.raises(SidecarError, match="1 of 3 samples have no caption entry"):
        merge(out, expected, header)
    with PartWriter(part_path(out, 3), header) as w:  # a part of a run with another world size
        w.write([CaptionEntry("2", None, "2.jpg", "missing file"), CaptionEntry("9", "x", "9.jpg")])
    with pytest.raises(SidecarError, match="not in the inputs"):
        merge(out, expected, header)
    with PartWriter(part_path(out, 2), header) as w:
        w.write([CaptionEntry("0", "a dog", "0.jpg")])
    with pytest.raises(SidecarError, match="'0' occurs twice"):
        merge(out, expected, header)
    part_path(out, 2).unlink()
    part_path(out, 3).write_text(json.dumps({"meta": header}) + "\n" + '{"key": "2", "caption": null}\n')
    report = merge(out, expected, header)
    assert (report.num_samples, report.num_captioned, report.num_failed) == (3, 2, 1)
    assert [e.key for e in read_sidecar(out)[1]] == ["0", "1", "2"] and not list(tmp_path.glob("*.part*"))


def _load_cli():
    spec = importlib.util.spec_from_file_location("caption_cli", ROOT / "tools/caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_model_and_uncached_hub_name_are_clear_errors(photos, tmp_path, capsys):
    with pytest.raises(ModelLoadError, match="model folder not found: ./no/such/model"):
        Captioner.from_pretrained("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        Captioner.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set, so nothing is downloaded"):
        Captioner.from_pretrained("alip-tests/not-a-cached-model")
    cli = _load_cli()
    manifest, img = photos
    argv = [str(manifest), "--image-root", str(img), "--out", str(tmp_path / "c.jsonl"), "--model", "/no/such/dir"]
    main = guarded(cli.main)  # as `python tools/caption.py` runs it: a user error is exit status 2
    assert main(argv) == 2
    assert "error: model folder not found: /no/such/dir" in capsys.readouterr().err
    assert main([str(manifest), "--out", str(tmp_path / "c.jsonl"), "--merge"]) == 2
    assert "nothing to merge" in capsys.readouterr().err
    with pytest.raises(SidecarError, match="nothing to merge"):
        merge_parts([manifest], CaptionOptions(tmp_path / "c.jsonl"))


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_prompts_two_sidecars_join_as_two_named_caption_slots(clean, photos, tiny_blip, tmp_path):
    """Several caption sources: tools/caption.py once per prompt, data2rec joins the sidecars as slots a, b."""
    first, _, _ = clean  # the run without a prompt
    manifest, img = photos
    second = tmp_path / "prompted.jsonl"
    argv = [str(manifest), "--image-root", str(img), "--out", str(second), "--model", str(tiny_blip)]
    assert _load_tool("caption").main([*argv, *GREEDY_CLI, "--prompt", "a picture of", "--workers", "0"]) == 0
    out = tmp_path / "rec"
    argv = [str(manifest), "--image-root", str(img), "--captions", f"a={first}", "--captions", f"b={second}"]
    assert _load_tool("data2rec").main([*argv, "--out-dir", str(out), "--workers", "1", "--no-progress"]) == 0

    by_path = [read_caption_sidecar(p)[1] for p in (first, second)]  # {image path: caption} of each run
    assert any(by_path[0][f"{n}.jpg"] != by_path[1][f"{n}.jpg"] for n in PHOTOS)  # the prompt changed captions
    meta = json.loads((out / "train.meta.json").read_text())
    assert meta["texts"] == ["raw", "a", "b"] and meta["num_records"] == len(PHOTOS)
    assert meta["source"]["captions"] == {"a": str(first), "b": str(second)}
    # which captioner settings filled which slot, from each sidecar's header
    captioners = meta["source"]["captioners"]
    assert (captioners["a"]["prompt"], captioners["b"]["prompt"]) == ("", "a picture of")
    assert captioners["a"] == read_sidecar(first)[0]["captioner"]
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    shards, slots = prepare_dataset(out / "train.meta.json", full=True)
    assert slots.names == ("raw", "a", "b")
    seen = set()
    for shard in shards:
        texts = [json.loads(line) for line in shard.rec_path.with_suffix(".texts.jsonl").read_text().splitlines()]
        with RecordIOReader(shard.rec_path, shard.idx_path) as reader:
            for (_, record), entry in zip(reader, texts, strict=True):
                _, _, caps, _ = schema.parse_record(record, slots)  # [K = 2, 77]
                name = Path(entry["source"]).name
                want = [by_path[0][name], by_path[1][name]]
                assert caps.tolist() == tokenizer([ftfy.fix_text(c) for c in want]).tolist()
                assert entry["captions"] == {"a": want[0], "b": want[1]}
                seen.add(name)
    assert seen == {f"{n}.jpg" for n in PHOTOS}  # the two unreadable images: no caption in either, skipped
