"""Evaluation datasets, read from local folders only (nothing is ever downloaded).

Retrieval (`load_retrieval`): Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`),
CLIP_benchmark's annotation files (`coco_test_karpathy.json`, `flickr30k_test_karpathy.txt`), a
generic CSV/JSONL of (image, caption) rows, and CLIP_benchmark's webdataset layout.

Classification (`load_classification`): the torchvision classes of the ten CLIP datasets with
`download=False`, ImageNet val as an ImageFolder, a generic ImageFolder plus a class-names file,
and CLIP_benchmark's webdataset layout (`{split}/nshards.txt`, `{split}/{i}.tar`, `classnames.txt`,
`zeroshot_classification_templates.txt`).

Class names and prompt templates are the CLIP paper's as maintained by CLIP_benchmark
(`en_classnames.json`, `en_zeroshot_classification_templates.json`, read from the installed
package's files without importing it) and open_clip (ImageNet); nothing is retyped here.

Everything that can be checked without reading images is checked at load, so a mistake fails
before any feature is extracted: class names that do not match the dataset's classes, an empty
class-name or template file. A retrieval image listed without captions cannot be an image-to-text
query: it is left out and counted (`RetrievalData.notices`), not dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import random
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset, Subset

from alip.cli import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
Transform = Callable[[Image.Image], Any]


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset is not where it was looked for; the message says what to put where."""


class DatasetError(UserError, ValueError):
    """A dataset that cannot be evaluated as given (its layout, class names or templates); the message says why."""


# ---------------------------------------------------------------------------------------------
# Images: a file on disk or a member of a tar shard, opened lazily in the loader workers.


@dataclass(frozen=True)
class TarMember:
    """Bytes of one file inside a (uncompressed) tar shard: read with one seek, no tar parsing."""

    tar_path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar_path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


ImageRef = str | TarMember


def open_image(ref: ImageRef) -> Image.Image:
    """RGB PIL image from a path or a tar member."""
    if isinstance(ref, TarMember):
        img = Image.open(io.BytesIO(ref.read()))
    else:
        img = Image.open(ref)
    return img.convert("RGB")


class ImageListDataset(Dataset):
    """Map-style dataset over image references: yields `transform(image)`, or `(image, label)`."""

    def __init__(self, refs: Sequence[ImageRef], transform: Transform | None, labels: Sequence[int] | None = None):
        if labels is not None and len(labels) != len(refs):
            raise ValueError(f"{len(refs)} images but {len(labels)} labels")
        self.refs, self.transform, self.labels = list(refs), transform, labels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> Any:
        img = open_image(self.refs[i])
        if self.transform is not None:
            img = self.transform(img)
        return img if self.labels is None else (img, int(self.labels[i]))


def _read_wds_split(root: Path, split: str) -> list[dict[str, Any]]:
    """Samples of a CLIP_benchmark webdataset split: one dict per key, with the image's TarMember
    and the decoded `.cls` / `.txt` fields, in shard and member order."""
    nshards_file = root / split / "nshards.txt"
    if not nshards_file.is_file():
        raise DatasetNotFoundError(
            f"no CLIP_benchmark webdataset split at {root / split}: expected {nshards_file} and shards "
            f"{root / split}/0.tar ... (clip_benchmark_export_wds writes this layout)"
        )
    nshards = int(nshards_file.read_text().strip())
    samples: list[dict[str, Any]] = []
    for i in range(nshards):
        shard = root / split / f"{i}.tar"
        if not shard.is_file():
            raise DatasetNotFoundError(f"{nshards_file} says {nshards} shards but {shard} is missing")
        by_key: dict[str, dict[str, Any]] = {}
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                # webdataset convention: the key is the path up to the first dot of the file name
                directory, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                sample = by_key.setdefault(key, {"__key__": key})
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    sample["image"] = TarMember(str(shard), member.offset_data, member.size)
                elif ext in ("cls", "txt"):
                    sample[ext] = tar.extractfile(member).read().decode("utf-8")
        for key, sample in by_key.items():
            if "image" not in sample:
                raise DatasetError(f"{shard}: sample {key!r} has no image ({'/'.join(IMAGE_EXTENSIONS)})")
            samples.append(sample)
    return samples


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_list(path: Path, what: str) -> list[str]:
    """A class-name or template file: one entry per line. Empty is an error, not "use the defaults"."""
    lines = _read_lines(path)
    if not lines:
        raise DatasetError(f"{path} is empty: it must list the {what}, one per line")
    return lines


