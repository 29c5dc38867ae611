"""The record layout (DESIGN.md section 5) and the meta JSON that describes a set of shards.

One record per sample: `IRHeader(flag=154, label=float32[154], id=key, id2=0)` then JPEG bytes.
`label[:77]` are the CLIP BPE token ids of the raw text, `label[77:]` those of the caption (zero
padded; ids < 2**24 are exact in float32). This is the original ALIP release's layout, so its
single `.rec` reads the same way as our shards.

Records may hold K >= 1 caption slots (several captioners, an LLM rewrite): the label is then
77 x (1 + K) ids, the raw text first, then the captions in a fixed order, and the meta JSON names
the texts in that order (`"texts": ["raw", "blip", "llm"]`, see `TextSlots`). K = 1 is the layout
above, byte for byte; a meta JSON without "texts" (every shard written before K existed) and a
bare `.rec` of 154-float labels read as K = 1.

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

from alip.data.format.recordio import IRHeader, RecordIOError, RecordIOReader, ShardCheck, check_shard, pack, unpack
from alip.files import sha256_file, write_json_atomic

CONTEXT_LENGTH = 77
LABEL_LENGTH = 2 * CONTEXT_LENGTH
VOCAB_SIZE = 49408  # CLIP BPE: token ids 0..49407
START_OF_TEXT, END_OF_TEXT = 49406, 49407
SLOTS = ("raw text", "caption")  # the two 77-token halves of a K = 1 label, in order
RAW_NAME = "raw"  # the first text of every record; the meta JSON's "texts" starts with it
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


@dataclass(frozen=True)
class TextSlots:
    """The texts of a record's label, in order: the raw text, then K >= 1 captions, 77 ids each.

    `names` is the meta JSON's "texts" (e.g. ("raw", "blip", "llm")); the default is K = 1.
    """

    names: tuple[str, ...] = (RAW_NAME, "caption")

    def __post_init__(self) -> None:
        names = self.names
        if len(names) < 2 or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"texts must name the raw text and at least one caption, got {list(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"texts must have distinct names, got {list(names)}")

    @classmethod
    def for_width(cls, width: int) -> TextSlots:
        """Default names for labels of `width` floats (a bare .rec has no meta JSON to name them)."""
        if width % CONTEXT_LENGTH or width < LABEL_LENGTH:
            raise ValueError(f"a label of {width} floats is not 77 x (1 + K) token ids")
        k = width // CONTEXT_LENGTH - 1
        return cls() if k == 1 else cls((RAW_NAME, *(f"caption_{i}" for i in range(1, k + 1))))

    @property
    def num_captions(self) -> int:
        return len(self.names) - 1

    @property
    def captions(self) -> tuple[str, ...]:
        return self.names[1:]

    @property
    def label_length(self) -> int:
        return CONTEXT_LENGTH * len(self.names)

    def labels(self) -> tuple[str, ...]:
        """How messages name each text: ("raw text", "caption") for K = 1, "blip caption" for a named one."""
        return ("raw text", *("caption" if n == "caption" else f"{n} caption" for n in self.captions))

    def describe(self) -> str:
        return f"{self.num_captions} caption slot(s) {list(self.captions)} ({self.label_length}-float labels)"

    def layout(self) -> dict[str, Any]:
        """The meta JSON's "layout": LAYOUT for K = 1, one field per text otherwise."""
        if self.num_captions == 1:
            return dict(LAYOUT)
        fields = [{"name": "raw_text_tokens", "offset": 0, "length": CONTEXT_LENGTH}]
        for i, name in enumerate(self.captions, 1):
            fields.append({"name": f"caption_{name}_tokens", "offset": i * CONTEXT_LENGTH, "length": CONTEXT_LENGTH})
        return {**LAYOUT, "header_flag": self.label_length, "fields": fields}


