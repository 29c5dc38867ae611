"""Reading the inputs of data2rec and caption.py: manifests, img2dataset tars, caption sidecars.

A source yields `SourceSample`s: a key, where the image bytes are, the raw text and (maybe) a
caption. Rows that cannot become a sample (a field missing in one JSONL line, a TSV line with a
tab inside a text) are returned as skips with a reason, never dropped silently: every row of a
manifest is either a sample or a skip.

TSV is read literally, one line per row split on tabs, without CSV quoting: hand-written and
scraped TSVs (YFCC, img2dataset) are not quoted, and with quote semantics one stray `"` at the
start of a text swallows every following row into that text. CSV keeps standard quoting, read
strictly: malformed quoting refuses the file, naming the line.

Parquet manifests, embedded images and token-id columns are read by alip.data.ingest.typed_columns.

data2rec holds every sample of a dataset at once (to shuffle it), in columns: see
alip.data.ingest.sample_index (`SampleIndex`, `CaptionTable`).
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from alip.cli import UserError
from alip.data.format.images import BadImage
from alip.data.format.schema import CONTEXT_LENGTH
from alip.files import json_lines

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
    # a parquet row whose image bytes or token ids are read when its shard is written:
    parquet: str | None = None  # the manifest file
    row_group: int = -1  # its row group, -1 when nothing is read later
    row: int = -1  # the row's index inside that row group
    input_row: int = -1  # the row's number over all inputs (a --tokens-npy row), -1 for tar members
    # records with K > 1 caption slots: the captions of slots 2..K (None: none yet, or from a sidecar)
    more_captions: list[str | None] | None = None

    @property
    def embedded(self) -> bool:
        """The image bytes are inside the manifest (self.image is the parquet file)."""
        return self.parquet is not None and self.image == self.parquet

    @property
    def source(self) -> str:
        return f"{self.image}:{self.key}" if self.tar_offset >= 0 or self.embedded else self.image


@dataclass(slots=True)
class Skip:
    source: str
    reason: str


@dataclass(slots=True)
class BadRow:
    """A manifest row that does not fit the header (wrong field count, not a JSON object)."""

    reason: str


@dataclass(frozen=True)
class CaptionSource:
    """Where the captions of one slot of K > 1 come from: a manifest column (or img2dataset JSON field),
    strings or token ids, or a caption sidecar as tools/caption.py writes it."""

    name: str  # the slot's name in the meta JSON's "texts"
    column: str | None = None
    sidecar: Path | None = None  # neither: a slot of the token ids (--tokens-col / --tokens-npy, Columns.token_slots)

    def describe(self) -> str:
        if self.column:
            return f"column {self.column}"
        return str(self.sidecar) if self.sidecar else "token ids (--tokens-col / --tokens-npy)"


@dataclass
class Columns:
    image: str = "image"
    text: str | None = "text"  # None: the raw texts come from `tokens` or a --tokens-npy file
    caption: str | None = None
    key: str | None = None
    tokens: str | None = None  # parquet column of 77-id texts end to end (a label's layout: raw text, caption, ...)
    token_slots: tuple[int, ...] | None = None  # which 77-id slots of `tokens` (or the .npy) are raw text, caption
    # caption slots 2..K of records with K > 1 captions: the column of each (None: it comes from a sidecar)
    more_captions: tuple[str | None, ...] = ()

    def required(self) -> list[str]:
        return [c for c in (self.image, self.text, self.caption, self.key, self.tokens, *self.more_captions) if c]

    def caption_columns(self) -> list[str]:
        """The columns of every caption slot (for the checks that apply to each)."""
        return [c for c in (self.caption, *self.more_captions) if c]

    def slots(self, width: int | None = None) -> tuple[int, ...]:
        """The slots to read from rows of `width` ids: as given, else raw text and caption (raw text alone
        from a 77-wide .npy)."""
        if self.token_slots is not None:
            return self.token_slots
        return (0,) if width == CONTEXT_LENGTH else (0, 1)


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
        check_columns(path, names, columns)
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
        check_columns(path, header, columns)
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
            check_columns(path, header, columns)
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


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _jsonl_rows(path: Path, columns: Columns) -> Iterable[dict | BadRow]:
    first = True
    for lineno, row in json_lines(path, InputError):
        if not isinstance(row, dict):
            yield BadRow(f"line {lineno} is {JSON_TYPES.get(type(row), 'null')}, not a JSON object")
            continue
        if first:  # a missing column is an error for the file, not a skip per row
            check_columns(path, list(row), columns)
            first = False
        yield row


def check_columns(path: Path, names: list[str], columns: Columns) -> None:
    missing = [c for c in columns.required() if c not in names]
    if missing:
        raise InputError(f"{path}: column(s) {missing} not found; the manifest has {names}")


def manifest_samples(
    path: Path, image_root: Path | None, columns: Columns, first_row: int = 0
) -> tuple[list[SourceSample], list[Skip]]:
    """Samples of one manifest. Image paths are relative to `image_root` (default: the manifest's folder)."""
    samples, skips = [], []
    for item in iter_manifest(path, image_root, columns, first_row):
        (skips if isinstance(item, Skip) else samples).append(item)
    return samples, skips


def iter_manifest(
    path: Path, image_root: Path | None, columns: Columns, first_row: int = 0
) -> Iterator[SourceSample | Skip]:
    """The samples and skips of one TSV, CSV or JSONL manifest, row by row (`manifest_samples` as a
    stream). A parquet manifest has typed columns: alip.data.ingest.typed_columns.parquet_rows reads it."""
    if path.suffix.lower() == ".parquet":
        raise ValueError(f"{path}: parquet manifests are read by typed_columns.parquet_rows")
    root = image_root if image_root is not None else path.parent
    root_str = str(root)
    row_number = first_row - 1
    for row_number, row in enumerate(read_rows(path, columns), first_row):  # noqa: B007
        where = f"{path.name} row {row_number}"
        if isinstance(row, BadRow):
            yield Skip(where, row.reason)
            continue
        missing = [c for c in columns.required() if row.get(c) is None]
        if missing:
            yield Skip(where, f"missing field(s) {missing}")
            continue
        lists = [c for c in (columns.text, *columns.caption_columns()) if c and isinstance(row[c], list)]
        if lists:
            yield Skip(where, f"token ids: {lists} hold lists; token ids are read from parquet or --tokens-npy")
            continue
        rel = str(row[columns.image])
        yield SourceSample(
            key=str(row[columns.key]) if columns.key else str(row_number),
            image=image_path(root, rel, root_str),
            raw_text=str(row[columns.text]) if columns.text else "",
            caption=str(row[columns.caption]) if columns.caption else None,
            path=rel,
            input_row=row_number,
            more_captions=[str(row[c]) if c else None for c in columns.more_captions] or None,
        )
    if row_number < first_row:
        raise InputError(f"{path}: the manifest has no rows")


def image_path(root: Path, rel: str, root_str: str | None = None) -> str:
    """str(root / rel), without building a Path when the plain string is the same (a relative path with no
    empty or "." part under a root other than "/" or "."): pathlib costs a microsecond and more a row."""
    root_str = str(root) if root_str is None else root_str
    if (
        rel
        and rel[0] != "/"
        and rel[-1] != "/"
        and "//" not in rel
        and "/./" not in rel
        and rel != "."
        and not rel.startswith("./")
        and not rel.endswith("/.")
        and root_str[-1] != "/"
        and root_str != "."
    ):
        return root_str + "/" + rel
    return str(root / rel)


def tar_samples(
    path: Path, caption_field: str | None = None, more_fields: tuple[str | None, ...] = ()
) -> tuple[list[SourceSample], list[Skip]]:
    """Samples of one img2dataset webdataset tar: `{key}.jpg` + `{key}.txt` (+ `{key}.json`, whose
    `caption_field` is the caption, and `more_fields` those of caption slots 2..K; None: not from it).

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
                elif ext == ".json" and (caption_field or any(more_fields)):
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
        fields = entry.get("json", {})
        caption = fields.get(caption_field) if caption_field else None
        offset, size = entry["image"]
        sample = SourceSample(key, str(path), entry["text"], caption, tar_offset=offset, size=size, mtime_ns=tar_mtime)
        if more_fields:
            sample.more_captions = [_json_text(fields.get(f)) if f else None for f in more_fields]
        samples.append(sample)
    if not groups:
        raise InputError(f"{path}: the tar holds no samples")
    return samples, skips


def _json_text(value) -> str | None:
    return None if value is None else str(value)


def read_caption_sidecar(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Captions by sample key and by image path from a JSONL or parquet sidecar.

    Each entry has "caption" and "key" and/or "path". Entries whose caption is null (a captioning
    failure) are left out, so those samples count as "no caption". A line with only "meta" is the
    sidecar's header (captioner settings) and is not an entry. (data2rec joins a sidecar with
    `CaptionTable`, the same entries in columns.)
    """
    by_key, by_path = {}, {}
    for key, image_path, caption in sidecar_entries(path):
        if key is not None:
            by_key[key] = caption
        if image_path is not None:
            by_path[image_path] = caption
    return by_key, by_path


def sidecar_entries(path: Path) -> Iterator[tuple[str | None, str | None, str]]:
    """(key, image path, caption) of each entry of a caption sidecar with a caption, in file order,
    read as a stream (a parquet sidecar batch by batch)."""
    if not path.is_file():
        raise InputError(f"caption sidecar not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        entries = (entry for batch in pq.ParquetFile(path).iter_batches() for entry in batch.to_pylist())
    else:
        entries = (entry for _, entry in json_lines(path, InputError))
    for entry in entries:
        if set(entry) == {"meta"}:
            continue
        if "caption" not in entry or not ({"key", "path"} & set(entry)):
            raise InputError(f"{path}: entries need 'caption' and 'key' or 'path', got {sorted(entry)}")
        if entry["caption"] is None:
            continue
        key, image_path = entry.get("key"), entry.get("path")
        yield (
            None if key is None else str(key),
            None if image_path is None else str(image_path),
            str(entry["caption"]),
        )


CAPTION_META_KEY = b"alip_caption_meta"  # a parquet sidecar's header, in its schema metadata


def read_sidecar_header(path: Path) -> dict | None:
    """The header meta of a caption sidecar (the captioner's model and decoding settings, as
    tools/caption.py writes them), or None when it has none: only the first line (JSONL) or the
    schema metadata (parquet) is read."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        raw = (pq.read_schema(path).metadata or {}).get(CAPTION_META_KEY)
        return json.loads(raw) if raw else None
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return None  # read_caption_sidecar reports a broken line with its number
    return row["meta"] if isinstance(row, dict) and set(row) == {"meta"} else None


def read_image_bytes(sample: SourceSample) -> bytes:
    """The image bytes of a sample, from its file or from inside its tar. Raises BadImage if unreadable.

    Images embedded in a parquet manifest are read by row group with `read_inputs`, not one by one."""
    if sample.embedded:
        raise BadImage("image embedded in a parquet manifest: not readable one by one (see typed_columns.read_inputs)")
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