# ---------------------------------------------------------------------------------------------
# Retrieval


@dataclass
class RetrievalData:
    """Images, their captions and the caption -> image map of a retrieval test set."""

    name: str
    split: str
    images: list[ImageRef]
    captions: list[str]
    text_to_image: list[int]  # [N_txt] index into `images`
    images_without_captions: int = 0  # listed in the annotations with no (non-blank) caption: left out
    blank_captions: int = 0  # empty caption strings: no query, left out

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.text_to_image):
            raise ValueError(f"{len(self.captions)} captions but {len(self.text_to_image)} caption->image entries")
        if not self.images or not self.captions:
            raise DatasetError(f"retrieval set {self.name}/{self.split} has no image with a caption")
        without = len(self.images) - len(set(self.text_to_image))
        if without:
            raise ValueError(f"{without} images of {self.name}/{self.split} have no caption")

    @property
    def notices(self) -> dict[str, int]:
        """What was left out of the annotations, by kind (only the kinds that occurred)."""
        counts = {"images_without_captions": self.images_without_captions, "blank_captions": self.blank_captions}
        return {k: v for k, v in counts.items() if v}

    def head(self, max_images: int | None) -> RetrievalData:
        """The first `max_images` images with all their captions (the fast in-training subset)."""
        if max_images is None or max_images >= len(self.images):
            return self
        keep = [i for i, img in enumerate(self.text_to_image) if img < max_images]
        return replace(
            self,
            images=self.images[:max_images],
            captions=[self.captions[i] for i in keep],
            text_to_image=[self.text_to_image[i] for i in keep],
        )

    def image_dataset(self, transform: Transform | None) -> ImageListDataset:
        return ImageListDataset(self.images, transform)


def _group_captions(pairs: Sequence[tuple[ImageRef, str | None]], name: str, split: str) -> RetrievalData:
    """(image, caption) rows -> RetrievalData; images in first-appearance order, captions in row order.

    `(image, None)` lists an image that has no caption. Such an image cannot be an image-to-text
    query, so it is left out of both directions and counted: the standard test sets caption every
    image, and keeping it in the text-to-image gallery would make the scores incomparable with
    theirs. Blank captions are no query either: left out and counted.
    """
    captioned = {image for image, caption in pairs if caption}
    index: dict[ImageRef, int] = {}
    captions, text_to_image = [], []
    for image, caption in pairs:
        if caption:
            captions.append(caption)
            text_to_image.append(index.setdefault(image, len(index)))
    without = len({image for image, _ in pairs} - captioned)
    blank = sum(caption is not None and not caption for _, caption in pairs)
    return RetrievalData(name, split, list(index), captions, text_to_image, without, blank)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetNotFoundError(f"{what} not found: {path}")


def load_karpathy(
    path: str | Path, image_root: str | Path, split: str = "test", name: str | None = None
) -> RetrievalData:
    """Karpathy split JSON (`dataset_coco.json` / `dataset_flickr30k.json`): images of `split`,
    at `image_root/filepath/filename` (COCO: filepath is `val2014`; Flickr: no filepath)."""
    path, image_root = Path(path), Path(image_root)
    _require_file(path, "Karpathy split JSON")
    data = json.loads(path.read_text())
    if "images" not in data or (data["images"] and "sentences" not in data["images"][0]):
        raise DatasetError(f"{path} is not a Karpathy split file (needs images[].sentences[].raw)")
    pairs = []
    for entry in data["images"]:
        if entry.get("split") != split:
            continue
        image = str(image_root / entry.get("filepath", "") / entry["filename"])
        pairs += [(image, s["raw"].strip()) for s in entry["sentences"]] or [(image, None)]
    if not pairs:
        splits = sorted({e.get("split") for e in data["images"]})
        raise DatasetError(f"{path} has no images in split {split!r} (splits present: {splits})")
    return _group_captions(pairs, name or data.get("dataset", path.stem), split)