def _slots_of(width: int, slots: TextSlots | None) -> TextSlots | None:
    """`slots`, else the default slots of labels `width` wide (None when no layout has that width)."""
    if slots is not None:
        return slots
    try:
        return TextSlots.for_width(width)
    except ValueError:
        return None


def shard_stem(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def shard_set_names(prefix: str, num_shards: int, reports: tuple[str, ...]) -> set[str]:
    """The file names a tool writes for a set of `num_shards` shards: each shard's .rec, .idx, texts
    sidecar and done stamp, the meta JSON and the tool's `reports` (suffixes after the prefix), each also
    under its temporary name. What the tool's --overwrite may remove; any other file is someone else's."""
    names = {f"{prefix}{end}" for end in (".meta.json", *reports)}
    for k in range(num_shards):
        stem = shard_stem(prefix, k)
        names |= {f"{stem}{ext}" for ext in (".rec", ".idx", ".texts.jsonl", ".done.json")}
    return names | {f"{n}.tmp" for n in names}


def meta_path(out_dir: str | Path, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}.meta.json"


def encode_label(raw_tokens: np.ndarray, caption_tokens: np.ndarray) -> np.ndarray:
    """Raw text [77] and caption [77] (or K captions [K, 77]) -> the float32 [77 * (1 + K)] label."""
    raw, cap = np.asarray(raw_tokens), np.asarray(caption_tokens)
    if raw.shape != (CONTEXT_LENGTH,) or cap.shape[-1:] != (CONTEXT_LENGTH,) or cap.ndim > 2 or not cap.size:
        raise ValueError(
            f"token rows must have shape ({CONTEXT_LENGTH},) (captions: (K, {CONTEXT_LENGTH})), "
            f"got {raw.shape} and {cap.shape}"
        )
    return np.concatenate([raw, cap.ravel()]).astype(np.float32)


class TokenError(ValueError):
    """Label values that are not CLIP token ids; `row` is the first bad label of a batch (0 for one label)."""

    def __init__(self, message: str, row: int) -> None:
        super().__init__(message)
        self.row = row


def _position(column: int, slots: TextSlots | None) -> str:
    if slots is None:
        return f"value {column}"
    slot, position = divmod(column, CONTEXT_LENGTH)
    return f"{slots.labels()[slot]} token {position}"


def token_fault(labels: np.ndarray, slots: TextSlots | None = None) -> tuple[int, str] | None:
    """The first label of float labels [..., 77 * (1 + K)] holding a value that is not a token id, as (row, what).

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
    where = _position(column, _slots_of(labels.shape[-1], slots))
    return row, f"{where} is {float(value)}, not a token id (an integer in 0..{VOCAB_SIZE - 1})"


def label_faults(label: np.ndarray, slots: TextSlots | None = None) -> list[str]:
    """Everything wrong with one float label [77 * (1 + K)] (the deep check): non-token values, and a
    non-empty text that does not open with the start token or has no end token (open_clip's tokenizer
    writes both, keeping the end token when it truncates)."""
    label = np.asarray(label)
    slots = _slots_of(label.shape[-1], slots)
    if slots is None or label.shape[-1] != slots.label_length:
        return [f"label has {label.shape[-1]} floats, expected {slots.label_length if slots else LABEL_LENGTH}"]
    fault = token_fault(label, slots)
    if fault is not None:
        return [fault[1]]
    faults = []
    for slot, tokens in zip(slots.labels(), label.reshape(-1, CONTEXT_LENGTH), strict=True):
        if not tokens.any():
            continue  # an empty text: all padding
        if tokens[0] != START_OF_TEXT:
            faults.append(f"{slot} starts with token {int(tokens[0])}, not the start token {START_OF_TEXT}")
        if not (tokens == END_OF_TEXT).any():
            faults.append(f"{slot} has no end token {END_OF_TEXT}")
    return faults


def decode_label(label: np.ndarray, slots: TextSlots | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., 77 * (1 + K)] label -> (raw tokens [..., 77], caption tokens) as int64, the captions
    [..., 77] when K = 1 (the release's layout), [..., K, 77] otherwise.

    K comes from `slots`, else from the label's width. Raises ValueError on a width that does not fit,
    TokenError (naming the row and the token) when a value is not a token id.
    """
    label = np.asarray(label)
    slots = _slots_of(label.shape[-1], slots)
    if slots is None or label.shape[-1] != slots.label_length:
        want = f"{slots.label_length} ({slots.describe()})" if slots else f"{LABEL_LENGTH} (77 raw + 77 caption tokens)"
        raise ValueError(f"label has {label.shape[-1]} values, expected {want}")
    fault = token_fault(label, slots)
    if fault is not None:
        raise TokenError(fault[1], fault[0])
    tokens = np.rint(label).astype(np.int64)
    raw, captions = tokens[..., :CONTEXT_LENGTH], tokens[..., CONTEXT_LENGTH:]
    if slots.num_captions == 1:
        return raw, captions
    return raw, captions.reshape(*captions.shape[:-1], slots.num_captions, CONTEXT_LENGTH)


def make_record(key: int, jpeg: bytes, raw_tokens: np.ndarray, caption_tokens: np.ndarray) -> bytes:
    """One record; `caption_tokens` [77] (the release's 154-float label) or [K, 77] (K caption slots)."""
    label = encode_label(raw_tokens, caption_tokens)
    return pack(IRHeader(label.size, label, key, 0), jpeg)


def split_record(record: bytes, slots: TextSlots | None = None) -> tuple[int, np.ndarray, bytes]:
    """Record bytes -> (key, float32 label [77 * (1 + K)], image bytes), the label unchecked (see
    `label_faults`). Its length must be `slots.label_length`, or any 77 x (1 + K) without `slots`."""
    header, payload = unpack(record)
    expected = slots.label_length if slots is not None else None
    if header.flag != expected and (expected is not None or _slots_of(header.flag, None) is None):
        want = expected if expected is not None else f"{LABEL_LENGTH} (or 77 x (1 + K) with K caption slots)"
        raise RecordIOError(f"record key {header.id}: label has {header.flag} floats, expected {want}")
    return header.id, header.label, payload


def parse_record(record: bytes, slots: TextSlots | None = None) -> tuple[int, np.ndarray, np.ndarray, bytes]:
    """Record bytes -> (key, raw tokens [77], caption tokens [77] or [K, 77] (see `decode_label`), JPEG bytes).

    Raises RecordIOError naming the record key when the label holds a value that is not a token id.
    """
    key, label, payload = split_record(record, slots)
    try:
        raw, cap = decode_label(label, slots)
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
    texts: list[str] | None = None  # the label's texts in order (TextSlots.names); None: K = 1, unnamed

    @property
    def num_records(self) -> int:
        return sum(s.records or 0 for s in self.shards)

    @property
    def slots(self) -> TextSlots:
        return TextSlots(tuple(self.texts)) if self.texts is not None else TextSlots()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.texts is None:
            del d["texts"]  # as every meta JSON written before K caption slots existed
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
    texts = d.get("texts")
    if texts is not None:
        try:
            TextSlots(tuple(texts) if isinstance(texts, list) else ())
        except ValueError as e:
            raise RecordIOError(f'{path}: "texts" is not valid: {e}') from None
    return DatasetMeta(
        shards=shards,
        tokenizer=d.get("tokenizer", {}),
        source=d.get("source", {}),
        layout=d.get("layout", dict(LAYOUT)),
        texts=texts,
    )


def resolve_shards(spec: str | Path | list[str | Path]) -> list[ShardInfo]:
    """Turn what a user passes into shard paths (absolute), with record counts where known.

    Accepts a meta JSON, a directory holding exactly one meta JSON, a glob of `.rec` files, a single
    `.rec` (the original release's layout, `.idx` beside it), or a list of any of these.
    """
    return [info for info, _ in resolve_dataset(spec)]


def dataset_files(spec: str | Path | list[str | Path]) -> list[str]:
    """Every path a set of shards consists of: what the user named (a meta JSON, a folder, a .rec; not a
    glob) and each shard's .rec, .idx and texts sidecar. A tool's output must be none of them
    (alip.files.refuse_overlap). Shards that do not resolve give only what was named: reading them
    fails later, naming them."""
    specs = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else [str(spec)]
    files = [s for s in specs if s and not any(c in s for c in "*?[")]
    try:
        for shard in resolve_shards(specs):
            files += [shard.rec, shard.idx, *([shard.texts] if shard.texts else [])]
    except (OSError, ValueError):
        pass
    return files


def resolve_dataset(spec: str | Path | list[str | Path]) -> list[tuple[ShardInfo, TextSlots | None]]:
    """`resolve_shards`, each shard with the texts its meta JSON names (K = 1 for a meta JSON without
    "texts"), or None for a shard without meta JSON (`probe_slots` reads its records' label length)."""
    if isinstance(spec, (list, tuple)):
        return [pair for item in spec for pair in resolve_dataset(item)]
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
        meta = read_meta(path)
        shards = []
        for s in meta.shards:
            texts = str(base / s.texts) if s.texts else None
            info = ShardInfo(str(base / s.rec), str(base / s.idx), s.records, s.bytes, s.sha256, texts)
            shards.append((info, meta.slots))
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
        out.append((ShardInfo(str(rec_path.resolve()), str(idx_path.resolve())), None))
    return out


def probe_slots(info: ShardInfo) -> TextSlots | None:
    """The texts of a shard without meta JSON, from its first record's label length, with default names
    (TextSlots.for_width). None when it has no records or that record cannot tell: a damaged shard is
    the preflight's to report, naming what is wrong."""
    try:
        with open(info.idx, encoding="ascii") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            return None
        key, offset = (int(x) for x in first.split("\t")[:2])
        with RecordIOReader(info.rec, info.idx, read_index=False) as reader:
            header, _ = unpack(reader.read_at(offset, what=f"record key {key}"))
        return TextSlots.for_width(header.flag)
    except (OSError, ValueError):  # RecordIOError is a ValueError
        return None


def agreed_slots(resolved: list[tuple[ShardInfo, TextSlots | None]]) -> TextSlots:
    """The texts every shard's labels hold: from its meta JSON, else from its first record. A shard
    that disagrees with the first is an error naming both (one dataset, one label layout)."""
    first: tuple[ShardInfo, TextSlots] | None = None
    for info, slots in resolved:
        slots = slots if slots is not None else probe_slots(info)
        if slots is None:
            continue  # no records: nothing to agree on (and skipped later)
        if first is None:
            first = info, slots
        elif slots != first[1]:
            raise RecordIOError(
                f"{info.rec}: records have {slots.describe()}, but {first[0].rec} has {first[1].describe()}: "
                "the shards of one dataset must hold the same texts"
            )
    return first[1] if first is not None else TextSlots()


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


def deep_check_shard(info: ShardInfo, keep: int = 10, slots: TextSlots | None = None) -> DeepCheck:
    """Everything the full framing check leaves out, for one shard: its sha256 and size against the
    meta JSON, every label (`label_faults`) and every image, fully decoded as data2rec did
    before writing it (alip.data.format.images.open_image). Reads the whole shard.

    Framing faults raise RecordIOError (`check_shard` runs first, every label `slots.label_length`
    floats: K = 1 by default); content faults are counted, the first `keep` kept with their record keys.
    """
    from alip.data.format.images import BadImage, open_image  # PIL: only the deep check decodes

    slots = slots if slots is not None else TextSlots()
    shard = check_shard(info.rec, info.idx, slots.label_length, info.records)
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
            _, label, image = split_record(record, slots)
            for fault in label_faults(label, slots):
                result.add(f"{where}: {fault}", keep)
            try:
                open_image(image)
            except BadImage as e:
                result.add(f"{where}: {e}", keep)
    return result
