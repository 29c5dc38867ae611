"""data2rec's steps 1 and 2 (see alip.data.ingest.convert): index the inputs into columns, join the
captions, then shuffle once and cut the samples into shards, with the fingerprint that ties an output
folder to its plan and the stamps that tell a rerun which shards are stale; and what the output folder
must keep apart from: the paths data2rec reads, the names it writes (`--overwrite` removes those only).
Nothing here writes a file.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import itertools
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from alip.columns import CHUNK, StringColumn, StringColumnBuilder
from alip.data.format import schema
from alip.data.ingest.sample_index import CaptionTable, IndexBuilder, SampleIndex
from alip.data.ingest.sources import (
    CaptionSource,
    Columns,
    InputError,
    Skip,
    SourceSample,
    iter_manifest,
    tar_samples,
)
from alip.data.ingest.typed_columns import open_tokens_npy, parquet_rows


@dataclass
class ConvertOptions:
    out_dir: Path
    prefix: str = "train"
    image_root: Path | None = None
    columns: Columns = field(default_factory=Columns)
    captions: Path | None = None  # caption sidecar (JSONL/parquet), joined by key or path
    tokens_npy: Path | None = None  # [N, 154] or [N, 77] token ids, row i for input row i (open_tokens_npy)
    require_caption: bool = True  # False: samples without a caption get an empty one (CLIP-only data)
    shard_records: int = 10_000
    shard_bytes: int | None = None  # estimated from the input sizes
    seed: int = 0
    workers: int = max(1, os.cpu_count() or 1)
    max_side: int | None = None
    jpeg_quality: int = 95
    max_pixels: int = 89_478_485
    tokenizer: str = "ViT-B-32"
    overwrite: bool = False
    progress: bool = True
    # K caption slots: the first slot's name (its captions come from columns.caption / captions), then
    # slots 2..K with their sources (more_captions empty: K = 1, the release's layout)
    caption_name: str = "caption"
    more_captions: tuple[CaptionSource, ...] = ()

    def __post_init__(self) -> None:
        try:
            schema.TextSlots(self.texts)
        except ValueError as e:
            raise InputError(f"caption slots: {e}") from None
        if schema.RAW_NAME in self.texts[1:]:
            raise InputError(f"a caption slot cannot be named {schema.RAW_NAME!r}: it names the raw text")
        # the readers take the later slots' columns with the others (None: a sidecar or token-id slot)
        self.columns = replace(self.columns, more_captions=tuple(c.column for c in self.more_captions))
        from_ids = [c.name for c in self.more_captions if c.column is None and c.sidecar is None]
        if from_ids and (len(from_ids) != len(self.more_captions) or len(self.columns.slots()) != len(self.texts)):
            raise InputError(
                f"caption slots {from_ids} come from token ids: then every caption slot does, one --token-slots "
                "entry each (e.g. --token-slots 0,ofa=1,llm=2)"
            )
        if self.shard_records < 1:
            raise InputError(f"shard_records must be >= 1, got {self.shard_records}")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise InputError(f"shard_bytes must be >= 1, got {self.shard_bytes}")
        if self.workers < 1:
            raise InputError(f"workers must be >= 1, got {self.workers}")
        if self.max_side is not None and self.max_side < 16:
            raise InputError(f"max_side must be >= 16, got {self.max_side}")
        if self.max_pixels < 1:
            raise InputError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InputError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    @property
    def texts(self) -> tuple[str, ...]:
        """The names of a record's texts, in label order (the meta JSON's "texts")."""
        return (schema.RAW_NAME, self.caption_name, *(c.name for c in self.more_captions))


@dataclass(eq=False)  # compared by identity: `rows` is an array
class ShardTask:
    """One shard of the plan: its samples are the index's rows `rows`, with record keys first_key,
    first_key + 1, ... Its SourceSamples are built when asked for (`items`), and travel to a worker
    with the task (pickling sends them, not the index)."""

    index: int
    stem: str
    first_key: int
    rows: np.ndarray  # the samples' stored rows in `source` (SampleIndex.physical), in record order
    source: SampleIndex | None = field(default=None, repr=False)
    built: list[tuple[int, SourceSample]] | None = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    @property
    def items(self) -> list[tuple[int, SourceSample]]:
        """(record key, sample) of each sample, in order."""
        if self.built is not None:
            return self.built
        return list(enumerate(self.source.samples(self.rows), self.first_key))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "source": None, "built": self.items}


# ---------------------------------------------------------------- 1. index


def _without_cyclic_gc(fn):
    """Run `fn` with Python's cyclic garbage collector paused. Indexing and planning build objects
    row by row and no reference cycles; when the index held one object per row, the collector's
    passes over them took 20% of indexing and 35% of planning at 1M rows (benchmarks/scale.py)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return wrapper


