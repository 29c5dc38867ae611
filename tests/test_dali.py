"""alip.data.loaders.dali.DaliLoader on the CPU: record contents, sharding, resume, bad shards, bad inputs."""

import io
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_factory import OFFICIAL, OFFICIAL_REC, assert_same_batches, jpeg_bytes, photo, take_batches
from torchvision.transforms import functional as F

from alip.data.format import schema
from alip.data.format.recordio import MAGIC, RecordIOError, RecordIOReader, RecordIOWriter, read_idx
from alip.data.loaders.config import LoaderConfig
from alip.data.loaders.dali import DaliLoader


def config(**kw) -> LoaderConfig:
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", 64)
    kw.setdefault("num_threads", 2)
    kw.setdefault("shuffle_buffer", 8)
    return LoaderConfig(**kw)


def pixels(batch_image: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    """Undo the normalisation: [..., 3, H, W] back to RGB in [0, 1]."""
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return batch_image * std + mean


def reference_eval_image(jpeg: bytes, size: int) -> torch.Tensor:
    """PIL decode + the eval geometry as DALI computes it: [3, size, size] RGB in [0, 1].

    DALI's resize_shorter rounds the longer side and its centre crop rounds the anchor half up
    (torchvision truncates both), so the reference does the same: otherwise a one-pixel shift
    would swamp the decoder comparison.
    """
    with Image.open(io.BytesIO(jpeg)) as im:
        image = im.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = math.floor(w * scale + 0.5), math.floor(h * scale + 0.5)
    image = F.resize(image, [new_h, new_w])
    top, left = math.floor((new_h - size) / 2 + 0.5), math.floor((new_w - size) / 2 + 0.5)
    return F.to_tensor(image.crop((left, top, left + size, top + size)))


def assert_close_image(got: torch.Tensor, jpeg: bytes, cfg: LoaderConfig) -> None:
    ref = reference_eval_image(jpeg, cfg.image_size)
    diff = (pixels(got, cfg) - ref).abs().mean().item() * 255
    # JPEG decoders and resamplers differ by about 0.1-0.8 levels; BGR order would be 25-70 levels off.
    assert diff < 3, f"mean abs difference {diff:.2f}/255 from a PIL decode of the same JPEG"


def epoch(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(b) for b in loader]


def test_eval_batches_hold_the_source_tokens_and_images(shards):
    cfg = config(batch_size=8)
    loader = DaliLoader(shards.meta, cfg, train=False)
    assert len(loader) == 3
    batches = epoch(loader)
    assert len(batches) == 3 and loader.epoch == 1
    keys = []
    for batch in batches:
        assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["text"].shape == (8, 77) and batch["text"].dtype == torch.int64
        assert batch["caption"].shape == (8, 77) and batch["caption"].dtype == torch.int64
        assert batch["image"].device.type == "cpu"
        for i in range(8):
            key = int(batch["text"][i, 1]) - 1000
            keys.append(key)
            assert torch.equal(batch["text"][i], torch.from_numpy(shards.raw_tokens[key]))
            assert torch.equal(batch["caption"][i], torch.from_numpy(shards.caption_tokens[key]))
            assert_close_image(batch["image"][i], shards.jpegs[key], cfg)
    assert keys == shards.keys  # eval mode reads the shards in order


@pytest.mark.parametrize("last_batch", ["drop", "pad"])
def test_original_release_rec_reads_with_its_tokens_and_images(last_batch):
    cfg = config(batch_size=4, image_size=96, last_batch=last_batch)
    loader = DaliLoader(OFFICIAL_REC, cfg, train=False)
    assert len(loader) == 2
    batches = epoch(loader)
    text = torch.cat([b["text"] for b in batches])
    caption = torch.cat([b["caption"] for b in batches])
    images = torch.cat([b["image"] for b in batches])
    with RecordIOReader(OFFICIAL_REC) as reader:
        jpegs = [schema.parse_record(record)[3] for _, record in reader]
    for i, sample in enumerate(OFFICIAL):  # 7 records
        assert text[i].tolist() == sample["raw_tokens"], sample["image"]
        assert caption[i].tolist() == sample["caption_tokens"], sample["image"]
        h, w, _ = sample["image_shape_hwc"]
        with Image.open(io.BytesIO(jpegs[i])) as im:
            assert im.size == (w, h)
        assert_close_image(images[i], jpegs[i], cfg)
    if last_batch == "pad":  # the release's reader repeats the last sample
        assert len(text) == 8 and text[7].tolist() == OFFICIAL[6]["raw_tokens"]
    else:  # eval mode never drops: the last batch is short
        assert [len(b["text"]) for b in batches] == [4, 3]


@pytest.mark.parametrize(
    ("spec", "num_records", "batch_size", "steps"),
    [("shards", 24, 5, 3), ("official", 7, 3, 2)],
)
def test_two_ranks_cover_every_record_once_per_epoch_in_equal_steps(shards, spec, num_records, batch_size, steps):
    """last_batch=pad (the release): every record once per epoch plus padding; drop: tests/test_loader_batches.py."""
    source = shards.meta if spec == "shards" else OFFICIAL_REC
    cfg = config(batch_size=batch_size, last_batch="pad")
    loaders = [DaliLoader(source, cfg, train=True, rank=r, world_size=2) for r in range(2)]
    assert [len(loader) for loader in loaders] == [steps, steps]
    for _ in range(2):  # DALI moves each rank to the other half in the second epoch
        seen = []
        for loader in loaders:
            batches = epoch(loader)
            assert len(batches) == steps
            rows = torch.cat([b["text"] for b in batches])
            seen.append({tuple(row.tolist()) for row in rows})
            assert len(rows) == steps * batch_size
        assert seen[0].isdisjoint(seen[1])
        assert len(seen[0] | seen[1]) == num_records


@pytest.mark.parametrize("consumed", [5, 6])  # mid-epoch, and exactly at the end of epoch 0
def test_restored_loader_yields_identical_batches(shards, consumed, tmp_path):
    cfg = config(batch_size=4, image_size=32, seed=3)
    assert cfg.shuffle
    original = DaliLoader(shards.meta, cfg, train=True)
    assert len(original) == 6
    take = take_batches
    take(original, consumed)
    state = original.state_dict()
    torch.save({"loader": state}, tmp_path / "ckpt.pt")
    expected = take(original, 20)

    resumed = DaliLoader(shards.meta, cfg, train=True)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["loader"])
    assert (resumed.epoch, resumed.step) == (state["epoch"], state["step"])
    assert_same_batches(expected, take(resumed, 20))
    # Shuffling and augmentation were on: the order is not the file order, and a record seen in
    # two epochs comes back cropped or flipped differently.
    keys = [row[1].item() - 1000 for b in expected for row in b["text"]]
    assert keys[:24] != sorted(keys[:24])
    images = torch.cat([b["image"] for b in expected])
    first, again = keys.index(keys[-1]), len(keys) - 1
    assert first != again and not torch.equal(images[first], images[again])


