"""Reading the inputs of data2rec and caption.py: manifests, img2dataset tars, caption sidecars.

A source yields `SourceSample`s: a key, where the image bytes are, the raw text and (maybe) a
caption. Rows that cannot become a sample (a field missing in one JSONL line, a TSV line with a
tab inside a text) are returned as skips with a reason, never dropped silently: every row of a
manifest is either a sample or a skip.

TSV is read literally, one line per row split on tabs, without CSV quoting: hand-written and
scraped TSVs (YFCC, img2dataset) are not quoted, and with quote semantics one stray `"` at the
start of a text swallows every following row into that text. CSV keeps standard quoting, read
strictly: malformed quoting refuses the file, naming the line.

Parquet manifests may also hold the images themselves and texts already tokenised (the form of
most image datasets on the Hugging Face hub, and of the published YFCC15M). A column's kind is
read from its type (`column_kind`): a string image column holds paths, a `binary` one image
bytes, a `struct<bytes, path>` one the `datasets` Image feature; a text column holds strings or
CLIP token ids (`list<int>`, or fixed 77-id rows). Indexing reads only the cheap columns (paths,
strings, keys); image bytes and token ids stay in the file, and a sample keeps only its location
(file, row group, row). The worker that writes a shard reads them by row group
(`read_inputs`), so no stage holds a whole parquet file in memory. JSONL manifests name images by
path and hold strings only; token ids also come from a `--tokens-npy` file, joined by row order.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alip.cli import UserError
from alip.data.images import BadImage
from alip.data.schema import CONTEXT_LENGTH, END_OF_TEXT, START_OF_TEXT, VOCAB_SIZE
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
    first = True
    for lineno, row in json_lines(path, InputError):
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
    if path.suffix.lower() == ".parquet":
        return _parquet_samples(path, root, columns, first_row)
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
        lists = [c for c in (columns.text, *columns.caption_columns()) if c and isinstance(row[c], list)]
        if lists:
            skips.append(Skip(where, f"token ids: {lists} hold lists; token ids are read from parquet or --tokens-npy"))
            continue
        rel = str(row[columns.image])
        samples.append(
            SourceSample(
                key=str(row[columns.key]) if columns.key else str(row_number),
                image=str(root / rel),
                raw_text=str(row[columns.text]) if columns.text else "",
                caption=str(row[columns.caption]) if columns.caption else None,
                path=rel,
                input_row=row_number,
                more_captions=[str(row[c]) if c else None for c in columns.more_captions] or None,
            )
        )
    if row_number < first_row:
        raise InputError(f"{path}: the manifest has no rows")
    return samples, skips


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
        entries = [entry for _, entry in json_lines(path, InputError)]
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
        raise BadImage("image embedded in a parquet manifest: not readable one by one (see sources.read_inputs)")
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


# ---------------------------------------------------------------- typed columns: parquet, token ids

IMAGE_PATH = "image path"
IMAGE_BYTES = "image bytes"
IMAGE_STRUCT = "HF image struct"
TEXT = "text"
TOKEN_IDS = "token ids"
OTHER = "other"
IMAGE_KINDS = (IMAGE_BYTES, IMAGE_STRUCT)  # embedded images; a path is a string column (TEXT by type)


def column_kind(arrow_type) -> str:
    """What a column holds, from its Arrow type alone. A string column is TEXT (it may hold image paths)."""
    import pyarrow as pa

    t = arrow_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return TEXT
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return IMAGE_BYTES
    if pa.types.is_struct(t):
        fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        data = fields.get("bytes")
        if data is not None and (pa.types.is_binary(data) or pa.types.is_large_binary(data)):
            return IMAGE_STRUCT  # datasets.Image: struct<bytes: binary, path: string>
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        v = t.value_type
        if pa.types.is_integer(v) or pa.types.is_floating(v):  # float ids are checked to be integral
            return TOKEN_IDS
    return OTHER


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError... for a file that is no parquet
        raise InputError(f"{path}: not a readable parquet file: {e}") from None


def _column_size(meta, group: int, column: str) -> int:
    """Compressed bytes of `column` (all its leaves) in one row group, from the footer alone."""
    rg = meta.row_group(group)
    return sum(
        rg.column(i).total_compressed_size
        for i in range(rg.num_columns)
        if rg.column(i).path_in_schema.split(".", 1)[0] == column
    )


def _parquet_samples(path: Path, root: Path, columns: Columns, first_row: int) -> tuple[list[SourceSample], list[Skip]]:
    """Samples of a parquet manifest, read one row group at a time and only its cheap columns."""
    pf = _parquet_file(path)
    schema = pf.schema_arrow
    _check_columns(path, schema.names, columns)
    kinds = {name: column_kind(schema.field(name).type) for name in schema.names}
    image_kind = kinds[columns.image]
    if image_kind not in (TEXT, *IMAGE_KINDS):
        raise InputError(
            f"{path}: image column {columns.image!r} is {schema.field(columns.image).type}; expected image paths "
            "(string), image bytes (binary) or a {bytes, path} struct (tools/data2rec.py --show-schema lists them)"
        )
    for col in (columns.text, *columns.caption_columns()):
        if col and col != columns.image and kinds[col] not in (TEXT, TOKEN_IDS):  # caption.py: text == image
            raise InputError(
                f"{path}: text column {col!r} is {schema.field(col).type}; expected strings or token ids (list<int>)"
            )
    if columns.tokens and (kinds[columns.tokens] != TOKEN_IDS or columns.text):
        raise InputError(
            f"{path}: --tokens-col {columns.tokens!r} ({schema.field(columns.tokens).type}) must be a list of ids "
            "and gives the raw text itself (no --text-col with it)"
        )
    texts = (columns.image, columns.text, columns.tokens, *columns.caption_columns())
    deferred = {c for c in texts if c and kinds[c] != TEXT}
    tokens_caption = columns.tokens and not columns.caption and len(columns.slots()) > 1
    cheap = list(dict.fromkeys(c for c in columns.required() if c not in deferred))
    embedded = image_kind in IMAGE_KINDS
    mtime = path.stat().st_mtime_ns
    file = str(path)  # one string shared by every row's sample: 15M rows would hold 15M copies otherwise
    samples, skips = [], []
    row_number = first_row - 1
    for group in range(pf.num_row_groups):
        num_rows = pf.metadata.row_group(group).num_rows
        values = pf.read_row_group(group, columns=cheap).to_pydict() if cheap else {}
        # the shard planner's size estimate: this row group's image bytes spread evenly over its rows
        size = _column_size(pf.metadata, group, columns.image) // max(num_rows, 1) if embedded else -1
        for r in range(num_rows):
            row_number += 1
            missing = [c for c in cheap if values[c][r] is None]
            if missing:
                skips.append(Skip(f"{path.name} row {row_number}", f"missing field(s) {missing}"))
                continue
            rel = None if embedded else str(values[columns.image][r])
            sample = SourceSample(
                key=str(values[columns.key][r]) if columns.key else str(row_number),
                image=file if embedded else str(root / rel),
                raw_text=_cheap_text(values, columns.text, r) or "",
                caption="" if tokens_caption else _cheap_text(values, columns.caption, r),
                path=rel,
                input_row=row_number,
            )
            if columns.more_captions:
                sample.more_captions = [_cheap_text(values, c, r) for c in columns.more_captions]
            if deferred:
                sample.parquet, sample.row_group, sample.row = file, group, r
            if embedded:
                sample.size, sample.mtime_ns = size, mtime
            samples.append(sample)
    if row_number < first_row:
        raise InputError(f"{path}: the manifest has no rows")
    return samples, skips


def _cheap_text(values: dict, column: str | None, r: int) -> str | None:
    """A string column's value; "" for a token-id column (read later); None without a column."""
    if not column:
        return None
    return str(values[column][r]) if column in values else ""


