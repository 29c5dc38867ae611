"""Reading the inputs of data2rec and caption.py: manifests, img2dataset tars, caption sidecars.

A source yields `SourceSample`s: a key, where the image bytes are, the raw text and (maybe) a
caption. Rows that cannot become a sample (a field missing in one JSONL line, a TSV line with a
tab inside a text) are returned as skips with a reason, never dropped silently: every row of a
manifest is either a sample or a skip.

TSV is read literally, one line per row split on tabs, without CSV quoting: hand-written and
scraped TSVs (YFCC, img2dataset) are not quoted, and with quote semantics one stray `"` at the
start of a text swallows every following row into that text. CSV keeps standard quoting, read
strictly: malformed quoting refuses the file, naming the line.

Parquet manifests, embedded images and token-id columns are read by alip.data.typed_columns.

data2rec holds every sample of a dataset at once (to shuffle it), so its index is columnar
(`SampleIndex`): the strings of all samples in Arrow's layout (UTF-8 bytes end to end and int64
offsets, `StringColumn`) and the numbers in NumPy arrays, about 250 bytes a sample instead of the
680 of one `SourceSample` with its five Python strings. `SourceSample`s are built from it on
demand, a shard's worth at a time. Caption sidecars are joined the same way (`CaptionTable`).
"""

from __future__ import annotations

import csv
import itertools
import json
import tarfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alip.cli import UserError
from alip.data.images import BadImage
from alip.data.schema import CONTEXT_LENGTH
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
    """The samples and skips of one manifest, row by row (`manifest_samples` as a stream)."""
    root = image_root if image_root is not None else path.parent
    root_str = str(root)
    if path.suffix.lower() == ".parquet":
        from alip.data.typed_columns import parquet_rows  # pyarrow only for parquet; that module builds on this one

        yield from parquet_rows(path, root, columns, first_row)
        return
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


# ---------------------------------------------------------------- the columnar index

CHUNK = 8_192  # rows turned into Python objects at a time (building columns, reading them back)


class StringColumn:
    """Strings (or None) in Arrow's layout: their UTF-8 bytes end to end in one buffer, and int64
    offsets. A string costs its length + 8 bytes; a Python str costs 49 + its length, plus a pointer.

    pyarrow is an optional dependency (parquet), so TSV/CSV/JSONL manifests keep the layout in a
    bytearray and NumPy. Lone surrogates (JSON allows them) round-trip ("surrogatepass")."""

    __slots__ = ("data", "offsets", "valid")

    def __init__(self, data: bytes | bytearray, offsets: np.ndarray, valid: np.ndarray | None = None) -> None:
        self.data = data
        self.offsets = offsets  # [n + 1] int64
        self.valid = valid  # [n] bool, False where the value is None; None: no value is None

    @classmethod
    def full(cls, value: str | None, n: int) -> StringColumn:
        """n times the same value: `value` ("" or None) stored once, whatever n."""
        data = b"" if value is None else value.encode("utf-8", "surrogatepass")
        offsets = np.zeros(n + 1, np.int64) if not data else np.arange(n + 1, dtype=np.int64) * len(data)
        return cls(data * (n if data else 0), offsets, None if value is not None else np.zeros(n, bool))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str | None:
        return self.take(np.asarray([i], np.int64))[0]

    def __iter__(self) -> Iterator[str | None]:
        for first in range(0, len(self), CHUNK):
            yield from self.take(np.arange(first, min(first + CHUNK, len(self))))

    def take(self, rows: np.ndarray) -> list[str | None]:
        """The values at `rows` (int64 positions) as Python strings."""
        data = self.data
        starts, ends = self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
        out = [data[a:b].decode("utf-8", "surrogatepass") for a, b in zip(starts, ends, strict=True)]
        if self.valid is not None:
            for j in np.flatnonzero(~self.valid[rows]).tolist():
                out[j] = None
        return out

    def has_none(self) -> bool:
        return self.valid is not None and not self.valid.all()