@_without_cyclic_gc
def index_inputs(inputs: list[Path], opts: ConvertOptions) -> tuple[SampleIndex, list[Skip]]:
    """All samples of all inputs, captions joined; plus the rows that cannot be samples.

    The samples come as a columnar SampleIndex (a sequence of SourceSamples built on demand)."""
    if not inputs:
        raise InputError("no inputs given")
    builder = IndexBuilder(len(opts.columns.more_captions))
    skips: list[Skip] = []
    for path in inputs:
        if not path.exists():
            raise InputError(f"input not found: {path}")
        if path.suffix == ".tar":
            got, bad = tar_samples(path, caption_field=opts.columns.caption, more_fields=opts.columns.more_captions)
            for sample in got:
                builder.add(sample)
            skips += bad
        else:
            first_row = builder.n + len(skips)
            if path.suffix.lower() == ".parquet":  # typed columns: embedded images, token ids
                root = opts.image_root if opts.image_root is not None else path.parent
                items = parquet_rows(path, root, opts.columns, first_row)
            else:
                items = iter_manifest(path, opts.image_root, opts.columns, first_row)
            for item in items:
                if isinstance(item, Skip):
                    skips.append(item)
                else:
                    builder.add(item)
    samples = builder.finish()
    if opts.tokens_npy is not None:
        _check_tokens_npy(inputs, opts, num_rows=len(samples) + len(skips), samples=samples)
    dupes = duplicate_keys(samples.strings["key"])
    if dupes:
        raise InputError(f"{len(dupes)} sample keys occur more than once, e.g. {dupes[:5]}; keys must be unique")
    caption_skips = _join_captions(samples, opts)
    return samples, skips + caption_skips


def _check_tokens_npy(inputs: list[Path], opts: ConvertOptions, num_rows: int, samples: SampleIndex) -> None:
    """The .npy must have one row per input row; with caption ids ([N, 154]) every sample has a caption."""
    if any(p.suffix == ".tar" for p in inputs):
        raise InputError("--tokens-npy joins by manifest row order; it cannot be used with .tar inputs")
    tokens = open_tokens_npy(opts.tokens_npy)
    if tokens.shape[0] != num_rows:
        raise InputError(
            f"--tokens-npy {opts.tokens_npy} has {tokens.shape[0]} rows but the inputs have {num_rows} rows; "
            "row i of the .npy must hold the token ids of input row i"
        )
    if len(opts.columns.slots(tokens.shape[1])) > 1:
        samples.strings["caption"] = StringColumn.full("", samples.num_rows)  # read when the shard is written


def duplicate_keys(keys: Sequence[str]) -> list[str]:
    """The keys that occur more than once. Sorts 64-bit hashes in NumPy (8 bytes a key) and compares
    only the keys whose hashes collide: a Counter of 15M keys would hold about 1 GB at the index's peak."""
    hashes = np.fromiter((hash(k) for k in keys), dtype=np.int64, count=len(keys))
    ordered = np.sort(hashes)
    colliding = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    candidates = np.flatnonzero(np.isin(hashes, colliding))
    counts = Counter(keys[i] for i in candidates.tolist())
    return [k for k, n in counts.items() if n > 1]


