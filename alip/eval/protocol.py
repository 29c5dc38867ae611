"""Evaluation protocols by name: CLIP_benchmark 1.6.2's (the default) and the official release's.

A protocol sets the defaults of the options where the two differ. Each option can still be set on
its own, and the results JSON records the protocol and every resolved option (`EvalProtocol.record`).

| option / data           | clip_benchmark                 | release (deepglint/ALIP)                          |
|-------------------------|--------------------------------|---------------------------------------------------|
| `ties`                  | clip_benchmark (its topk calls) | release (stable ranks, its topk(1))              |
| `caption_prefix`        | none                           | `'a photo of '` before every COCO/Flickr caption  |
| `logits`                | float                          | int64-truncated (100 x cosine, toward zero)       |
| ImageNet images         | the model's eval transform     | shorter side 256, centre crop 224                 |
| ImageNet padded rows    | none                           | 176 zero rows of class 0 counted (8 ranks x 128)  |
| Caltech-101 test        | 102 classes, 30 per class train | 101 classes, random 3000/5677 split, seed 3072   |
| SUN397 test             | official partition 01          | random 19850/19850/69054 split (see below)        |

Where the release is not deterministic, we do the same procedure with a fixed, recorded seed:
- **SUN397.** The release seeds its split with `3072 + hash("sun397") % 2048`. Python randomises
  string hashes per process unless PYTHONHASHSEED is set at launch (zero_shot.py sets it in
  `os.environ` after start-up, which changes nothing), so every run and every rank drew its own
  split; its SUN397 figure cannot be reproduced exactly. We use seed 3546: the release's formula
  under PYTHONHASHSEED=0 with CPython 3.8's string hash (siphash24; the release ships cpython-38
  bytecode). CPython 3.11 would give 3578.
- **Caltech-101.** The release holds only the compiled `dataloaders/caltech101.pyc`, not its source.
  101 classes (torchvision's Caltech101, BACKGROUND_Google dropped; the release's label.json lists
  CLIP's names without "background") and a 3000/5677 `random_split` are what the release uses.
  The seed is zero_shot.py's 3072. We assume it goes straight to the generator
  (`manual_seed(seed)`), as in a public loader of identical layout; the release itself cannot
  confirm this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset, random_split

from alip.eval.datasets import (
    ClassificationData,
    DatasetError,
    DatasetNotFoundError,
    Transform,
    clip_benchmark_json,
    load_classification,
    read_list,
    templates_for,
)
from alip.eval.metrics import TIE_RULES

PROTOCOLS = ("clip_benchmark", "release")
LOGIT_RULES = ("float", "int64-truncated")
RELEASE_CAPTION_PREFIX = "a photo of "  # dataloaders/coco.py and flickr30k.py, before tokenizing
RELEASE_SEED = 3072  # zero_shot.py passes seed=3072 to every dataset loader
RELEASE_IMAGENET_PADDING = (8, 128)  # run_zeroshot.sh: torchrun --nproc_per_node 8, --batch-size 128
CALTECH_RELEASE_SPLIT = (3000, 5677)  # train, test: all 8,677 images of the 101 classes
SUN397_RELEASE_SPLIT = (19850, 19850, 69054)  # train, test, unused: all 108,754 images
SUN397_RELEASE_SEED = 3546  # 3072 + hash("sun397") % 2048, CPython 3.8, PYTHONHASHSEED=0 (module docstring)


@dataclass(frozen=True)
class EvalProtocol:
    """The resolved evaluation options of one run."""

    name: str
    ties: str
    caption_prefix: str
    logits: str
    imagenet_padding: tuple[int, int] | None  # (ranks, batch size) of the release run whose padding is counted
    release_datasets: bool  # ImageNet 256 -> 224, Caltech-101 and SUN397 random splits

    def record(self, task: str) -> dict[str, Any]:
        """The settings that apply to `task` (retrieval or zeroshot), for the results JSON."""
        if task == "retrieval":
            return {"protocol": self.name, "ties": self.ties, "caption_prefix": self.caption_prefix}
        padding = None if self.imagenet_padding is None else "x".join(map(str, self.imagenet_padding))
        return {
            "protocol": self.name,
            "ties": self.ties,
            "logits": self.logits,
            "imagenet_padding": padding,
            "release_datasets": self.release_datasets,
        }


def parse_padding(value: str) -> tuple[int, int] | None:
    """`none` or `RANKSxBATCH` (e.g. `8x128`)."""
    if value == "none":
        return None
    ranks, sep, batch = value.partition("x")
    if not (sep and ranks.isdigit() and batch.isdigit() and int(ranks) > 0 and int(batch) > 0):
        raise ValueError(f"expected 'none' or RANKSxBATCH such as 8x128, got {value!r}")
    return int(ranks), int(batch)


def resolve_protocol(
    name: str = "clip_benchmark",
    *,
    ties: str | None = None,
    caption_prefix: str | None = None,
    logits: str | None = None,
    imagenet_padding: tuple[int, int] | None | str = "default",
) -> EvalProtocol:
    """The protocol's defaults, with every option given (not None) taking precedence."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {name!r}")
    release = name == "release"
    out = EvalProtocol(
        name=name,
        ties=ties or ("release" if release else "clip_benchmark"),
        caption_prefix=(RELEASE_CAPTION_PREFIX if release else "") if caption_prefix is None else caption_prefix,
        logits=logits or ("int64-truncated" if release else "float"),
        imagenet_padding=(RELEASE_IMAGENET_PADDING if release else None)
        if imagenet_padding == "default"
        else imagenet_padding,
        release_datasets=release,
    )
    if out.ties not in TIE_RULES or out.logits not in LOGIT_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES} and logits one of {LOGIT_RULES}")
    return out