def load_coco_annotations(
    path: str | Path, image_root: str | Path, split: str = "test", name: str | None = None
) -> RetrievalData:
    """CLIP_benchmark's COCO-style annotation file (`coco_test_karpathy.json`): `images[]` with
    `id`/`file_name` (relative to `image_root`) and `annotations[]` with `image_id`/`caption`."""
    path, image_root = Path(path), Path(image_root)
    _require_file(path, "COCO captions annotation file")
    data = json.loads(path.read_text())
    files = {img["id"]: str(image_root / img["file_name"]) for img in data["images"]}
    # sorted image ids, as torchvision's CocoCaptions (which CLIP_benchmark uses) orders them
    by_image: dict[Any, list[str]] = {i: [] for i in sorted(files)}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann["caption"].strip())
    pairs = [(files[i], c) for i, caps in by_image.items() for c in caps or [None]]
    return _group_captions(pairs, name or path.stem, split)


def load_flickr_annotations(
    path: str | Path, image_root: str | Path, split: str = "test", name: str | None = None
) -> RetrievalData:
    """CLIP_benchmark's Flickr annotation file (`flickr30k_test_karpathy.txt`): a header line, then
    `image.jpg,caption` lines (captions may contain commas)."""
    path, image_root = Path(path), Path(image_root)
    _require_file(path, "Flickr annotation file")
    pairs = []
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    for n, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        image, sep, caption = line.strip().partition(".jpg,")
        if not sep:
            raise DatasetError(f"{path}:{n}: expected 'image.jpg,caption', got {line[:80]!r}")
        pairs.append((str(image_root / (image + ".jpg")), caption.strip()))
    return _group_captions(pairs, name or path.stem, split)


def load_caption_table(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str = "test",
    name: str | None = None,
    image_col: str = "image",
    caption_col: str = "caption",
) -> RetrievalData:
    """A generic CSV or JSONL of (image, caption): several rows per image, or (JSONL) a list of
    captions in one row. Relative image paths are resolved against `image_root` (default: the
    table's folder)."""
    path = Path(path)
    _require_file(path, "caption table")
    root = Path(image_root) if image_root is not None else path.parent
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    else:
        raise DatasetError(f"caption table must be .csv, .tsv or .jsonl, got {path.name}")
    pairs = []
    for n, row in enumerate(rows, start=1):
        if image_col not in row or caption_col not in row:
            raise DatasetError(f"{path} row {n}: needs columns {image_col!r} and {caption_col!r}, has {sorted(row)}")
        caps = row[caption_col] if isinstance(row[caption_col], list) else [row[caption_col]]
        pairs += [(str(root / row[image_col]), str(c).strip()) for c in caps] or [(str(root / row[image_col]), None)]
    return _group_captions(pairs, name or path.stem, split)


def load_wds_retrieval(root: str | Path, split: str = "test", name: str | None = None) -> RetrievalData:
    """CLIP_benchmark webdataset retrieval layout: `dataset_type.txt` = retrieval, samples with an
    image and a `.txt` holding one caption per line."""
    root = Path(root)
    pairs = []
    for sample in _read_wds_split(root, split):
        if "txt" not in sample:
            raise DatasetError(f"{root}: sample {sample['__key__']!r} has no .txt captions")
        captions = [c.strip() for c in sample["txt"].splitlines() if c.strip()]
        pairs += [(sample["image"], c) for c in captions] or [(sample["image"], None)]
    return _group_captions(pairs, name or root.name, split)