def stat_images(samples: SampleIndex) -> None:
    """Fill in the size and mtime of every image file (tar members and embedded images already have theirs)."""
    sizes, mtimes = samples.writable_ints("size"), samples.writable_ints("mtime_ns")
    rows = samples.all_rows()
    for first in range(0, len(rows), CHUNK):
        chunk = rows[first : first + CHUNK]
        images = samples.images(chunk)
        in_tar = (samples.int_values("tar_offset", chunk) >= 0).tolist()
        for row, image, tar, parquet in zip(chunk.tolist(), images, in_tar, samples.parquet_values(chunk), strict=True):
            if tar or image == parquet:  # a tar member, an image embedded in a parquet manifest
                continue
            try:
                st = os.stat(image)
            except OSError:
                continue  # a missing file becomes a skip when its shard is written; its stamp stays -1
            sizes[row], mtimes[row] = st.st_size, st.st_mtime_ns


def _join_captions(samples: SampleIndex, opts: ConvertOptions) -> list[Skip]:
    """Join the caption sidecars, then drop (and return as skips) the samples left without a caption."""
    if opts.captions is not None:
        samples.strings["caption"] = _joined(samples, CaptionTable(opts.captions), samples.strings["caption"])
    elif opts.columns.caption is None and opts.require_caption and not _tokens_have_captions(opts):
        raise InputError(
            "no caption source: pass a caption column, a caption sidecar (--captions), "
            "or allow empty captions (--no-caption) for CLIP-only data"
        )
    _join_more_captions(samples, opts)
    missing = _missing_captions(samples, opts) if opts.require_caption else None
    if missing is None:
        return []
    names, reason_of = missing
    skips = []
    dropped = np.flatnonzero(reason_of >= 0)
    for first in range(0, len(dropped), CHUNK):
        rows = dropped[first : first + CHUNK]
        for s, reason in zip(samples.samples(rows), reason_of[rows].tolist(), strict=True):
            skips.append(Skip(s.source, names[reason]))
    samples.rows = np.flatnonzero(reason_of < 0)
    return skips


def _joined(samples: SampleIndex, table: CaptionTable, old: StringColumn | None) -> StringColumn:
    """A caption column joined from a sidecar, by key or path: a sample's caption from the sidecar, else
    `old`'s (None: else None)."""
    out = StringColumnBuilder()
    if old is not None and old.valid is not None and not old.valid.any():
        old = None  # no caption to keep
    for first in range(0, samples.num_rows, CHUNK):
        rows = np.arange(first, min(first + CHUNK, samples.num_rows))
        paths = samples.strings["path"].take(rows) if table.has_paths else [None] * len(rows)
        found = table.captions(samples.strings["key"].take(rows), paths)
        if old is not None:
            found = [o if f is None else f for f, o in zip(found, old.take(rows), strict=True)]
        out.pending = found
        out.flush()
    return out.finish()


def _join_more_captions(samples: SampleIndex, opts: ConvertOptions) -> None:
    """Caption slots 2..K that come from sidecars, joined by key or path as the first slot's (and those
    read from token ids when the shard is written: present for every sample, as the first slot's)."""
    for slot, source in enumerate(opts.more_captions):
        if source.column is None and source.sidecar is None:
            samples.more[slot] = StringColumn.full("", samples.num_rows)
        elif source.sidecar is not None:
            samples.more[slot] = _joined(samples, CaptionTable(source.sidecar), None)


