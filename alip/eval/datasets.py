"""Evaluation datasets, read from local folders only (nothing is ever downloaded).

Retrieval sets live in `alip.eval.retrieval_formats` (Karpathy, ALBEF, CLIP_benchmark, tables,
webdataset), which builds on this module. This module holds the shared pieces
(images on disk or in tar shards, CLIP_benchmark's webdataset reader, the error types) and the
classification sets.

Classification (`load_classification`): the torchvision classes of the ten CLIP datasets with
`download=False`, ImageNet val as an ImageFolder, a generic ImageFolder plus a class-names file,
and CLIP_benchmark's webdataset layout (`{split}/nshards.txt`, `{split}/{i}.tar`, `classnames.txt`,
`zeroshot_classification_templates.txt`).

Class names and prompt templates are the CLIP paper's as maintained by CLIP_benchmark
(`en_classnames.json`, `en_zeroshot_classification_templates.json`, read from the installed
package's files without importing it) and open_clip (ImageNet); nothing is retyped here.

Everything that can be checked without reading images is checked at load, so a mistake fails
before any feature is extracted: class names that do not match the dataset's classes, an empty
class-name or template file.
"""

from __future__ import annotations

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


def read_wds_split(root: Path, split: str) -> list[dict[str, Any]]:
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


def read_list(path: Path, what: str) -> list[str]:
    """A class-name or template file: one entry per line. Empty is an error, not "use the defaults"."""
    lines = _read_lines(path)
    if not lines:
        raise DatasetError(f"{path} is empty: it must list the {what}, one per line")
    return lines


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
    samples = read_wds_split(root, split)
    missing = [s["__key__"] for s in samples if "cls" not in s]
    if missing:
        raise DatasetError(f"{root}/{split}: samples without a .cls label, e.g. {missing[:3]}")
    dataset = ImageListDataset([s["image"] for s in samples], transform, [int(s["cls"]) for s in samples])
    classnames: list[str] = []
    templates: list[str] = []
    if (root / "classnames.txt").is_file():
        classnames, source["classnames"] = read_list(root / "classnames.txt", "class names"), "classnames.txt"
    tfile = root / "zeroshot_classification_templates.txt"
    if tfile.is_file():
        templates, source["templates"] = read_list(tfile, "templates"), tfile.name
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
        templates, source["templates"] = read_list(root / "templates.txt", "templates"), "templates.txt"
    names_file = root / "classnames.txt"
    if names_file.is_file():
        source["classnames"] = "classnames.txt"
        return dataset, read_list(names_file, "class names"), templates
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
        classnames, source["classnames"] = read_list(Path(classnames_file), "class names"), str(classnames_file)
    if templates_file is not None:
        templates, source["templates"] = read_list(Path(templates_file), "templates"), str(templates_file)
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