def imagenet_padded_rows(n: int, ranks: int, batch_size: int) -> int:
    """Rows the release's ImageNet evaluation counts beyond the `n` real images.

    Each rank allocates `len(loader) * batch_size` rows of int64 logits and targets, all zero, and
    fills only its shard. The rest stay zero rows of class 0, and the accuracy divides by all rows.
    The loader is DALI's, sharded without padding: rank r reads images [floor(n r / R),
    floor(n (r+1) / R)) in ceil(shard / batch) batches. For 50,000 images on 8 ranks x 128 that
    is 8 x (49 x 128 - 6,250) = 176 rows.
    """
    pad = 0
    for r in range(ranks):
        shard = n * (r + 1) // ranks - n * r // ranks
        pad += math.ceil(shard / batch_size) * batch_size - shard
    return pad


def release_split_indices(n: int, lengths: tuple[int, ...], seed: int, part: int, what: str) -> list[int]:
    """Indices of `part` of `torch.utils.data.random_split(range(n), lengths, Generator().manual_seed(seed))`,
    the release's split (in its random order)."""
    if sum(lengths) != n:
        raise DatasetError(
            f"the release's {what} split takes exactly {sum(lengths)} images ({' + '.join(map(str, lengths))}), "
            f"found {n}: the release protocol needs the complete dataset"
        )
    parts = random_split(range(n), list(lengths), generator=torch.Generator().manual_seed(seed))
    return list(parts[part].indices)