def test_state_from_another_rank_is_refused(shards):
    cfg = config()
    state = DaliLoader(shards.meta, cfg, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="rank=0"):
        DaliLoader(shards.meta, cfg, rank=1, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("train", [True, False])
def test_shuffle_buffer_reaches_the_reader(shards, monkeypatch, train):
    """data.shuffle_buffer is DALI's initial_fill (the release: 16384). The torch loader has no buffer:
    it draws a full permutation per epoch (alip.data.loaders.torch_loader)."""
    from nvidia.dali import fn

    calls = []
    reader = fn.readers.mxnet

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return reader(*args, **kwargs)

    monkeypatch.setattr(fn.readers, "mxnet", recording)
    loader = DaliLoader(shards.meta, config(shuffle_buffer=123), train=train, device="cpu")
    assert [(c["initial_fill"], c["random_shuffle"], c["pad_last_batch"]) for c in calls] == [(123, train, True)]
    assert len(next(iter(loader))["text"]) == 4


def copy_shards(shards, dest: Path) -> Path:
    shutil.copytree(shards.meta.parent, dest)
    return dest / shards.meta.name


def test_truncated_shard_is_reported_with_its_file(shards, tmp_path):
    meta = copy_shards(shards, tmp_path / "s")
    rec = tmp_path / "s" / "train-00001.rec"
    offsets = [offset for _, offset in read_idx(rec.with_suffix(".idx"))]
    with open(rec, "r+b") as f:
        f.truncate(offsets[4] + 100)  # in the middle of the fifth record
    with pytest.raises(RecordIOError, match=r"train-00001\.rec.*truncated"):
        DaliLoader(meta, config())


def test_mismatched_idx_is_reported_with_its_file(shards, tmp_path):
    meta = copy_shards(shards, tmp_path / "s")
    # Same record count, wrong offsets: shard 1's index beside shard 0's records.
    shutil.copy(tmp_path / "s" / "train-00001.idx", tmp_path / "s" / "train-00000.idx")
    with pytest.raises(RecordIOError, match=r"train-00000"):
        DaliLoader(meta, config())
    # A record missing from the .idx: the meta JSON's count no longer matches.
    idx = tmp_path / "s" / "train-00002.idx"
    idx.write_text("".join(idx.read_text().splitlines(keepends=True)[:-1]))
    shutil.copy(shards.meta.parent / "train-00000.idx", tmp_path / "s" / "train-00000.idx")
    with pytest.raises(RecordIOError, match=r"train-00002\.idx: 3 records, but the meta JSON says 4"):
        DaliLoader(meta, config())


def test_wrong_inputs_give_clear_errors(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="no .rec files match"):
        DaliLoader(str(tmp_path / "nothing-*.rec"), config())
    with pytest.raises(FileNotFoundError, match="shard meta not found"):
        DaliLoader(tmp_path / "missing.meta.json", config())
    with pytest.raises(ValueError, match="rank"):
        DaliLoader(shards.meta, config(), rank=2, world_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            DaliLoader(shards.meta, config(), device="cuda")


def write_shard(path: Path, jpegs: list[bytes]) -> None:
    with RecordIOWriter(path, path.with_suffix(".idx")) as w:
        for key, jpeg in enumerate(jpegs):
            raw = np.zeros(77, np.int64)
            raw[:3] = [49406, 1000 + key, 49407]
            cap = np.zeros(77, np.int64)
            cap[:3] = [49406, 2000 + key, 49407]
            w.write(key, schema.make_record(key, jpeg, raw, cap))


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    gray = photo("camera")[..., 0]  # [H, W]
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="JPEG", quality=95)
    write_shard(tmp_path / "gray.rec", [buf.getvalue()])
    cfg = config(batch_size=1)
    batch = next(iter(DaliLoader(tmp_path / "gray.rec", cfg, train=False)))
    image = batch["image"][0]
    assert image.shape == (3, 64, 64)
    rgb = pixels(image, cfg)
    assert torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(rgb[1], rgb[2], atol=1e-5)
    assert_close_image(image, buf.getvalue(), cfg)


def test_record_split_into_parts_reads_intact(tmp_path):
    """dmlc-core splits a record where its data holds the magic number at an aligned offset."""
    raw = np.zeros(77, np.int64)
    raw[:3] = [49406, 1000, 49407]
    img = photo("coffee")
    for pad in range(4):  # shift the magic in the JPEG comment until it sits 4-aligned in the record
        comment = b"x" * pad + struct.pack("<I", MAGIC) * 2
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90, comment=comment)
        write_shard(tmp_path / "split.rec", [jpeg_bytes(img), buf.getvalue()])
        with RecordIOReader(tmp_path / "split.rec") as reader:
            if len(reader.parts(reader.index[1][1])[0]) > 1:
                break
    else:
        pytest.fail("could not place the magic number at an aligned offset")
    cfg = config(batch_size=2, image_size=128)
    batch = next(iter(DaliLoader(tmp_path / "split.rec", cfg, train=False)))
    assert batch["text"][:, 1].tolist() == [1000, 1001]
    assert batch["caption"][:, 1].tolist() == [2000, 2001]
    assert_close_image(batch["image"][1], buf.getvalue(), cfg)