def _missing_captions(samples: SampleIndex, opts: ConvertOptions) -> tuple[list[str], np.ndarray] | None:
    """Why samples cannot be written for want of a caption: (reasons, the reason of each stored row: an
    index into reasons, -1 for none), naming the first missing slot when there are several; None when
    no sample misses one."""
    slots = [samples.strings["caption"], *(samples.more or [])]
    if not any(c.has_none() for c in slots):
        return None
    if not opts.more_captions:
        names = ["no caption for this sample"]
    else:  # one reason per slot: the skip report counts them by slot
        names = [f"no {name} caption for this sample" for name in opts.texts[1:]]
    reason_of = np.full(samples.num_rows, -1, np.int32)
    for slot in reversed(range(len(slots))):  # the first missing slot names the reason
        if slots[slot].has_none():
            reason_of[~slots[slot].valid] = slot
    return names, reason_of


def _tokens_have_captions(opts: ConvertOptions) -> bool:
    """Caption ids come from the --tokens-npy file or the --tokens-col column."""
    if opts.tokens_npy is not None:
        return len(opts.columns.slots(open_tokens_npy(opts.tokens_npy).shape[1])) > 1
    return opts.columns.tokens is not None and len(opts.columns.slots()) > 1


# ---------------------------------------------------------------- 2. plan


@_without_cyclic_gc
def plan_shards(samples: SampleIndex | list[SourceSample], opts: ConvertOptions) -> list[ShardTask]:
    """Shuffle once with the seed, then cut into shards. Record key = position in the shuffled order."""
    if not isinstance(samples, SampleIndex):
        samples = SampleIndex.from_samples(samples)
    order = samples.physical(_shuffle_order(samples, opts))
    n = len(order)
    if opts.shard_bytes is None:
        bounds = [*range(0, n, opts.shard_records), n]
    else:
        bounds, count, current_bytes = [0], 0, 0
        for i, size in enumerate(np.maximum(samples.int_values("size", order), 0).tolist()):
            if count >= opts.shard_records or (count and current_bytes + size > opts.shard_bytes):
                bounds.append(i)
                count, current_bytes = 0, 0
            count += 1
            current_bytes += size
        bounds.append(n)
    spans = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    return [ShardTask(k, schema.shard_stem(opts.prefix, k), a, order[a:b], samples) for k, (a, b) in enumerate(spans)]


def _shuffle_order(samples: SampleIndex, opts: ConvertOptions) -> np.ndarray:
    """One global shuffle; for parquet rows read by row group (embedded images, token ids), a block shuffle.

    A row group can only be read whole: with a row-level shuffle every shard would read a row group
    for each record (about 100x the data for the hub's 100-row groups). So the row groups are
    shuffled as blocks, and the rows inside each window of `shard_records` are shuffled again: a
    shard holds whole row groups from all over the dataset, mixed, and each group is read once.
    """
    rng = np.random.default_rng(opts.seed)
    rows = samples.all_rows()
    groups = samples.int_values("row_group", rows)
    if not (groups >= 0).any():
        return rng.permutation(len(samples))
    files = samples.parquet[rows] if samples.parquet is not None else np.full(len(rows), -1)
    # a new block begins where the row group changes: rows of one row group are consecutive
    new = (groups[1:] < 0) | (files[1:] != files[:-1]) | (groups[1:] != groups[:-1])
    starts = np.concatenate([[0], np.flatnonzero(new) + 1]).astype(np.int64)
    bounds = np.append(starts, len(samples))
    blocks = rng.permutation(len(starts))
    order = np.concatenate([np.arange(bounds[b], bounds[b + 1]) for b in blocks])
    for first in range(0, len(order), opts.shard_records):
        rng.shuffle(order[first : first + opts.shard_records])  # a view: shuffles in place
    return order


