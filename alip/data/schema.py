"""The record layout (DESIGN.md section 5) and the meta JSON that describes a set of shards.

One record per sample: `IRHeader(flag=154, label=float32[154], id=key, id2=0)` then JPEG bytes.
`label[:77]` are the CLIP BPE token ids of the raw text, `label[77:]` those of the caption (zero
padded; ids < 2**24 are exact in float32). This is the original ALIP release's layout, so its
single `.rec` reads the same way as our shards.

Shards are `{prefix}-{k:05d}.rec/.idx`; `{prefix}.meta.json` beside them names the shards with
their record counts and checksums, the tokenizer, the layout and where the data came from.

`deep_check_shard` checks a shard against both: its checksum against the meta JSON, every label
against the layout (token ids, start and end tokens), every image by decoding it. It reads the
whole shard, so the loaders run it only on request; `tools/inspect_rec.py --check --deep` runs it.
"""

from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alip.data.recordio import IRHeader, RecordIOError, RecordIOReader, ShardCheck, check_shard, pack, unpack
from alip.files import sha256_file, write_json_atomic

CONTEXT_LENGTH = 77
LABEL_LENGTH = 2 * CONTEXT_LENGTH
VOCAB_SIZE = 49408  # CLIP BPE: token ids 0..49407
START_OF_TEXT, END_OF_TEXT = 49406, 49407
SLOTS = ("raw text", "caption")  # the two 77-token halves of a label, in order
META_FORMAT = "alip-recordio"
META_VERSION = 1
LAYOUT = {
    "header_flag": LABEL_LENGTH,
    "label_dtype": "float32",
    "fields": [
        {"name": "raw_text_tokens", "offset": 0, "length": CONTEXT_LENGTH},
        {"name": "caption_tokens", "offset": CONTEXT_LENGTH, "length": CONTEXT_LENGTH},
    ],
    "image": "jpeg",
    "id": "record key (position in the shuffled dataset)",
    "id2": 0,
}