def load_retrieval(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str = "test",
    fmt: str = "auto",
    name: str | None = None,
) -> RetrievalData:
    """Load a retrieval set; `fmt` is karpathy, coco, flickr, table, wds or auto (by file type/content).

    Images listed without captions and blank captions are left out and counted in `notices` (see
    `_group_captions`), with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(
            f"retrieval annotations not found: {path}. Put e.g. the Karpathy split file dataset_coco.json "
            "there and the images under --images (COCO: <images>/val2014/*.jpg; Flickr30k: <images>/*.jpg), "
            "or CLIP_benchmark's coco_test_karpathy.json / flickr30k_test_karpathy.txt, or a CSV/JSONL with "
            "image,caption columns, or a CLIP_benchmark webdataset folder"
        )
    if fmt == "auto":
        if path.is_dir():
            fmt = "wds"
        elif path.suffix == ".json":
            head = json.loads(path.read_text())
            images = head.get("images") or [{}]
            fmt = "karpathy" if "sentences" in images[0] else "coco"
        elif path.suffix == ".txt":
            fmt = "flickr"
        else:
            fmt = "table"
    if fmt == "wds":
        return _noticed(load_wds_retrieval(path, split, name))
    loaders = {
        "karpathy": load_karpathy,
        "coco": load_coco_annotations,
        "flickr": load_flickr_annotations,
        "table": load_caption_table,
    }
    if fmt not in loaders:
        raise DatasetError(f"unknown retrieval format {fmt!r}; choose auto, {', '.join(loaders)} or wds")
    if image_root is None and fmt != "table":
        raise DatasetError(f"{fmt} annotations need the image folder (--images)")
    return _noticed(loaders[fmt](path, image_root, split=split, name=name))


def _noticed(data: RetrievalData) -> RetrievalData:
    if data.images_without_captions:
        logger.warning(
            "%s/%s: %d images have no caption and are left out (no image-to-text query without one); "
            "evaluating %d images",
            data.name,
            data.split,
            data.images_without_captions,
            len(data.images),
        )
    if data.blank_captions:
        logger.warning("%s/%s: %d blank captions left out", data.name, data.split, data.blank_captions)
    return data


# ---------------------------------------------------------------------------------------------
# Class names and templates


def clip_benchmark_file(filename: str) -> Path:
    """A data file of the installed `clip_benchmark` package, found without importing it
    (its import pulls transformers, webdataset and pycocoevalcap, which we do not need)."""
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "class names and templates come from CLIP_benchmark's JSON files: "
            "pip install --no-deps clip-benchmark==1.6.2 (or pass --classnames/--templates files)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / filename
    if not path.is_file():
        raise FileNotFoundError(f"clip_benchmark is installed but has no {path}")
    return path


def clip_benchmark_json(filename: str) -> dict[str, list[str]]:
    return json.loads(clip_benchmark_file(filename).read_text(encoding="utf-8"))


def openai_imagenet() -> tuple[list[str], list[str]]:
    """ImageNet class names and the 80 CLIP templates, from open_clip's zero-shot metadata."""
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return list(IMAGENET_CLASSNAMES), [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def templates_for(name: str) -> tuple[list[str], str]:
    """CLIP's prompt templates for a dataset (CLIP_benchmark's JSON; ImageNet's for unknown names)."""
    if name == "imagenet1k":
        return openai_imagenet()[1], "open_clip.OPENAI_IMAGENET_TEMPLATES"
    templates = clip_benchmark_json("en_zeroshot_classification_templates.json")
    key = name if name in templates else "imagenet1k"
    return templates[key], f"clip_benchmark en_zeroshot_classification_templates.json[{key}]"


def text_hash(classnames: Sequence[str], templates: Sequence[str]) -> str:
    """sha256 of the class names and templates, recorded in every result."""
    payload = json.dumps({"classnames": list(classnames), "templates": list(templates)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Classification


@dataclass
class ClassificationData:
    """A labelled image set with its class names and zero-shot templates."""

    name: str
    split: str
    dataset: Dataset  # yields (image, label)
    classnames: list[str]
    templates: list[str]
    source: dict[str, str] = field(default_factory=dict)  # where the data, names and templates came from

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def templates_sha256(self) -> str:
        return text_hash(self.classnames, self.templates)

    def head(self, max_samples: int | None, seed: int = 0) -> ClassificationData:
        """A fixed random subset of `max_samples` (the fast in-training subset; seeded, so the
        same samples every evaluation)."""
        if max_samples is None or max_samples >= len(self.dataset):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.dataset)), max_samples))
        return replace(self, dataset=Subset(self.dataset, keep))