def plan_fingerprint(tasks: list[ShardTask], opts: ConvertOptions) -> str:
    """Changes whenever a rerun would write different shards."""
    h = hashlib.sha256()
    settings = [opts.prefix, opts.seed, opts.max_side, opts.jpeg_quality, opts.max_pixels, opts.tokenizer]
    if opts.tokens_npy is not None or any((_task_ints(t, "row_group") >= 0).any() for t in tasks):
        # values read when a shard is written are not hashed below: hash where they come from instead
        # (appended only then: older plans keep their fingerprint)
        columns = asdict(opts.columns)
        if not columns["more_captions"]:
            del columns["more_captions"]  # K = 1: the fingerprint of plans made before caption slots
        settings += [str(opts.tokens_npy), columns]
    if opts.more_captions:
        settings += [list(opts.texts), [c.describe() for c in opts.more_captions]]
    h.update(json.dumps(settings).encode())
    for task in tasks:
        h.update(f"|{task.stem}".encode())
        for first in range(0, task.num_samples, CHUNK):
            h.update("".join(_fingerprint_lines(task, first, first + CHUNK)).encode())
    return h.hexdigest()


def _fingerprint_lines(task: ShardTask, start: int, stop: int) -> list[str]:
    """The plan fingerprint's line of each sample task.items[start:stop], from the index's columns."""
    if task.source is None:
        items = task.items[start:stop]
        keys = [k for k, _ in items]
        fields = [[getattr(s, f) for _, s in items] for f in ("key", "image", "tar_offset", "raw_text", "caption")]
        more = [s.more_captions for _, s in items]
    else:
        rows, source = task.rows[start:stop], task.source
        keys = range(task.first_key + start, task.first_key + start + len(rows))
        strings = source.strings
        fields = [
            strings["key"].take(rows),
            source.images(rows),
            source.int_values("tar_offset", rows).tolist(),
            strings["raw_text"].take(rows),
            strings["caption"].take(rows),
        ]
        more = source.more_values(rows) or [None] * len(rows)
    return [
        f"{key}\t{sample_key}\t{image}\t{tar_offset}\t{raw}\t{caption}"
        + ("" if slots is None else "\t" + json.dumps(slots, ensure_ascii=False))
        + "\n"
        for key, sample_key, image, tar_offset, raw, caption, slots in zip(keys, *fields, more, strict=True)
    ]


def _task_ints(task: ShardTask, name: str) -> np.ndarray:
    if task.source is None:
        return np.asarray([getattr(s, name) for _, s in task.items], np.int64)
    return task.source.int_values(name, task.rows)


def shard_stamp(task: ShardTask) -> str:
    """Size and mtime of the files a shard's images come from: changes when one is replaced or appears."""
    h = hashlib.sha256()
    sizes, mtimes = _task_ints(task, "size").tolist(), _task_ints(task, "mtime_ns").tolist()
    h.update("".join(f"{size}:{mtime}\n" for size, mtime in zip(sizes, mtimes, strict=True)).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- the output folder and the inputs


def input_paths(inputs: list[Path], opts: ConvertOptions) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """Everything data2rec reads, with the option that named it: the output folder may be none of them, nor
    hold one, nor lie inside one. And the folders it may lie inside but neither be nor hold: a manifest's
    folder, which is the root of its image paths without --image-root (or with --image-root naming it):
    writing the shards beside the manifest is the usual layout."""
    paths = [("input", p) for p in inputs]
    paths += [("--captions", opts.captions)] if opts.captions is not None else []
    paths += [("--tokens-npy", opts.tokens_npy)] if opts.tokens_npy is not None else []
    paths += [(f"--captions {c.name}", c.sidecar) for c in opts.more_captions if c.sidecar is not None]
    folders = [p.parent for p in inputs if p.suffix != ".tar"]
    beside = [("image root (the manifest's folder)", f) for f in folders] if opts.image_root is None else []
    if opts.image_root is not None:
        manifest_folder = os.path.realpath(opts.image_root) in {os.path.realpath(f) for f in folders}
        (beside if manifest_folder else paths).append(("--image-root", opts.image_root))
    return paths, beside


NO_PLAN = "no usable input row"  # the plan of a run that found nothing to write but its skip report


def own_files(prefix: str, num_shards: int) -> set[str]:
    """The names data2rec writes for a plan of `num_shards` shards: what --overwrite may remove."""
    return schema.shard_set_names(prefix, num_shards, (".plan.json", ".skipped.jsonl"))