def shard_stem(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def meta_path(out_dir: str | Path, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}.meta.json"


def encode_label(raw_tokens: np.ndarray, caption_tokens: np.ndarray) -> np.ndarray:
    """Two [77] token rows -> the float32[154] label."""
    raw, cap = np.asarray(raw_tokens), np.asarray(caption_tokens)
    if raw.shape != (CONTEXT_LENGTH,) or cap.shape != (CONTEXT_LENGTH,):
        raise ValueError(f"token rows must have shape ({CONTEXT_LENGTH},), got {raw.shape} and {cap.shape}")
    return np.concatenate([raw, cap]).astype(np.float32)


class TokenError(ValueError):
    """Label values that are not CLIP token ids; `row` is the first bad label of a batch (0 for one label)."""

    def __init__(self, message: str, row: int) -> None:
        super().__init__(message)
        self.row = row


def _position(column: int) -> str:
    slot, position = divmod(column, CONTEXT_LENGTH)
    return f"{SLOTS[slot]} token {position}"


def token_fault(labels: np.ndarray) -> tuple[int, str] | None:
    """The first label of float labels [..., 154] holding a value that is not a token id, as (row, what).

    A token id is finite, integral and in 0..VOCAB_SIZE-1. A flipped bit in a float32 turns an id
    into -1003.0 or NaN, which the int64 cast would hand on as -1003 or INT64_MIN: so this looks at
    the floats. The common case costs a min, a max and one comparison with the rounded values.
    """
    labels = np.asarray(labels)
    # NaN fails both comparisons, so it takes the slow path too.
    if labels.min() >= 0 and labels.max() < VOCAB_SIZE and np.array_equal(labels, np.rint(labels)):
        return None
    rows = labels.reshape(-1, labels.shape[-1])
    valid = (rows >= 0) & (rows < VOCAB_SIZE) & (rows == np.rint(rows))
    row, column = (int(i) for i in np.argwhere(~valid)[0])
    value = rows[row, column]
    return row, f"{_position(column)} is {float(value)}, not a token id (an integer in 0..{VOCAB_SIZE - 1})"


def label_faults(label: np.ndarray) -> list[str]:
    """Everything wrong with one float label [154] (the deep check): non-token values, and a non-empty
    half that does not open with the start token or has no end token (open_clip's tokenizer writes
    both, keeping the end token when it truncates)."""
    fault = token_fault(label)
    if fault is not None:
        return [fault[1]]
    faults = []
    for slot, tokens in zip(SLOTS, np.asarray(label).reshape(2, CONTEXT_LENGTH), strict=True):
        if not tokens.any():
            continue  # an empty text: all padding
        if tokens[0] != START_OF_TEXT:
            faults.append(f"{slot} starts with token {int(tokens[0])}, not the start token {START_OF_TEXT}")
        if not (tokens == END_OF_TEXT).any():
            faults.append(f"{slot} has no end token {END_OF_TEXT}")
    return faults


def decode_label(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32[..., 154] label -> (raw tokens, caption tokens) as int64 [..., 77] each.

    Raises TokenError (naming the row and the token) when a value is not a token id.
    """
    label = np.asarray(label)
    if label.shape[-1] != LABEL_LENGTH:
        raise ValueError(f"label has {label.shape[-1]} values, expected {LABEL_LENGTH} (77 raw + 77 caption tokens)")
    fault = token_fault(label)
    if fault is not None:
        raise TokenError(fault[1], fault[0])
    tokens = np.rint(label).astype(np.int64)
    return tokens[..., :CONTEXT_LENGTH], tokens[..., CONTEXT_LENGTH:]


def make_record(key: int, jpeg: bytes, raw_tokens: np.ndarray, caption_tokens: np.ndarray) -> bytes:
    return pack(IRHeader(LABEL_LENGTH, encode_label(raw_tokens, caption_tokens), key, 0), jpeg)


def split_record(record: bytes) -> tuple[int, np.ndarray, bytes]:
    """Record bytes -> (key, float32 label [154], image bytes), the label unchecked (see `label_faults`)."""
    header, payload = unpack(record)
    if header.flag != LABEL_LENGTH:
        raise RecordIOError(f"record key {header.id}: label has {header.flag} floats, expected {LABEL_LENGTH}")
    return header.id, header.label, payload


def parse_record(record: bytes) -> tuple[int, np.ndarray, np.ndarray, bytes]:
    """Record bytes -> (key, raw tokens [77], caption tokens [77], JPEG bytes).

    Raises RecordIOError naming the record key when the label holds a value that is not a token id.
    """
    key, label, payload = split_record(record)
    try:
        raw, cap = decode_label(label)
    except TokenError as e:
        raise RecordIOError(f"record key {key}: {e}") from None
    return key, raw, cap, payload


@dataclass
class ShardInfo:
    rec: str  # path relative to the meta JSON's folder (absolute when resolved)
    idx: str
    records: int | None = None  # None when unknown (a glob or a bare .rec)
    bytes: int | None = None
    sha256: str | None = None
    texts: str | None = None  # sidecar with each record's original strings (data2rec writes it)


@dataclass
class DatasetMeta:
    shards: list[ShardInfo]
    tokenizer: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=lambda: dict(LAYOUT))
    format: str = META_FORMAT
    version: int = META_VERSION

    @property
    def num_records(self) -> int:
        return sum(s.records or 0 for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_records"] = self.num_records
        return d


def write_meta(path: str | Path, meta: DatasetMeta) -> None:
    """Write the meta JSON atomically (temp file, then rename)."""
    write_json_atomic(path, meta.to_json())


def read_meta(path: str | Path) -> DatasetMeta:
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RecordIOError(f"cannot read shard meta {path}: {e}") from e
    if not isinstance(d, dict) or d.get("format") != META_FORMAT:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise RecordIOError(f"{path} is not an ALIP shard meta file (format={found!r})")
    if d.get("version", 0) > META_VERSION:
        raise RecordIOError(f"{path} has meta version {d['version']}; this code reads up to {META_VERSION}")
    try:
        shards = [ShardInfo(**s) for s in d["shards"]]
    except (KeyError, TypeError) as e:  # a hand-edited file: no "shards", or unknown fields in one
        raise RecordIOError(f"{path}: the shard list is not valid ({type(e).__name__}: {e})") from None
    return DatasetMeta(
        shards=shards,
        tokenizer=d.get("tokenizer", {}),
        source=d.get("source", {}),
        layout=d.get("layout", dict(LAYOUT)),
    )


def resolve_shards(spec: str | Path | list[str | Path]) -> list[ShardInfo]:
    """Turn what a user passes into shard paths (absolute), with record counts where known.

    Accepts a meta JSON, a directory holding exactly one meta JSON, a glob of `.rec` files, a single
    `.rec` (the original release's layout, `.idx` beside it), or a list of any of these.
    """
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in resolve_shards(item)]
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        metas = sorted(path.glob("*.meta.json"))
        if len(metas) != 1:
            raise FileNotFoundError(
                f"{path} holds {len(metas)} *.meta.json files; pass the meta JSON, a .rec glob or a .rec file"
            )
        path = metas[0]
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"shard meta not found: {path}")
        base = path.parent
        shards = []
        for s in read_meta(path).shards:
            texts = str(base / s.texts) if s.texts else None
            shards.append(ShardInfo(str(base / s.rec), str(base / s.idx), s.records, s.bytes, s.sha256, texts))
        if not shards:
            raise RecordIOError(f"{path} lists no shards")
        return shards
    recs = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
    if not recs:
        raise FileNotFoundError(f"no .rec files match {text}")
    out = []
    for rec in recs:
        rec_path = Path(rec)
        if rec_path.suffix != ".rec":
            raise RecordIOError(f"expected .rec files, got {rec}")
        idx_path = rec_path.with_suffix(".idx")
        for p in (rec_path, idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"shard file missing: {p}")
        out.append(ShardInfo(str(rec_path.resolve()), str(idx_path.resolve())))
    return out


# ---------------------------------------------------------------------------------------------
# The deep check: what the full framing check (recordio.check_shard) leaves out


DEEP_CHECK_HINT = "run tools/inspect_rec.py --check --deep on the shards to list every damaged record"


@dataclass
class DeepCheck:
    """What the deep check found in one shard: `problems` holds the first few of `num_problems`."""

    shard: ShardCheck
    checksum: str  # "verified", "mismatch", or why there was nothing to verify
    problems: list[str] = field(default_factory=list)
    num_problems: int = 0

    def add(self, problem: str, keep: int) -> None:
        self.num_problems += 1
        if len(self.problems) < keep:
            self.problems.append(problem)


def _checksum_mismatch(info: ShardInfo, size: int) -> str | None:
    """None when the .rec matches the meta JSON's size and sha256, else what differs."""
    if info.bytes is not None and size != info.bytes:
        return f"{size} bytes, but the meta JSON says {info.bytes}"
    digest = sha256_file(info.rec)
    if digest != info.sha256:
        return f"sha256 {digest}, but the meta JSON says {info.sha256}: the file changed after it was written"
    return None


def deep_check_shard(info: ShardInfo, keep: int = 10) -> DeepCheck:
    """Everything the full framing check leaves out, for one shard: its sha256 and size against the
    meta JSON, every label (`label_faults`) and every image, fully decoded as data2rec did
    before writing it (alip.data.images.open_image). Reads the whole shard.

    Framing faults raise RecordIOError (`check_shard` runs first); content faults are counted,
    the first `keep` kept with their record keys.
    """
    from alip.data.images import BadImage, open_image  # PIL: only the deep check decodes

    shard = check_shard(info.rec, info.idx, LABEL_LENGTH, info.records)
    if info.sha256 is None:
        result = DeepCheck(shard, "not verified: no checksum (no meta JSON, or none in it)")
    else:
        result = DeepCheck(shard, "verified")
        mismatch = _checksum_mismatch(info, shard.num_bytes)
        if mismatch is not None:
            result.checksum = "mismatch"
            result.add(f"{shard.rec_path}: {mismatch}", keep)
    with RecordIOReader(shard.rec_path, shard.idx_path) as reader:
        for key, record in reader:
            where = f"{shard.rec_path}: record key {key}"
            _, label, image = split_record(record)
            for fault in label_faults(label):
                result.add(f"{where}: {fault}", keep)
            try:
                open_image(image)
            except BadImage as e:
                result.add(f"{where}: {e}", keep)
    return result