# The datasets of the CLIP/ALIP tables: name -> (where they go under --data, splits).
TORCHVISION_LAYOUTS: dict[str, str] = {
    "cifar10": "<data>/cifar-10-batches-py/ (the python pickle version)",
    "cifar100": "<data>/cifar-100-python/",
    "food101": "<data>/food-101/{images,meta}/",
    "pets": "<data>/oxford-iiit-pet/{images,annotations}/",
    "flowers": "<data>/flowers-102/{jpg,imagelabels.mat,setid.mat}",
    "sun397": "<data>/SUN397/{ClassName.txt,a/abbey/...} (+ Training_01.txt/Testing_01.txt for train/test)",
    "cars": "<data>/stanford_cars/{devkit,cars_train,cars_test,cars_test_annos_withlabels.mat}",
    "dtd": "<data>/dtd/{images,labels}/",
    "caltech101": "<data>/caltech101/101_ObjectCategories/<class>/*.jpg",
    "fgvc_aircraft": "<data>/fgvc-aircraft-2013b/data/",
    "imagenet1k": "<data>/val/<wnid>/*.JPEG (1000 class folders, e.g. via valprep.sh)",
}
# Splits with a standard test set; zero-shot uses `test`, the linear probe `train` and `test`.
_SPLITS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "food101": ("train", "test"),
    "pets": ("train", "test"),
    "flowers": ("train", "val", "test"),
    "sun397": ("train", "test", "all"),
    "cars": ("train", "test"),
    "dtd": ("train", "val", "test"),
    "caltech101": ("train", "test", "all"),
    "fgvc_aircraft": ("train", "val", "trainval", "test"),
    "imagenet1k": ("train", "val", "test"),
}
# Caltech-101 has no official split; CLIP's is 30 training images per class (3,060 = 102 x 30).
CALTECH_TRAIN_PER_CLASS = 30


def _torchvision(name: str, root: Path, split: str, transform: Transform | None) -> tuple[Dataset, list[str]]:
    """A torchvision dataset (download=False) and its raw class list."""
    from torchvision import datasets as tvd

    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        ds = cls(str(root), train=split == "train", transform=transform, download=False)
        return ds, list(ds.classes)
    if name == "food101":
        ds = tvd.Food101(str(root), split=split, transform=transform, download=False)
        return ds, [c.replace("_", " ") for c in ds.classes]  # as CLIP_benchmark
    if name == "pets":
        ds = tvd.OxfordIIITPet(
            str(root), split="trainval" if split == "train" else split, target_types="category", transform=transform
        )
        return ds, list(ds.classes)
    if name == "flowers":
        ds = tvd.Flowers102(str(root), split=split, transform=transform, download=False)
        return ds, []
    if name == "cars":
        ds = tvd.StanfordCars(str(root), split=split, transform=transform, download=False)
        return ds, list(ds.classes)
    if name == "dtd":
        ds = tvd.DTD(str(root), split=split, transform=transform, download=False)
        return ds, list(ds.classes)
    if name == "fgvc_aircraft":
        ds = tvd.FGVCAircraft(str(root), split=split, annotation_level="variant", transform=transform, download=False)
        return ds, list(ds.classes)
    if name == "sun397":
        ds = tvd.SUN397(str(root), transform=transform, download=False)
        classes = [c.replace("_", " ").replace("/", " ") for c in ds.classes]  # as CLIP_benchmark
        if split == "all":
            return ds, classes
        # CLIP's split is the first of SUN397's ten official partitions (50 + 50 images per class).
        part = ds._data_dir / ("Training_01.txt" if split == "train" else "Testing_01.txt")
        if not part.is_file():
            raise DatasetNotFoundError(
                f"SUN397 split {split!r} needs the official partition file {part} (from Partitions.zip); "
                "or use --split all"
            )
        wanted = set(_read_lines(part))
        keep = [i for i, f in enumerate(ds._image_files) if "/" + f.relative_to(ds._data_dir).as_posix() in wanted]
        return Subset(ds, keep), classes
    if name == "caltech101":
        # torchvision's Caltech101 drops BACKGROUND_Google; CLIP (and CLIP_benchmark) keep it as
        # class 0 of 102, so the same on-disk layout is read as an ImageFolder (same sorted order).
        folder = root / "caltech101" / "101_ObjectCategories"
        if not folder.is_dir():
            raise RuntimeError(f"Caltech-101 not found at {folder}")
        ds = tvd.ImageFolder(str(folder), transform=transform)
        if split == "all":
            return ds, []
        by_class: dict[int, list[int]] = {}
        for i, target in enumerate(ds.targets):
            by_class.setdefault(target, []).append(i)
        rng = random.Random(0)  # fixed, so train and test never overlap across runs
        keep = []
        for idx in by_class.values():
            idx = idx[:]
            rng.shuffle(idx)
            keep += idx[:CALTECH_TRAIN_PER_CLASS] if split == "train" else idx[CALTECH_TRAIN_PER_CLASS:]
        return Subset(ds, sorted(keep)), []
    raise ValueError(f"not a torchvision dataset: {name}")


