"""Every on-disk format, written here and read back by alip.eval.datasets, scored with a model whose
answer is known: a stub that maps an image to its class's (or caption key's) text embedding.

Loader + features + metrics then give exactly 100% zero-shot top-1 and R@1; the same stub with a
shifted mapping (every image gets the NEXT key's embedding, a derangement) gives exactly 0.
The writers are imported by the other test_eval modules.
"""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import ToTensor

import alip
from alip.eval.datasets import DatasetNotFoundError, load_classification
from alip.eval.retrieval import evaluate_retrieval
from alip.eval.retrieval_formats import load_retrieval
from alip.eval.zeroshot import evaluate_zeroshot

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# one CLIP BPE token each (checked by the stub), so the stub can spot them inside any prompt or caption
RETRIEVAL_KEYS = ["apple", "bicycle", "castle", "dolphin", "elephant", "forest", "guitar", "harbor", "island"]
CAPTIONS = [
    "a photo of a {}.",
    "there is a {} in this picture",
    "the {}, seen from the left",
    "close-up of one {} outdoors",
    "my favourite {} ever",
]  # 5 captions per image


pytestmark = pytest.mark.usefixtures("one_thread")


def key_image(key: int, size: int = 8) -> Image.Image:
    """A solid image whose red channel is the key: ToTensor gives x[0, 0, 0] = key / 255 exactly."""
    return Image.new("RGB", (size, size), (key, 17, 200))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless, so the key survives
    return buf.getvalue()


class KeyStub(nn.Module):
    """encode_image: key read from the pixels -> table[shift(key)]; encode_text: the row's key word -> table[key]."""

    def __init__(self, words: list[str], shift: int = 0, dim: int = 32):
        super().__init__()
        tokenizer = alip.get_tokenizer("ALIP-Tiny")
        ids = tokenizer(words)
        assert (ids[:, 2] == 49407).all(), "every key word must be one BPE token"
        self.register_buffer("word_ids", ids[:, 1].clone())  # [K]
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("table", q[: len(words)].contiguous())  # [K, dim] orthonormal rows
        self.shift = shift

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        key = torch.round(x[:, 0, 0, 0] * 255).long()  # [B]
        return self.table[(key + self.shift) % len(self.table)]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        hits = (tokens[:, :, None] == self.word_ids[None, None, :]).any(dim=1)  # [B, K]
        assert (hits.sum(dim=1) == 1).all(), "each text must name exactly one key"
        return self.table[hits.float().argmax(dim=1)]


def tokenizer(texts):
    return alip.get_tokenizer("ALIP-Tiny")(texts)


# ------------------------------------------------------------------------------------------------
# writers of the real layouts


def write_cifar10(root: Path, per_batch: int = 10, n_test: int = 30) -> Path:
    """CIFAR-10's python pickle layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.
    Image i of a file has label i % 10 and red channel = its label (the stub's key)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n: int, offset: int) -> dict:
        labels = [(offset + i) % 10 for i in range(n)]
        data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        data[:, 0] = np.array(labels, dtype=np.uint8)[:, None, None]
        data[:, 1] = np.random.default_rng(offset).integers(0, 256, (n, 32, 32), dtype=np.uint8)
        return {"batch_label": "synthetic", "labels": labels, "data": data.reshape(n, -1), "filenames": []}

    for k in range(1, 6):
        with open(folder / f"data_batch_{k}", "wb") as f:
            pickle.dump(batch(per_batch, k), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test, 0), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return root


@pytest.fixture
def cifar_without_md5(monkeypatch):
    """torchvision checks the md5 of the real CIFAR files (against corrupt downloads); ours differ."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())


def write_imagefolder(root: Path, classes: list[str], per_class: list[int]) -> Path:
    """<root>/<class>/*.png plus classnames.txt; folders named c00, c01, ... (sorted = class order)."""
    for c, n in enumerate(per_class):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(n):
            key_image(c).save(root / f"c{c:02d}" / f"{i}.png")
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    return root


