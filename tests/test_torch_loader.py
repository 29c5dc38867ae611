"""alip.data.loaders.torch_loader.TorchLoader (the DALI-free fallback) and LoaderConfig."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from shard_factory import OFFICIAL, OFFICIAL_REC, photo
from torchvision import transforms as T

from alip.data.format import schema
from alip.data.format.recordio import RecordIOError, RecordIOWriter
from alip.data.loaders.config import LoaderConfig, steps_per_epoch
from alip.data.loaders.torch_loader import TorchLoader


def config(**kw) -> LoaderConfig:
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", 64)
    kw.setdefault("num_workers", 0)
    return LoaderConfig(**kw)


def pixels(batch_image: torch.Tensor, cfg: LoaderConfig) -> torch.Tensor:
    return batch_image * torch.tensor(cfg.std).view(3, 1, 1) + torch.tensor(cfg.mean).view(3, 1, 1)


def reference_eval_image(jpeg: bytes, size: int) -> torch.Tensor:
    with Image.open(io.BytesIO(jpeg)) as im:
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])(im.convert("RGB"))


def test_batches_follow_the_contract_and_hold_the_source_records(shards):
    cfg = config(batch_size=8)
    loader = TorchLoader(shards.meta, cfg, train=False)
    assert len(loader) == 3
    keys = []
    for batch in loader:
        assert set(batch) == {"image", "text", "caption"}
        assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["text"].shape == (8, 77) and batch["text"].dtype == torch.int64
        assert batch["caption"].shape == (8, 77) and batch["caption"].dtype == torch.int64
        for i in range(8):
            key = int(batch["text"][i, 1]) - 1000
            keys.append(key)
            assert torch.equal(batch["text"][i], torch.from_numpy(shards.raw_tokens[key]))
            assert torch.equal(batch["caption"][i], torch.from_numpy(shards.caption_tokens[key]))
            ref = reference_eval_image(shards.jpegs[key], 64)
            assert torch.allclose(pixels(batch["image"][i], cfg), ref, atol=1e-5)
    assert keys == shards.keys and loader.epoch == 1


def test_original_release_rec_tokens():
    loader = TorchLoader(OFFICIAL_REC, config(batch_size=4), train=False)
    rows = [b for b in loader]
    text = torch.cat([b["text"] for b in rows])
    caption = torch.cat([b["caption"] for b in rows])
    for i, sample in enumerate(OFFICIAL):
        assert text[i].tolist() == sample["raw_tokens"] and caption[i].tolist() == sample["caption_tokens"]


@pytest.mark.parametrize(("num_workers", "batch_size"), [(0, 5), (2, 4)])
def test_two_ranks_cover_every_record_once_per_epoch_in_equal_steps(shards, num_workers, batch_size):
    """last_batch=pad (the release): every record once per epoch plus padding; drop: tests/test_loader_batches.py."""
    cfg = config(batch_size=batch_size, num_workers=num_workers, last_batch="pad")
    loaders = [TorchLoader(shards.meta, cfg, rank=r, world_size=2) for r in range(2)]
    steps = steps_per_epoch(24, batch_size, 2, "pad")
    assert [len(loader) for loader in loaders] == [steps, steps]
    orders = []
    for _ in range(2):
        seen, order = set(), []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == steps and all(len(b["text"]) == batch_size for b in batches)
            keys = [int(k) - 1000 for b in batches for k in b["text"][:, 1]]
            seen |= set(keys)
            order += keys
        assert seen == set(shards.keys)
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled every epoch
    for loader in loaders:
        loader.close()


def test_resumed_loader_yields_identical_batches(shards, tmp_path):
    cfg = config(batch_size=4, image_size=32, seed=5)
    original = TorchLoader(shards.meta, cfg, train=True)
    it = iter(original)
    for _ in range(4):
        next(it)
    torch.save(original.state_dict(), tmp_path / "state.pt")
    expected = list(it) + list(original)  # rest of epoch 0, then epoch 1
    resumed = TorchLoader(shards.meta, cfg, train=True)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    got = list(resumed) + list(resumed)
    assert len(got) == len(expected) == 2 + 6
    for a, b in zip(expected, got, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(photo("camera")[..., 0], mode="L").save(buf, format="JPEG", quality=95)
    raw = np.zeros(77, np.int64)
    raw[:3] = [49406, 1000, 49407]
    with RecordIOWriter(tmp_path / "gray.rec", tmp_path / "gray.idx") as w:
        w.write(0, schema.make_record(0, buf.getvalue(), raw, raw))
    cfg = config(batch_size=1)
    image = next(iter(TorchLoader(tmp_path / "gray.rec", cfg, train=False)))["image"][0]
    assert image.shape == (3, 64, 64)
    rgb = pixels(image, cfg)
    assert torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(rgb[1], rgb[2], atol=1e-5)


def test_bad_shards_and_inputs_give_clear_errors(shards, tmp_path):
    rec = tmp_path / "cut.rec"
    rec.write_bytes(shards.meta.with_name("train-00000.rec").read_bytes()[:5000])
    rec.with_suffix(".idx").write_bytes(shards.meta.with_name("train-00000.idx").read_bytes())
    with pytest.raises(RecordIOError, match=r"cut\.rec"):
        TorchLoader(rec, config())
    with pytest.raises(FileNotFoundError, match="no .rec files match"):
        TorchLoader(str(tmp_path / "none-*.rec"), config())
    with pytest.raises(FileNotFoundError, match="shard meta not found"):
        TorchLoader(tmp_path / "missing.meta.json", config())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"random_area": (0.9, 0.5)}, "random_area"),
        ({"random_area": (0.5,)}, "random_area"),
        ({"random_aspect_ratio": (0.0, 1.0)}, "random_aspect_ratio"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"num_workers": -1}, "num_workers"),
        ({"shuffle_buffer": 0}, "shuffle_buffer"),
        ({"crop_attempts": 0}, "crop_attempts"),
        ({"last_batch": "repeat"}, "last_batch"),
    ],
)
def test_loader_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LoaderConfig(**{"batch_size": 4, **kw})


def test_config_and_fallback_import_neither_dali_nor_torchvision_needlessly():
    code = (
        "import sys, alip.data, alip.data.loaders.config, alip.data.format.recordio, alip.data.format.schema\n"
        "assert 'torchvision' not in sys.modules, 'loader_config imports torchvision'\n"
        "import alip.data.loaders.torch_loader\n"
        "assert not [m for m in sys.modules if m.startswith('nvidia.dali')], 'DALI imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_workers_read_every_record_intact_after_the_parent_opened_a_handle(shards):
    """Forked workers must open their own handles: a shared file offset would interleave their seeks."""
    loader = TorchLoader(shards.meta, config(num_workers=2, batch_size=3), train=False)
    loader.dataset[(0, -1)]  # opens a handle in this process before the workers fork
    keys = []
    for batch in loader:
        for row, cap in zip(batch["text"], batch["caption"], strict=True):
            key = int(row[1]) - 1000
            keys.append(key)
            assert torch.equal(cap, torch.from_numpy(shards.caption_tokens[key]))
    assert keys == shards.keys
    loader.close()
