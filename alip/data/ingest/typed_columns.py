"""Typed manifest columns for data2rec: parquet manifests, embedded images, token-id columns, --show-schema.

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

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alip.data.format.schema import CONTEXT_LENGTH, END_OF_TEXT, START_OF_TEXT, VOCAB_SIZE
from alip.data.ingest.sources import (
    IMAGE_EXTENSIONS,
    JSON_TYPES,
    MANIFEST_SUFFIXES,
    Columns,
    InputError,
    Skip,
    SourceSample,
    check_columns,
    read_rows,
)

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


def parquet_rows(path: Path, root: Path, columns: Columns, first_row: int) -> Iterator[SourceSample | Skip]:
    """The samples and skips of a parquet manifest, row by row, read one row group at a time and only
    its cheap columns."""
    pf = _parquet_file(path)
    schema = pf.schema_arrow
    check_columns(path, schema.names, columns)
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
    file = str(path)
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
                yield Skip(f"{path.name} row {row_number}", f"missing field(s) {missing}")
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
            yield sample
    if row_number < first_row:
        raise InputError(f"{path}: the manifest has no rows")


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
            type_ = JSON_TYPES.get(type(example), "null").split()[-1]
            if isinstance(example, list):
                kind = OTHER  # token ids in JSONL are not read: use parquet or --tokens-npy
            else:
                kind = IMAGE_PATH if _looks_like_paths(values) else TEXT if isinstance(example, str) else OTHER
        else:
            type_, kind = "string", IMAGE_PATH if _looks_like_paths(values) else TEXT
        infos.append(ColumnInfo(name, type_, kind, _short(example) if example is not None else ""))
    return None, infos
