"""Retrieval test sets: images, their captions and the caption -> image map, from every annotation format.

Formats (`load_retrieval(fmt=...)`, `auto` picks one from the file):
- `karpathy`: Karpathy's split JSON (`dataset_coco.json`, `dataset_flickr30k.json`);
- `albef`: ALBEF-style JSON (`coco_test.json`, `flickr30k_test.json`), what the release's retrieval
  scripts read: `[{"image": "<folder>/<file>", "caption": [...]}, ...]`;
- `coco` / `flickr`: CLIP_benchmark's annotation files (`coco_test_karpathy.json`,
  `flickr30k_test_karpathy.txt`);
- `table`: a generic CSV/TSV/JSONL of (image, caption) rows;
- `wds`: CLIP_benchmark's retrieval webdataset layout.

A JSON file that is none of the JSON formats is a clear error (`DatasetError`), never a crash.
A retrieval image listed without captions cannot be an image-to-text query: it is left out and
counted (`RetrievalData.notices`), not dropped silently.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from alip.eval.datasets import (
    DatasetError,
    DatasetNotFoundError,
    ImageListDataset,
    ImageRef,
    Transform,
    read_wds_split,
)

logger = logging.getLogger(__name__)


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
    if json_format(data, path) != "karpathy":
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
    if json_format(data, path) != "coco":
        raise DatasetError(f"{path} is not a COCO captions file (needs images[].id/file_name and annotations[])")
    files = {img["id"]: str(image_root / img["file_name"]) for img in data["images"]}
    # sorted image ids, as torchvision's CocoCaptions (which CLIP_benchmark uses) orders them
    by_image: dict[Any, list[str]] = {i: [] for i in sorted(files)}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann["caption"].strip())
    pairs = [(files[i], c) for i, caps in by_image.items() for c in caps or [None]]
    return _group_captions(pairs, name or path.stem, split)


def _albef_image_rule(first: str, image_root: Path) -> Callable[[str], str]:
    """How an ALBEF `image` entry becomes a path: `<image_root>/<image>` (ALBEF's own rule), or, when
    the first image is missing there but present under the release's rule, `<image_root>/<image
    without its first folder>` for the whole file. The release keeps only `image.split('/')[1]`
    under its data root, so `--images` may also be the folder that holds the files themselves."""
    if not (image_root / first).is_file() and len(Path(first).parts) > 1:
        stripped = Path(*Path(first).parts[1:])
        if (image_root / stripped).is_file():
            return lambda image: str(image_root / Path(*Path(image).parts[1:]))
    return lambda image: str(image_root / image)


def load_albef(path: str | Path, image_root: str | Path, split: str = "test", name: str | None = None) -> RetrievalData:
    """ALBEF-style annotation JSON, what the release's retrieval scripts read (`coco_test.json`,
    `flickr30k_test.json`): a list of `{"image": "val2014/x.jpg", "caption": ["...", ...]}` (a
    caption string is one caption). Images in list order (an image listed twice is one image with
    all its captions), captions in list order. The file is one split: `split` only names it."""
    path, image_root = Path(path), Path(image_root)
    _require_file(path, "ALBEF annotation JSON")
    entries = json.loads(path.read_text(encoding="utf-8"))
    if json_format(entries, path) != "albef":
        raise DatasetError(f'{path} is not an ALBEF annotation file (needs a list of {{"image", "caption"}})')
    resolve = _albef_image_rule(entries[0]["image"], image_root)
    pairs: list[tuple[ImageRef, str | None]] = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise DatasetError(f'{path}: entry {n} needs "image" and "caption", got {str(entry)[:80]}')
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        image = resolve(entry["image"])
        pairs += [(image, str(c).strip()) for c in captions] or [(image, None)]
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
    for sample in read_wds_split(root, split):
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
    """Load a retrieval set; `fmt` is karpathy, albef, coco, flickr, table, wds or auto (`detect_format`).

    Images listed without captions and blank captions are left out and counted in `notices` (see
    `_group_captions`), with a warning.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(
            f"retrieval annotations not found: {path}. Put e.g. the Karpathy split file dataset_coco.json "
            "there and the images under --images (COCO: <images>/val2014/*.jpg; Flickr30k: <images>/*.jpg), "
            "or ALBEF's coco_test.json / flickr30k_test.json, or CLIP_benchmark's coco_test_karpathy.json / "
            "flickr30k_test_karpathy.txt, or a CSV/JSONL with image,caption columns, or a CLIP_benchmark "
            "webdataset folder"
        )
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "wds":
        return _noticed(load_wds_retrieval(path, split, name))
    loaders = {
        "karpathy": load_karpathy,
        "albef": load_albef,
        "coco": load_coco_annotations,
        "flickr": load_flickr_annotations,
        "table": load_caption_table,
    }
    if fmt not in loaders:
        raise DatasetError(f"unknown retrieval format {fmt!r}; choose auto, {', '.join(loaders)} or wds")
    if image_root is None and fmt != "table":
        raise DatasetError(f"{fmt} annotations need the image folder (--images)")
    return _noticed(loaders[fmt](path, image_root, split=split, name=name))


_JSON_FORMATS = (
    'Karpathy\'s {"images": [{"filename", "sentences": [{"raw"}]}]}, COCO captions\' '
    '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]} '
    'or ALBEF\'s [{"image", "caption": [...]}]'
)


def json_format(data: Any, path: Path) -> str:
    """`karpathy`, `coco` or `albef` for parsed annotation JSON `data`; anything else is a DatasetError."""
    if isinstance(data, list):
        if data and isinstance(data[0], dict) and {"image", "caption"} <= data[0].keys():
            return "albef"
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        first = data["images"][0] if data["images"] else {}
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy"
        if "annotations" in data:
            return "coco"
    shape = f"a list of {len(data)}" if isinstance(data, list) else f"a {type(data).__name__}"
    if isinstance(data, dict):
        shape += f" with keys {sorted(data)[:6]}"
    raise DatasetError(
        f"{path} is not a retrieval annotation JSON this reader knows ({shape}); expected {_JSON_FORMATS}"
    )


def detect_format(path: Path) -> str:
    """The format of an annotation path: wds for a folder, by content for .json, flickr for .txt, else table."""
    if path.is_dir():
        return "wds"
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} is not valid JSON: {e}") from None
        return json_format(data, path)
    return "flickr" if path.suffix == ".txt" else "table"


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
