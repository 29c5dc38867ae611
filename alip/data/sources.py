"""Reading the inputs of data2rec and caption.py: manifests, img2dataset tars, caption sidecars.

A source yields `SourceSample`s: a key, where the image bytes are, the raw text and (maybe) a
caption. Rows that cannot become a sample (a field missing in one JSONL line) are returned as
skips with a reason, never dropped silently.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from alip.data.images import BadImage

MANIFEST_SUFFIXES = (".tsv", ".csv", ".jsonl", ".parquet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class InputError(ValueError):
    """Unusable input: a missing column, an empty manifest, an unreadable file."""


@dataclass(slots=True)
class SourceSample:
    key: str  # unique sample key (manifest key column / row number, img2dataset key)
    image: str  # file path, or "shard.tar" for an image inside a tar (see tar_offset)
    raw_text: str
    caption: str | None = None
    path: str | None = None  # the manifest's image path as written (caption sidecars may join on it)
    tar_offset: int = -1  # byte offset of the image inside an uncompressed tar, -1 for files
    size: int = -1  # image size in bytes when known (tars, stat), for size-based sharding

    @property
    def source(self) -> str:
        return f"{self.image}:{self.key}" if self.tar_offset >= 0 else self.image


@dataclass(slots=True)
class Skip:
    source: str
    reason: str


@dataclass
class Columns:
    image: str = "image"
    text: str = "text"
    caption: str | None = None
    key: str | None = None

    def required(self) -> list[str]:
        return [c for c in (self.image, self.text, self.caption, self.key) if c]


def read_rows(path: Path, columns: Columns) -> Iterable[dict]:
    """Rows of a manifest as dicts. Checks the required columns exist before yielding anything."""
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise InputError(f"{path}: manifest must be one of {MANIFEST_SUFFIXES}")
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        names = pq.read_schema(path).names
        _check_columns(path, names, columns)
        return pq.read_table(path, columns=columns.required()).to_pylist()
    if suffix == ".jsonl":
        return _jsonl_rows(path, columns)
    f = open(path, newline="", encoding="utf-8")
    reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    _check_columns(path, reader.fieldnames or [], columns)
    return _closing_rows(reader, f)


def _closing_rows(reader: csv.DictReader, f) -> Iterable[dict]:
    with f:
        yield from reader


def _jsonl_rows(path: Path, columns: Columns) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        first = True
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if first:  # a missing column is an error for the file, not a skip per row
                _check_columns(path, list(row), columns)
                first = False
            yield row


def _check_columns(path: Path, names: list[str], columns: Columns) -> None:
    missing = [c for c in columns.required() if c not in names]
    if missing:
        raise InputError(f"{path}: column(s) {missing} not found; the manifest has {names}")


def manifest_samples(
    path: Path, image_root: Path | None, columns: Columns, first_row: int = 0
) -> tuple[list[SourceSample], list[Skip]]:
    """Samples of one manifest. Image paths are relative to `image_root` (default: the manifest's folder)."""
    root = image_root if image_root is not None else path.parent
    samples, skips = [], []
    row_number = first_row - 1
    for row_number, row in enumerate(read_rows(path, columns), first_row):  # noqa: B007
        where = f"{path.name} row {row_number}"
        missing = [c for c in columns.required() if row.get(c) is None]
        if missing:
            skips.append(Skip(where, f"missing field(s) {missing}"))
            continue
        rel = str(row[columns.image])
        samples.append(
            SourceSample(
                key=str(row[columns.key]) if columns.key else str(row_number),
                image=str(root / rel),
                raw_text=str(row[columns.text]),
                caption=str(row[columns.caption]) if columns.caption else None,
                path=rel,
            )
        )
    if row_number < first_row:
        raise InputError(f"{path}: the manifest has no rows")
    return samples, skips


def tar_samples(path: Path, caption_field: str | None = None) -> tuple[list[SourceSample], list[Skip]]:
    """Samples of one img2dataset webdataset tar: `{key}.jpg` + `{key}.txt` (+ `{key}.json`).

    Images are not read here: only their offsets inside the tar, so a worker can read one image
    without scanning the tar again. Compressed tars cannot be addressed that way and are refused.
    """
    if path.suffix != ".tar":
        raise InputError(f"{path}: only uncompressed .tar shards are supported (img2dataset's default)")
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = member.name.rpartition(".")
                entry = groups.setdefault(stem, {})
                ext = "." + ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    entry["image"] = (member.offset_data, member.size)
                elif ext == ".txt":
                    entry["text"] = tar.extractfile(member).read().decode("utf-8", errors="replace")
                elif ext == ".json" and caption_field:
                    entry["json"] = json.loads(tar.extractfile(member).read() or b"{}")
    except tarfile.TarError as e:
        raise InputError(f"{path}: not a readable tar: {e}") from None
    samples, skips = [], []
    for stem, entry in groups.items():
        key = stem.rsplit("/", 1)[-1]
        if "image" not in entry or "text" not in entry:
            missing = [k for k in ("image", "text") if k not in entry]
            skips.append(Skip(f"{path}:{key}", f"tar member(s) missing: {missing}"))
            continue
        caption = entry.get("json", {}).get(caption_field) if caption_field else None
        offset, size = entry["image"]
        samples.append(SourceSample(key, str(path), entry["text"], caption, path=None, tar_offset=offset, size=size))
    if not groups:
        raise InputError(f"{path}: the tar holds no samples")
    return samples, skips


def read_caption_sidecar(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Captions by sample key and by image path from a JSONL or parquet sidecar.

    Each entry has "caption" and "key" and/or "path". Entries whose caption is null (a captioning
    failure) are left out, so those samples count as "no caption". A line with only "meta" is the
    sidecar's header (captioner settings) and is not an entry.
    """
    if not path.is_file():
        raise InputError(f"caption sidecar not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        entries = pq.read_table(path).to_pylist()
    else:
        entries = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{lineno}: not valid JSON: {e}") from None
    by_key, by_path = {}, {}
    for entry in entries:
        if set(entry) == {"meta"}:
            continue
        if "caption" not in entry or not ({"key", "path"} & set(entry)):
            raise InputError(f"{path}: entries need 'caption' and 'key' or 'path', got {sorted(entry)}")
        if entry["caption"] is None:
            continue
        if entry.get("key") is not None:
            by_key[str(entry["key"])] = str(entry["caption"])
        if entry.get("path") is not None:
            by_path[str(entry["path"])] = str(entry["caption"])
    return by_key, by_path


def read_image_bytes(sample: SourceSample) -> bytes:
    """The image bytes of a sample, from its file or from inside its tar. Raises BadImage if unreadable."""
    if sample.tar_offset >= 0:
        with open(sample.image, "rb") as f:
            f.seek(sample.tar_offset)
            return f.read(sample.size)
    try:
        with open(sample.image, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except OSError as e:
        raise BadImage(f"unreadable file: {e.strerror or e}") from None