def _image_folder(root: Path, transform: Transform | None) -> Dataset:
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root), transform=transform)


def _load_torchvision(
    name: str, root: Path, split: str, transform: Transform | None, source: dict
) -> tuple[Dataset, list[str], list[str]]:
    """One of CLIP's datasets in torchvision's on-disk layout, with CLIP's class names and templates."""
    if name not in _SPLITS:
        raise DatasetError(f"unknown dataset {name!r}; torchvision-backed ones: {', '.join(_SPLITS)}")
    if split not in _SPLITS[name]:
        raise DatasetError(f"{name} has splits {_SPLITS[name]}, not {split!r}")
    if name == "imagenet1k":
        folder = root / ("train" if split == "train" else "val")
        if not folder.is_dir():
            raise DatasetNotFoundError(f"ImageNet {split} not found: expected {TORCHVISION_LAYOUTS[name]} at {folder}")
        dataset = _image_folder(folder, transform)
        if len(dataset.classes) != 1000:
            raise DatasetError(f"{folder} has {len(dataset.classes)} class folders, ImageNet needs 1000 (wnids)")
        classnames, templates = openai_imagenet()
        source.update(classnames="open_clip.IMAGENET_CLASSNAMES")
        return dataset, classnames, templates
    try:
        dataset, classnames = _torchvision(name, root, split, transform)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted" and similar
        raise DatasetNotFoundError(
            f"{name} ({split}) not found under {root}: {e}. Expected layout: {TORCHVISION_LAYOUTS[name]} "
            "(the files torchvision's download would create; nothing is downloaded here)"
        ) from None
    cb_names = clip_benchmark_json("en_classnames.json")
    if name in cb_names:  # CLIP's curated names (pets, flowers, caltech101)
        classnames = cb_names[name]
        source.update(classnames=f"clip_benchmark en_classnames.json[{name}]")
    else:
        source.update(classnames=f"torchvision {name} classes (CLIP_benchmark's clean-up)")
    templates, source["templates"] = templates_for(name)
    return dataset, classnames, templates


def _load_wds(
    root: Path, split: str, transform: Transform | None, source: dict
) -> tuple[Dataset, list[str], list[str]]:
    """CLIP_benchmark's webdataset layout: tar shards with .cls labels, class names and templates beside."""
    samples = _read_wds_split(root, split)
    missing = [s["__key__"] for s in samples if "cls" not in s]
    if missing:
        raise DatasetError(f"{root}/{split}: samples without a .cls label, e.g. {missing[:3]}")
    dataset = ImageListDataset([s["image"] for s in samples], transform, [int(s["cls"]) for s in samples])
    classnames: list[str] = []
    templates: list[str] = []
    if (root / "classnames.txt").is_file():
        classnames, source["classnames"] = _read_list(root / "classnames.txt", "class names"), "classnames.txt"
    tfile = root / "zeroshot_classification_templates.txt"
    if tfile.is_file():
        templates, source["templates"] = _read_list(tfile, "templates"), tfile.name
    return dataset, classnames, templates


def _load_imagefolder(
    root: Path, split: str, transform: Transform | None, source: dict, has_names_override: bool
) -> tuple[Dataset, list[str], list[str]]:
    """Class sub-folders (of `<root>/<split>` when it exists) + `classnames.txt` in sorted folder order,
    and optionally `templates.txt` (one prompt per line with `{c}`) for a dataset with its own prompts."""
    folder = root / split if (root / split).is_dir() else root
    dataset = _image_folder(folder, transform)
    templates: list[str] = []
    if (root / "templates.txt").is_file():
        templates, source["templates"] = _read_list(root / "templates.txt", "templates"), "templates.txt"
    names_file = root / "classnames.txt"
    if names_file.is_file():
        source["classnames"] = "classnames.txt"
        return dataset, _read_list(names_file, "class names"), templates
    if not has_names_override:
        raise DatasetNotFoundError(
            f"{root} is an ImageFolder without class names: put classnames.txt (one name per line, in "
            f"the sorted order of the class folders {dataset.classes[:3]}...) in {root}, or pass --classnames"
        )
    return dataset, [], templates