def write_wds_classification(root: Path, classes: list[str], labels: list[int], split: str = "test") -> Path:
    """CLIP_benchmark webdataset layout: <split>/nshards.txt, <split>/0.tar ({key}.png + {key}.cls),
    classnames.txt, zeroshot_classification_templates.txt."""
    (root / split).mkdir(parents=True)
    (root / split / "nshards.txt").write_text("1\n")
    with tarfile.open(root / split / "0.tar", "w") as tar:
        for i, label in enumerate(labels):
            for ext, payload in (("png", png_bytes(key_image(label))), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nan image of the {c}.\n")
    return root


def _retrieval_images(root: Path, n: int) -> list[str]:
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(n):
        key_image(k).save(root / "images" / f"img{k}.png")
        names.append(f"img{k}.png")
    return names


def write_karpathy(root: Path, n: int = len(RETRIEVAL_KEYS), extra_train: int = 2) -> Path:
    """dataset_coco.json (Karpathy) with `n` test images (5 captions each) under images/, plus train
    images that the test split must leave out."""
    names = _retrieval_images(root, n)
    entries = [
        {
            "filepath": "images",
            "filename": name,
            "split": "test",
            "sentences": [{"raw": c.format(RETRIEVAL_KEYS[k]), "tokens": []} for c in CAPTIONS],
        }
        for k, name in enumerate(names)
    ]
    entries += [
        {"filepath": "images", "filename": "missing.png", "split": "train", "sentences": [{"raw": "x"}]}
    ] * extra_train
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return path


def write_coco_annotations(root: Path, n: int = len(RETRIEVAL_KEYS)) -> Path:
    """CLIP_benchmark's coco_test_karpathy.json (COCO captions format), captions listed interleaved."""
    names = _retrieval_images(root, n)
    images = [{"id": 100 + k, "file_name": f"images/{name}"} for k, name in enumerate(names)]
    anns = [
        {"id": j * n + k, "image_id": 100 + k, "caption": c.format(RETRIEVAL_KEYS[k])}
        for j, c in enumerate(CAPTIONS)
        for k in range(n)
    ]
    path = root / "coco_test_karpathy.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def write_flickr_annotations(root: Path, n: int = len(RETRIEVAL_KEYS)) -> Path:
    """CLIP_benchmark's flickr30k_test_karpathy.txt: header, then image.jpg,caption (captions with commas)."""
    lines = ["image,caption"]
    for k in range(n):
        key_image(k).save(root / f"{k}.jpg", format="PNG")  # .jpg name as Flickr, PNG bytes (lossless)
        lines += [f"{k}.jpg,{c.format(RETRIEVAL_KEYS[k])}" for c in CAPTIONS]
    path = root / "flickr30k_test_karpathy.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_caption_table(root: Path, n: int = len(RETRIEVAL_KEYS)) -> Path:
    """Generic CSV, one (image, caption) row per caption, rows of different images interleaved."""
    names = _retrieval_images(root, n)
    rows = ["image,caption"] + [
        f'images/{names[k]},"{c.format(RETRIEVAL_KEYS[k])}"' for c in CAPTIONS for k in range(n)
    ]
    path = root / "captions.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# known answers


def _zeroshot(data, shift=0):
    return evaluate_zeroshot(KeyStub(data.classnames, shift), tokenizer, data, batch_size=7, num_workers=0)


def _retrieval(data, shift=0):
    return evaluate_retrieval(KeyStub(RETRIEVAL_KEYS, shift), tokenizer, data, ToTensor(), batch_size=4, num_workers=0)


def _check_zeroshot(data, expected_n):
    assert len(data) == expected_n
    good = _zeroshot(data)
    assert good["top1"] == 100.0 and good["mean_per_class_recall"] == 100.0 and good["num_samples"] == expected_n
    bad = _zeroshot(data, shift=1)
    assert bad["top1"] == 0.0 and bad["mean_per_class_recall"] == 0.0


def test_cifar10_pickle_layout(tmp_path, cifar_without_md5):
    root = write_cifar10(tmp_path)
    test = load_classification("cifar10", root, "test", ToTensor())
    assert test.classnames == CIFAR10_CLASSES  # torchvision's batches.meta names, as CLIP_benchmark uses
    assert len(test.templates) == 18 and test.templates[0] == "a photo of a {c}."  # CLIP's CIFAR templates
    assert test.source["templates"].startswith("clip_benchmark")
    _check_zeroshot(test, 30)
    train = load_classification("cifar10", root, "train", ToTensor())
    assert len(train) == 50  # 5 batches of 10


def test_imagefolder_with_classnames(tmp_path):
    root = write_imagefolder(tmp_path / "toy", CIFAR10_CLASSES[:4], per_class=[5, 1, 3, 2])
    data = load_classification("toy", root, "test", ToTensor())
    assert data.classnames == CIFAR10_CLASSES[:4] and data.source["format"] == "imagefolder"
    _check_zeroshot(data, 11)


def test_imagefolder_without_classnames_says_what_to_add(tmp_path):
    root = write_imagefolder(tmp_path / "toy", ["a", "b"], per_class=[1, 1])
    (root / "classnames.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="classnames.txt"):
        load_classification("toy", root, "test", ToTensor())


def test_clip_benchmark_webdataset_shard(tmp_path):
    labels = [i % 6 for i in range(13)]
    root = write_wds_classification(tmp_path / "wds_toy", CIFAR10_CLASSES[:6], labels)
    data = load_classification("wds_toy", root, "test", ToTensor())
    assert data.source["format"] == "wds" and data.templates == ["a photo of a {c}.", "an image of the {c}."]
    assert [data.dataset[i][1] for i in range(13)] == labels
    _check_zeroshot(data, 13)


@pytest.mark.parametrize(
    "writer,fmt",
    [
        (write_karpathy, "karpathy"),
        (write_coco_annotations, "coco"),
        (write_flickr_annotations, "flickr"),
        (write_caption_table, "table"),
    ],
)
def test_retrieval_formats(tmp_path, writer, fmt):
    path = writer(tmp_path)
    data = load_retrieval(path, tmp_path, split="test")  # format detected from the file
    n = len(RETRIEVAL_KEYS)
    assert len(data.images) == n and len(data.captions) == 5 * n
    assert sorted(data.text_to_image) == sorted(list(range(n)) * 5)
    for caption, image in zip(data.captions, data.text_to_image, strict=True):
        assert RETRIEVAL_KEYS[image] in caption  # every caption points at its own image
    good = _retrieval(data)
    assert all(good[f"{d}_R@{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    bad = _retrieval(data, shift=1)
    assert bad["i2t_R@1"] == 0.0 and bad["t2i_R@1"] == 0.0


def test_missing_dataset_errors_say_where(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_classification("cifar10", tmp_path / "nowhere", "test", ToTensor())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_classification("cifar10", tmp_path / "empty", "test", ToTensor())
    with pytest.raises(DatasetNotFoundError, match="dataset_coco.json"):
        load_retrieval(tmp_path / "dataset_coco.json", tmp_path)
    with pytest.raises(ValueError, match="no images in split 'val'"):
        load_retrieval(write_karpathy(tmp_path), tmp_path, split="val")