class StringColumnBuilder:
    """Appends strings (or None) to a StringColumn: `pending` collects Python strings, `flush` moves
    them into the buffer (call it every CHUNK rows or so), `finish` returns the column."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.offsets = array("q", [0])
        self.nulls: list[tuple[int, np.ndarray]] = []  # (first row of a chunk, which of its values are None)
        self.pending: list[str | None] = []

    def flush(self) -> None:
        chunk = self.pending
        if not chunk:
            return
        if None in chunk:
            self.nulls.append((len(self.offsets) - 1, np.fromiter((s is None for s in chunk), bool, len(chunk))))
            chunk = ["" if s is None else s for s in chunk]
        joined = "".join(chunk).encode("utf-8", "surrogatepass")
        lengths = list(map(len, chunk))  # characters: bytes too when every character is ASCII
        if len(joined) != sum(lengths):
            lengths = [len(s.encode("utf-8", "surrogatepass")) for s in chunk]
        self.offsets.extend(itertools.accumulate(lengths, initial=self.offsets[-1]))
        self.offsets.pop(len(self.offsets) - len(lengths) - 1)  # the repeated initial offset
        self.data += joined
        self.pending.clear()  # the same list: IndexBuilder holds its append method

    def finish(self) -> StringColumn:
        self.flush()
        n = len(self.offsets) - 1
        valid = None
        if self.nulls:
            valid = np.ones(n, bool)
            for first, nulls in self.nulls:
                valid[first : first + len(nulls)] = ~nulls
        return StringColumn(self.data, np.frombuffer(self.offsets, np.int64), valid)


STRING_FIELDS = ("key", "image", "raw_text", "caption", "path")
MAX_PREFIXES = 1 << 20  # image folders kept once (SampleIndex.image_prefix); more are stored whole
INT_FIELDS = ("tar_offset", "size", "mtime_ns", "row_group", "row", "input_row")


class SampleIndex:
    """Every sample of data2rec's inputs, in columns: the strings of `SourceSample` as StringColumns,
    its numbers as int64 arrays (None: -1 for every sample), the parquet file as a number into
    `parquet_files`, caption slots 2..K as one StringColumn each.

    It reads as a sequence of SourceSamples (len, [i], iteration), each built when asked for;
    `samples(rows)` builds a shard's worth at once. `rows` selects the samples among the stored
    rows (None: all): the rows whose caption is missing are dropped without copying the columns.
    Positions passed to `samples`, `strings`, `ints` are stored rows ("physical"); `physical`
    maps sample positions to them.

    An image path is mostly a folder (the manifest's image root, the tar) followed by the manifest's
    path as written: then only the folder's number is stored (`image_prefix` into `prefixes`), and
    the "image" column holds "" (`images` puts the two together).
    """

    def __init__(
        self,
        strings: dict[str, StringColumn],
        ints: dict[str, np.ndarray | None],
        parquet: np.ndarray | None,
        parquet_files: list[str],
        more: list[StringColumn] | None,
        num_rows: int,
        image_prefix: np.ndarray | None = None,
        prefixes: list[str] | None = None,
    ) -> None:
        self.strings = strings
        self.ints = ints
        self.parquet = parquet  # [n] int32 into parquet_files, -1 for no file; None: no sample has one
        self.parquet_files = parquet_files
        self.more = more  # caption slots 2..K (None: K = 1, SourceSample.more_captions is None)
        self.num_rows = num_rows
        self.rows: np.ndarray | None = None
        self.image_prefix = image_prefix  # [n] int32 into prefixes: image = prefix + (path or ""); -1: in "image"
        self.prefixes = prefixes or []

    @classmethod
    def from_samples(cls, samples: list[SourceSample]) -> SampleIndex:
        builder = IndexBuilder(len(samples[0].more_captions or ()) if samples else 0)
        for s in samples:
            builder.add(s)
        return builder.finish()

    def __len__(self) -> int:
        return self.num_rows if self.rows is None else len(self.rows)

    @property
    def nbytes(self) -> int:
        """The bytes its columns hold."""
        strings = [*self.strings.values(), *(self.more or [])]
        arrays = [*(c.offsets for c in strings), *(c.valid for c in strings), *self.ints.values()]
        arrays += [self.parquet, self.rows, self.image_prefix]
        return sum(len(c.data) for c in strings) + sum(a.nbytes for a in arrays if a is not None)

    def physical(self, positions: np.ndarray) -> np.ndarray:
        """The stored rows of the samples at `positions`."""
        return positions if self.rows is None else self.rows[positions]

    def all_rows(self) -> np.ndarray:
        return np.arange(self.num_rows, dtype=np.int64) if self.rows is None else self.rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.samples(self.physical(np.arange(len(self))[i]))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of {n}")
        return self.samples(self.physical(np.asarray([i % n], np.int64)))[0]

    def __iter__(self) -> Iterator[SourceSample]:
        rows = self.all_rows()
        for first in range(0, len(rows), CHUNK):
            yield from self.samples(rows[first : first + CHUNK])

    def int_values(self, name: str, rows: np.ndarray) -> np.ndarray:
        column = self.ints[name]
        return np.full(len(rows), -1, np.int64) if column is None else column[rows]

    def writable_ints(self, name: str) -> np.ndarray:
        """The int64 column `name`, allocated (-1 everywhere) if it was not stored."""
        if self.ints[name] is None:
            self.ints[name] = np.full(self.num_rows, -1, np.int64)
        return self.ints[name]

    def images(self, rows: np.ndarray, paths: list[str | None] | None = None) -> list[str]:
        """SourceSample.image of the stored rows `rows` (`paths`: their "path" values, when already read)."""
        images = self.strings["image"].take(rows)
        if self.image_prefix is None:
            return images
        if paths is None:
            paths = self.strings["path"].take(rows)
        prefixes = self.prefixes
        return [
            prefixes[p] + (path or "") if p >= 0 else image
            for p, path, image in zip(self.image_prefix[rows].tolist(), paths, images, strict=True)
        ]

    def parquet_values(self, rows: np.ndarray) -> list[str | None]:
        if self.parquet is None:
            return [None] * len(rows)
        files = self.parquet_files
        return [files[f] if f >= 0 else None for f in self.parquet[rows].tolist()]

    def more_values(self, rows: np.ndarray) -> list[list[str | None]] | None:
        """Caption slots 2..K of each row (SourceSample.more_captions), None with K = 1."""
        if self.more is None:
            return None
        return [list(slots) for slots in zip(*(m.take(rows) for m in self.more), strict=True)]

    def samples(self, rows: np.ndarray) -> list[SourceSample]:
        """SourceSamples of the stored rows `rows` (int64 array), in that order."""
        strings = [self.strings[name].take(rows) for name in STRING_FIELDS]
        strings[1] = self.images(rows, strings[4])  # image, from path
        ints = [self.int_values(name, rows).tolist() for name in INT_FIELDS]
        more = self.more_values(rows) or itertools.repeat(None)
        return [
            SourceSample(key, image, raw, cap, path, tar, size, mtime, parquet, group, row, input_row, slots)
            for key, image, raw, cap, path, tar, size, mtime, group, row, input_row, parquet, slots in zip(
                *strings,
                *ints,
                self.parquet_values(rows),
                more,
                strict=False,  # `more` may repeat None
            )
        ]


class IntColumnBuilder:
    """Appends integers to a NumPy column; a column of -1 only (no tar offsets in a manifest, no row groups
    outside parquet) is never stored: `finish` returns None."""

    def __init__(self, typecode: str = "q") -> None:
        self.typecode = typecode
        self.values: array | None = None
        self.defaults = 0  # rows of -1 before the first other value
        self.pending: list[int] = []

    def flush(self) -> None:
        chunk = self.pending
        if self.values is None and chunk.count(-1) == len(chunk):
            self.defaults += len(chunk)
        else:
            if self.values is None:
                self.values = array(self.typecode, [-1]) * self.defaults
            self.values.extend(chunk)
        chunk.clear()  # the same list: IndexBuilder holds its append method

    def finish(self) -> np.ndarray | None:
        self.flush()
        return None if self.values is None else np.frombuffer(self.values, np.dtype(self.typecode))


class IndexBuilder:
    """Builds a SampleIndex from SourceSamples added one at a time (none of them kept)."""

    def __init__(self, more: int = 0) -> None:
        self.strings = {name: StringColumnBuilder() for name in STRING_FIELDS}
        self.ints = {name: IntColumnBuilder() for name in INT_FIELDS}
        self.parquet = IntColumnBuilder("i")
        self.parquet_ids: dict[str, int] = {}
        self.image_prefix = IntColumnBuilder("i")
        self.prefix_ids: dict[str, int] = {}
        self.more_count = more  # caption slots 2..K per sample (0: K = 1, more_captions is None)
        self.more = [StringColumnBuilder() for _ in range(more)]
        self.n = 0
        self.columns = [*self.strings.values(), *self.ints.values(), self.parquet, self.image_prefix, *self.more]
        self.appends = tuple(c.pending.append for c in self.columns[: len(STRING_FIELDS) + len(INT_FIELDS)])

    def add(self, s: SourceSample) -> None:
        if (s.more_captions is not None or self.more_count) and len(s.more_captions or ()) != self.more_count:
            raise ValueError(f"{s.key}: caption slots 2..K {s.more_captions}, expected {self.more_count} of them")
        key, image, raw_text, caption, path, tar_offset, size, mtime_ns, row_group, row, input_row = self.appends
        key(s.key)
        raw_text(s.raw_text)
        caption(s.caption)
        path(s.path)
        tar_offset(s.tar_offset)
        size(s.size)
        mtime_ns(s.mtime_ns)
        row_group(s.row_group)
        row(s.row)
        input_row(s.input_row)
        parquet = -1 if s.parquet is None else self.parquet_ids.setdefault(s.parquet, len(self.parquet_ids))
        self.parquet.pending.append(parquet)
        # the image's folder once (SampleIndex.image_prefix), when the image is that folder + the path as written
        rest = s.path or ""
        prefix = -1
        if s.image.endswith(rest):
            folder = s.image[: len(s.image) - len(rest)]
            prefix = self.prefix_ids.get(folder, -1)
            if prefix < 0 and len(self.prefix_ids) < MAX_PREFIXES:
                prefix = self.prefix_ids[folder] = len(self.prefix_ids)
        self.image_prefix.pending.append(prefix)
        image("" if prefix >= 0 else s.image)
        if self.more_count:
            for column, value in zip(self.more, s.more_captions, strict=True):
                column.pending.append(value)
        self.n += 1
        if self.n % CHUNK == 0:
            for column in self.columns:
                column.flush()

    def finish(self) -> SampleIndex:
        strings = {name: b.finish() for name, b in self.strings.items()}
        ints = {name: b.finish() for name, b in self.ints.items()}
        more = [b.finish() for b in self.more] if self.more_count else None
        files = sorted(self.parquet_ids, key=self.parquet_ids.get)
        prefixes = sorted(self.prefix_ids, key=self.prefix_ids.get)
        image_prefix = self.image_prefix.finish()
        return SampleIndex(strings, ints, self.parquet.finish(), files, more, self.n, image_prefix, prefixes)


_hash = hash  # a name, so that a test can force collisions


class _Lookup:
    """dict.get over a StringColumn of names with their values, by 64-bit hashes sorted in NumPy (16
    bytes a name): for a name given several times, its last value wins, as in a dict."""

    def __init__(self, names: StringColumn, values: StringColumn) -> None:
        self.names, self.values = names, values
        hashes = np.fromiter((_hash(k) for k in names), np.int64, count=len(names))
        self.order = np.argsort(hashes, kind="stable")  # equal hashes keep file order: the last is last
        self.sorted = hashes[self.order]

    def get(self, queries: list[str | None]) -> list[str | None]:
        """The value of each query (None: no such name, or the query is None)."""
        out: list[str | None] = [None] * len(queries)
        asked = [j for j, q in enumerate(queries) if q is not None]
        if not asked or not len(self.order):
            return out
        wanted = [queries[j] for j in asked]
        h = np.fromiter((_hash(q) for q in wanted), np.int64, count=len(wanted))
        lo, hi = np.searchsorted(self.sorted, h, "left"), np.searchsorted(self.sorted, h, "right")
        hit = np.flatnonzero(hi > lo)
        last = self.order[hi[hit] - 1]
        positions = last.tolist()
        for n, (j, name) in enumerate(zip(hit.tolist(), self.names.take(last), strict=True)):
            if name != wanted[j]:  # a hash collision: look through the other names with this hash
                same = self.order[lo[j] : hi[j] - 1][::-1].tolist()
                positions[n] = next((p for p in same if self.names[p] == wanted[j]), -1)
        found = [(asked[j], p) for j, p in zip(hit.tolist(), positions, strict=True) if p >= 0]
        values = self.values.take(np.asarray([p for _, p in found], np.int64))
        for (i, _), value in zip(found, values, strict=True):
            out[i] = value
        return out


class CaptionTable:
    """A caption sidecar in columns, for a join by key or image path (data2rec's --captions): the
    semantics of `read_caption_sidecar`'s two dicts without 15M Python strings in each."""

    def __init__(self, path: Path) -> None:
        keys, key_captions, paths, path_captions = (StringColumnBuilder() for _ in range(4))
        for n, (key, image_path, caption) in enumerate(sidecar_entries(path), 1):
            if key is not None:
                keys.pending.append(key)
                key_captions.pending.append(caption)
            if image_path is not None:
                paths.pending.append(image_path)
                path_captions.pending.append(caption)
            if n % CHUNK == 0:
                for b in (keys, key_captions, paths, path_captions):
                    b.flush()
        self.by_key = _Lookup(keys.finish(), key_captions.finish())
        self.by_path = _Lookup(paths.finish(), path_captions.finish())

    def captions(self, keys: list[str], paths: list[str | None]) -> list[str | None]:
        """The caption of each sample (key, image path): by key, else by path (when the key gives none
        or an empty one), else None."""
        by_key = self.by_key.get(keys)
        if not self.has_paths:
            return by_key
        by_path = self.by_path.get([p if p else None for p in paths])
        return [k or p for k, p in zip(by_key, by_path, strict=True)]

    @property
    def has_paths(self) -> bool:
        return len(self.by_path.names) > 0