def load_classification(
    name: str,
    root: str | Path,
    split: str = "test",
    transform: Transform | None = None,
    fmt: str = "auto",
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
) -> ClassificationData:
    """Load a classification set with its class names and templates.

    `fmt`: `torchvision` (the CLIP datasets by name, see TORCHVISION_LAYOUTS), `imagefolder`
    (class sub-folders + `classnames.txt` in sorted folder order), `wds` (CLIP_benchmark
    webdataset layout), or `auto`: torchvision for the known names, wds where `<root>/<split>/
    nshards.txt` exists, else imagefolder. `classnames_file`/`templates_file` (one per line;
    templates use `{c}`) override the defaults.
    """
    root = Path(root)
    if not root.is_dir():
        where = TORCHVISION_LAYOUTS.get(name, "<data>/<class>/*.jpg plus <data>/classnames.txt")
        raise DatasetNotFoundError(f"dataset folder not found: {root}. Expected layout for {name}: {where}")
    if fmt == "auto":
        if name in TORCHVISION_LAYOUTS:
            fmt = "torchvision"
        elif (root / split / "nshards.txt").is_file():
            fmt = "wds"
        else:
            fmt = "imagefolder"
    source = {"format": fmt, "root": str(root)}
    if fmt == "torchvision":
        dataset, classnames, templates = _load_torchvision(name, root, split, transform, source)
    elif fmt == "wds":
        dataset, classnames, templates = _load_wds(root, split, transform, source)
    elif fmt == "imagefolder":
        dataset, classnames, templates = _load_imagefolder(root, split, transform, source, classnames_file is not None)
    else:
        raise DatasetError(f"unknown classification format {fmt!r}; choose auto, torchvision, imagefolder or wds")
    if classnames_file is not None:
        classnames, source["classnames"] = _read_list(Path(classnames_file), "class names"), str(classnames_file)
    if templates_file is not None:
        templates, source["templates"] = _read_list(Path(templates_file), "templates"), str(templates_file)
    if not templates:
        templates, source["templates"] = templates_for(name)
    if not classnames:
        raise DatasetError(f"no class names for {name}: pass --classnames")
    _check_class_names(dataset, classnames, source)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise DatasetError(f"templates must contain {{c}} where the class name goes: {bad[:3]}")
    return ClassificationData(name, split, dataset, classnames, templates, source)


def _declared_labels(dataset: Dataset) -> tuple[int | None, int | None]:
    """(how many classes the dataset defines, its largest label), each None where the dataset does
    not say without reading its images. torchvision datasets have `classes` and `targets` or
    `_labels`; our image lists have `labels`."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    classes = getattr(base, "classes", None)
    labels = next((v for a in ("targets", "labels", "_labels") if (v := getattr(base, a, None)) is not None), None)
    top_label = int(max(labels)) if labels is not None and len(labels) else None
    return (len(classes) if classes is not None else None), top_label


def _check_class_names(dataset: Dataset, classnames: list[str], source: dict) -> None:
    """One class name per class, before any image is read: a mismatch would misname every class
    after the first missing or extra one (and crash only when names run out, after extraction)."""
    num_classes, top_label = _declared_labels(dataset)
    names = f"{len(classnames)} class names ({source.get('classnames', 'default')})"
    if num_classes is not None and num_classes != len(classnames):
        raise DatasetError(
            f"{names} for {num_classes} classes in {source['root']}: give exactly one name per class, in "
            "the sorted order of the class folders (ImageFolder) or of the dataset's class list"
        )
    if top_label is not None and top_label >= len(classnames):
        raise DatasetError(f"{names}, but {source['root']} has labels up to {top_label}: one name per label is missing")