class BadTokens(ValueError):
    """A row of token ids that cannot enter a shard; str(e) is the reason."""


def check_token_ids(ids) -> np.ndarray:
    """Token ids (a list or array) -> the int64 [77] row our label holds, or raise BadTokens.

    The row must open with the start token and hold an end token; every id must be an integer in
    0..VOCAB_SIZE-1. Whatever follows the first end token must be padding (0, or the end token,
    which Hugging Face's CLIP tokenizer pads with). A row longer than 77 is cut to 77 keeping the
    end token last, as open_clip's tokenizer truncates strings. An all-zero row is an empty text.
    """
    a = np.asarray(ids)
    if a.ndim != 1:
        raise BadTokens(f"token ids must be one list per text, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.number):
        raise BadTokens(f"token ids must be numbers, got {a.dtype}")
    a = a.astype(np.float64)
    bad = ~np.isfinite(a) | (a != np.rint(a)) | (a < 0) | (a >= VOCAB_SIZE)
    if bad.any():
        i = int(np.argmax(bad))
        raise BadTokens(f"id {a[i]:g} at position {i} is not a token id (an integer in 0..{VOCAB_SIZE - 1})")
    a = a.astype(np.int64)
    row = np.zeros(CONTEXT_LENGTH, np.int64)
    if a.size and not a.any():
        return row  # all padding: an empty text
    if a.size == 0 or a[0] != START_OF_TEXT:
        first = int(a[0]) if a.size else "nothing"
        raise BadTokens(f"starts with {first}, not the start token {START_OF_TEXT}")
    ends = np.flatnonzero(a == END_OF_TEXT)
    if ends.size == 0:
        raise BadTokens(f"no end token {END_OF_TEXT}")
    end = int(ends[0])
    tail = a[end + 1 :]
    if ((tail != 0) & (tail != END_OF_TEXT)).any():
        raise BadTokens(
            f"ids other than padding after the end token at position {end} (several texts end to end? see --tokens-col)"
        )
    text = a[: end + 1]
    if text.size > CONTEXT_LENGTH:  # keep the end token, as open_clip does for long strings
        text = np.concatenate([text[: CONTEXT_LENGTH - 1], [END_OF_TEXT]])
    row[: text.size] = text
    return row


def decode_tokens(tokenizer, row: np.ndarray) -> str:
    """The text of a checked [77] id row (open_clip's SimpleTokenizer.decode, without start/end tokens)."""
    ends = np.flatnonzero(row == END_OF_TEXT)
    if not row.any() or not ends.size:
        return ""
    return tokenizer.decode(row[1 : ends[0]].tolist()).strip()


def open_tokens_npy(path: Path):
    """A token .npy memory-mapped: [N, 154] (raw text and caption, our label layout) or [N, 77] (raw text)."""
    if not path.is_file():
        raise InputError(f"--tokens-npy: file not found: {path}")
    try:
        tokens = np.load(path, mmap_mode="r")
    except Exception as e:  # ValueError, OSError, pickle refusal
        raise InputError(f"--tokens-npy {path}: not a readable .npy array: {e}") from None
    if tokens.ndim != 2 or tokens.shape[1] % CONTEXT_LENGTH or not tokens.shape[1]:
        raise InputError(
            f"--tokens-npy {path}: shape {tokens.shape}; expected [N, {2 * CONTEXT_LENGTH}] (raw text and caption "
            f"ids, as in a record's label), [N, {CONTEXT_LENGTH}] (raw text ids) or another multiple of 77 "
            "(--token-slots picks the texts)"
        )
    if not (np.issubdtype(tokens.dtype, np.integer) or np.issubdtype(tokens.dtype, np.floating)):
        raise InputError(f"--tokens-npy {path}: dtype {tokens.dtype}; token ids must be integers or integral floats")
    return tokens


@dataclass(slots=True)
class RowInputs:
    """What a worker needs to write one sample: image bytes (None: read the sample's file) and two texts,
    each a string or a checked [77] id row; `error` is the reason to skip it instead."""

    image: bytes | None = None
    raw: str | np.ndarray = ""
    caption: str | np.ndarray | None = None
    error: str | None = None
    more_captions: list[str | np.ndarray | None] | None = None  # caption slots 2..K, as `caption`


def read_inputs(
    samples: list[SourceSample], columns: Columns, image_root: Path | None = None, tokens=None
) -> list[RowInputs]:
    """The inputs of a shard's samples, in order. Parquet values are read one row group at a time
    (only the image and id columns); ids from `tokens` (a --tokens-npy array) by `input_row`.
    Image files and tar members are left to `read_image_bytes`, one at a time when written."""
    out = [RowInputs(raw=s.raw_text, caption=s.caption, more_captions=_copy(s.more_captions)) for s in samples]
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(samples):
        if s.row_group >= 0:
            groups.setdefault((s.parquet, s.row_group), []).append(i)
    files: dict[str, object] = {}
    for (parquet, group), members in groups.items():
        pf = files.get(parquet) or files.setdefault(parquet, _parquet_file(Path(parquet)))
        schema = pf.schema_arrow
        wanted = [
            c
            for c in dict.fromkeys(
                (columns.image, columns.text, columns.caption, columns.tokens, *columns.more_captions)
            )
            if c and column_kind(schema.field(c).type) != TEXT
        ]
        table = pf.read_row_group(group, columns=wanted)
        for c in wanted:
            kind = column_kind(schema.field(c).type)
            col = table.column(c)
            for i in members:
                value = col[samples[i].row].as_py()
                _place(out[i], samples[i], c, kind, value, columns, image_root)
    if tokens is not None:
        for i, s in enumerate(samples):
            if out[i].error is None:
                _place_label(out[i], tokens[s.input_row], columns.slots(tokens.shape[1]), "--tokens-npy")
    return out


def _place(inp: RowInputs, sample: SourceSample, col: str, kind: str, value, columns: Columns, root) -> None:
    if inp.error is not None:
        return
    if value is None:
        inp.error = f"missing field(s) {[col]}"
        return
    if kind == IMAGE_BYTES and col == columns.image:
        inp.image = value
    elif kind == IMAGE_STRUCT and col == columns.image:
        if value.get("bytes") is not None:
            inp.image = value["bytes"]
        elif value.get("path"):  # a datasets.Image that references a file instead of holding it
            base = root if root is not None else Path(sample.parquet).parent
            try:
                inp.image = (base / value["path"]).read_bytes()
            except OSError as e:
                inp.error = f"unreadable file: {e.strerror or e} ({value['path']})"
        else:
            inp.error = f"missing field(s) {[col]}"
    elif col == columns.tokens:
        _place_label(inp, np.asarray(value), columns.slots(), "--tokens-col")
    elif kind == TOKEN_IDS:
        for name, target in (("raw text", columns.text), ("caption", columns.caption)):
            if col == target and not _take_ids(inp, name, value, name):
                return
        for slot, target in enumerate(columns.more_captions):
            if col == target and not _take_ids(inp, slot, value, f"caption column {col}"):
                return


def _place_label(inp: RowInputs, row: np.ndarray, slots: tuple[int, ...], what: str) -> None:
    """Raw text (and caption) ids from a row of 77-id texts end to end, slots[0] and slots[1]; slots[2:] are
    caption slots 2..K of records with K > 1 captions."""
    if row.ndim != 1 or row.shape[0] % CONTEXT_LENGTH or row.shape[0] < CONTEXT_LENGTH * (max(slots) + 1):
        inp.error = f"bad token ids ({what}): {row.shape[0]} ids, not 77-id texts covering slot(s) {list(slots)}"
        return
    targets = ("raw text", "caption", *range(len(slots) - 2))  # an int: caption slot 2 + it
    for name, slot in zip(targets, slots, strict=False):
        label = name if isinstance(name, str) else f"caption {name + 2}"
        if not _take_ids(inp, name, row[slot * CONTEXT_LENGTH : (slot + 1) * CONTEXT_LENGTH], f"{label}, {what}"):
            return


def _take_ids(inp: RowInputs, name: str | int, ids, what: str) -> bool:
    """Checked ids into the raw text or caption (or, `name` an int, caption slot 2 + name) of `inp`;
    a bad row sets `inp.error` (False)."""
    try:
        checked = check_token_ids(ids)
    except BadTokens as e:
        inp.error = f"bad token ids ({what}): {e}"
        return False
    if isinstance(name, int):
        inp.more_captions[name] = checked
    elif name == "raw text":
        inp.raw = checked
    else:
        inp.caption = checked
    return True


def _copy(values: list | None) -> list | None:
    return list(values) if values is not None else None


# ---------------------------------------------------------------- --show-schema


@dataclass
class ColumnInfo:
    name: str
    type: str  # Arrow type, JSON type or "string" (TSV/CSV)
    kind: str  # IMAGE_PATH, IMAGE_BYTES, IMAGE_STRUCT, TEXT, TOKEN_IDS or OTHER
    example: str = ""
    width: int | None = None  # ids in the first row of a TOKEN_IDS column

    @property
    def label_layout(self) -> bool:
        """Several 77-id texts end to end (raw text, caption, ...), as a record's label holds them."""
        return self.kind == TOKEN_IDS and bool(self.width) and self.width % CONTEXT_LENGTH == 0 and self.width > 77


def _looks_like_paths(values: list) -> bool:
    strings = [v for v in values if isinstance(v, str) and v]
    return bool(strings) and all(v.lower().endswith(IMAGE_EXTENSIONS) for v in strings)


def _short(value) -> str:
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_columns(path: Path, sample_rows: int = 20) -> tuple[int | None, list[ColumnInfo]]:
    """(number of rows when cheap to know, the columns of a manifest or token .npy with their kinds).

    Kinds come from the types; a string column is an image path when its first values end in an
    image extension. Reads the footer and the first `sample_rows` rows, nothing more."""
    if not path.is_file():
        raise InputError(f"input not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        tokens = open_tokens_npy(path)
        return tokens.shape[0], [ColumnInfo(f"(array {list(tokens.shape)})", str(tokens.dtype), TOKEN_IDS)]
    if suffix == ".parquet":
        pf = _parquet_file(path)
        first = next(pf.iter_batches(batch_size=sample_rows), None)
        rows = first.to_pydict() if first is not None else {}
        infos = []
        for field_ in pf.schema_arrow:
            kind = column_kind(field_.type)
            values = rows.get(field_.name, [])
            if kind == TEXT and _looks_like_paths(values):
                kind = IMAGE_PATH
            example = next((v for v in values if v is not None), None)
            info = ColumnInfo(field_.name, str(field_.type), kind, _short(example) if example is not None else "")
            if kind == TOKEN_IDS and example is not None:
                info.width = len(example)
            infos.append(info)
        return pf.metadata.num_rows, infos
    if suffix not in MANIFEST_SUFFIXES:
        raise InputError(f"{path}: --show-schema reads {MANIFEST_SUFFIXES} manifests and token .npy files")
    rows = []
    for row in read_rows(path, Columns(image="", text=None)):
        if isinstance(row, dict):
            rows.append(row)
        if len(rows) >= sample_rows:
            break
    names = list(dict.fromkeys(k for r in rows for k in r))
    infos = []
    for name in names:
        values = [r.get(name) for r in rows]
        example = next((v for v in values if v is not None), None)
        if suffix == ".jsonl":
            type_ = _JSON_TYPES.get(type(example), "null").split()[-1]
            if isinstance(example, list):
                kind = OTHER  # token ids in JSONL are not read: use parquet or --tokens-npy
            else:
                kind = IMAGE_PATH if _looks_like_paths(values) else TEXT if isinstance(example, str) else OTHER
        else:
            type_, kind = "string", IMAGE_PATH if _looks_like_paths(values) else TEXT
        infos.append(ColumnInfo(name, type_, kind, _short(example) if example is not None else ""))
    return None, infos
