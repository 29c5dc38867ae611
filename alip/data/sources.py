"""Reading the inputs of data2rec and caption.py: manifests, img2dataset tars, caption sidecars.

A source yields `SourceSample`s: a key, where the image bytes are, the raw text and (maybe) a
caption. Rows that cannot become a sample (a field missing in one JSONL line, a TSV line with a
tab inside a text) are returned as skips with a reason, never dropped silently: every row of a
manifest is either a sample or a skip.

TSV is read literally, one line per row split on tabs, without CSV quoting: hand-written and
scraped TSVs (YFCC, img2dataset) are not quoted, and with quote semantics one stray `"` at the
start of a text swallows every following row into that text. CSV keeps standard quoting, read
strictly: malformed quoting refuses the file, naming the line.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from alip.cli import UserError
from alip.data.images import BadImage

MANIFEST_SUFFIXES = (".tsv", ".csv", ".jsonl", ".parquet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class InputError(UserError, ValueError):
    """Unusable input: a missing column, an empty manifest, an unreadable file, a bad option."""


@dataclass(slots=True)
class SourceSample:
    key: str  # unique sample key (manifest key column / row number, img2dataset key)
    image: str  # file path, or "shard.tar" for an image inside a tar (see tar_offset)
    raw_text: str
    caption: str | None = None
    path: str | None = None  # the manifest's image path as written (caption sidecars may join on it)
    tar_offset: int = -1  # byte offset of the image inside an uncompressed tar, -1 for files
    size: int = -1  # image size in bytes when known (tars, stat), for size-based sharding
    mtime_ns: int = -1  # modification time of the image file (of the tar for tar members), when known

    @property
    def source(self) -> str:
        return f"{self.image}:{self.key}" if self.tar_offset >= 0 else self.image


@dataclass(slots=True)
class Skip:
    source: str
    reason: str


@dataclass(slots=True)
class BadRow:
    """A manifest row that does not fit the header (wrong field count, not a JSON object)."""

    reason: str


@dataclass
class Columns:
    image: str = "image"
    text: str = "text"
    caption: str | None = None
    key: str | None = None

    def required(self) -> list[str]:
        return [c for c in (self.image, self.text, self.caption, self.key) if c]


def read_rows(path: Path, columns: Columns) -> Iterable[dict | BadRow]:
    """Rows of a manifest as dicts, or BadRow for a row that does not fit the header.

    Checks the required columns exist before yielding anything.
    """
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise InputError(f"{path}: manifest must be one of {MANIFEST_SUFFIXES}")
    if suffix == ".parquet":  # a typed table: every row has every column, no field count to check
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        names = pq.read_schema(path).names
        _check_columns(path, names, columns)
        return pq.read_table(path, columns=columns.required()).to_pylist()
    if suffix == ".jsonl":
        return _jsonl_rows(path, columns)
    if suffix == ".tsv":
        return _tsv_rows(path, columns)
    return _csv_rows(path, columns)


def _tsv_rows(path: Path, columns: Columns) -> Iterable[dict | BadRow]:
    # newline="\n": a stray carriage return inside a text must not split its line
    with open(path, encoding="utf-8", newline="\n") as f:
        header = _split_tsv_line(f.readline())
        _check_columns(path, header, columns)
        for lineno, line in enumerate(f, 2):
            fields = _split_tsv_line(line)
            if fields == [""]:
                continue  # a blank line is no row
            if len(fields) != len(header):
                yield BadRow(
                    f"line {lineno}: {len(fields)} tab-separated fields, the header has {len(header)} "
                    "(a tab or line break inside a text?)"
                )
            else:
                yield dict(zip(header, fields, strict=True))


def _split_tsv_line(line: str) -> list[str]:
    line = line.removesuffix("\n").removesuffix("\r")  # LF or CRLF files
    return line.split("\t")


def _csv_rows(path: Path, columns: Columns) -> Iterable[dict | BadRow]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, [])
            _check_columns(path, header, columns)
            first_line = reader.line_num + 1
            for fields in reader:
                # a quoted text may hold line breaks: a row spans lines first_line..reader.line_num
                last_line = reader.line_num
                lines = f"line {first_line}" if first_line == last_line else f"lines {first_line}-{last_line}"
                first_line = last_line + 1
                if not fields:
                    continue  # a blank line is no row
                if len(fields) != len(header):
                    yield BadRow(f"{lines}: {len(fields)} comma-separated fields, the header has {len(header)}")
                else:
                    yield dict(zip(header, fields, strict=True))
        except csv.Error as e:
            raise InputError(
                f"{path}: line {reader.line_num}: malformed CSV quoting ({e}); quote texts as CSV does "
                '("" for a quote inside a quoted text), or write the manifest as TSV or JSONL'
            ) from None


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _jsonl_rows(path: Path, columns: Columns) -> Iterable[dict | BadRow]:
    with open(path, encoding="utf-8") as f:
        first = True
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                yield BadRow(f"line {lineno} is {_JSON_TYPES.get(type(row), 'null')}, not a JSON object")
                continue
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
        if isinstance(row, BadRow):
            skips.append(Skip(where, row.reason))
            continue
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
    tar_mtime = path.stat().st_mtime_ns
    samples, skips = [], []
    for stem, entry in groups.items():
        key = stem.rsplit("/", 1)[-1]
        if "image" not in entry or "text" not in entry:
            missing = [k for k in ("image", "text") if k not in entry]
            skips.append(Skip(f"{path}:{key}", f"tar member(s) missing: {missing}"))
            continue
        caption = entry.get("json", {}).get(caption_field) if caption_field else None
        offset, size = entry["image"]
        samples.append(
            SourceSample(key, str(path), entry["text"], caption, tar_offset=offset, size=size, mtime_ns=tar_mtime)
        )
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