def release_imagenet_transform(preprocess: Any) -> Transform:
    """The release's ImageNet preprocessing: shorter side to int(256 / 224 x S), centre crop S, then
    the model's normalisation. The release resizes with DALI's triangular filter on the GPU; PIL's
    antialiased bilinear resize is the same triangle filter, so only decoder and rounding
    differences remain."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", [])
    crops = [t.size for t in steps if isinstance(t, T.CenterCrop)]
    normalize = [t for t in steps if isinstance(t, T.Normalize)]
    if not crops or not normalize:
        raise ValueError("the release's ImageNet transform needs the model's eval transform (CenterCrop, Normalize)")
    size = crops[0][0] if isinstance(crops[0], (tuple, list)) else int(crops[0])
    resize = T.Resize(int(256 / 224 * size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    return T.Compose([resize, T.CenterCrop(size), T.ToTensor(), normalize[0]])


def _release_caltech101(root: Path, split: str, transform: Transform | None) -> ClassificationData:
    from torchvision.datasets import Caltech101

    try:
        dataset = Caltech101(str(root), target_type="category", transform=transform, download=False)
    except RuntimeError as e:
        raise DatasetNotFoundError(
            f"caltech101 not found under {root}: {e}. Expected layout: <data>/caltech101/101_ObjectCategories/"
        ) from None
    if len(dataset.categories) != 101:
        raise DatasetError(f"the release's Caltech-101 has 101 classes, found {len(dataset.categories)} in {root}")
    keep = release_split_indices(len(dataset), CALTECH_RELEASE_SPLIT, RELEASE_SEED, 1, "caltech101")
    # CLIP's names in torchvision's order; the first, "background", is the class torchvision drops
    names = clip_benchmark_json("en_classnames.json")["caltech101"][1:]
    templates, templates_source = templates_for("caltech101")
    source = {
        "format": "torchvision Caltech101 (101 classes)",
        "root": str(root),
        "split": f"release: random_split 3000/5677 seed {RELEASE_SEED}, part 2",
        "classnames": "clip_benchmark en_classnames.json[caltech101][1:]",
        "templates": templates_source,
    }
    return ClassificationData("caltech101", split, Subset(dataset, keep), names, templates, source)


def _release_sun397(root: Path, split: str, transform: Transform | None) -> ClassificationData:
    full = load_classification("sun397", root, "all", transform, "torchvision")
    keep = release_split_indices(len(full), SUN397_RELEASE_SPLIT, SUN397_RELEASE_SEED, 1, "sun397")
    source = {**full.source, "split": f"release: random_split 19850/19850/69054 seed {SUN397_RELEASE_SEED}, part 2"}
    return replace(full, split=split, dataset=Subset(full.dataset, keep), source=source)


def load_protocol_classification(
    protocol: EvalProtocol,
    name: str,
    root: str | Path,
    split: str,
    preprocess: Any,
    fmt: str = "auto",
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
) -> ClassificationData:
    """`load_classification`, or under the release protocol the release's ImageNet transform and
    Caltech-101 / SUN397 test splits (module docstring). Other datasets are the same in both."""
    release = protocol.release_datasets and fmt in ("auto", "torchvision")
    if release and name == "imagenet1k":
        transform = release_imagenet_transform(preprocess)
        data = load_classification(name, root, split, transform, fmt, classnames_file, templates_file)
        return replace(data, source={**data.source, "transform": "release: resize 256, centre crop 224"})
    if not (release and name in ("caltech101", "sun397")):
        return load_classification(name, root, split, preprocess, fmt, classnames_file, templates_file)
    if split != "test":
        raise DatasetError(f"the release protocol defines only the test split of {name}, not {split!r}")
    loader = _release_caltech101 if name == "caltech101" else _release_sun397
    data = loader(Path(root), split, preprocess)
    if classnames_file is not None:
        names = read_list(Path(classnames_file), "class names")
        if len(names) != len(data.classnames):
            raise DatasetError(f"{classnames_file}: {len(names)} class names for {len(data.classnames)} classes")
        data = replace(data, classnames=names, source={**data.source, "classnames": str(classnames_file)})
    if templates_file is not None:
        templates = read_list(Path(templates_file), "templates")
        if any("{c}" not in t for t in templates):
            raise DatasetError(f"{templates_file}: templates must contain {{c}} where the class name goes")
        data = replace(data, templates=templates, source={**data.source, "templates": str(templates_file)})
    return data
