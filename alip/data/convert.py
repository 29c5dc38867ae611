"""Manifest / img2dataset tars (+ caption sidecar) -> shuffled RecordIO shards + meta JSON.

The steps, each restartable, under a lock on the output folder (two runs never write into one):
1. Index the inputs (rows, tar members) into columns (sample_index.SampleIndex: about 240 bytes a row
   for YFCC-length texts, so 15M rows fit in a few GB), join captions, and count every row that
   cannot become a sample, with its reason. Stat every image file: its size and mtime tell a rerun which shards
   are stale.
2. Shuffle the whole dataset once with a seed. DALI's reader only shuffles within a buffer, so
   shards must already be mixed. Cut the shuffled list into shards by record count and/or
   estimated size. The plan is a pure function of the inputs and options; its fingerprint is
   saved, so a rerun with different inputs cannot silently mix two plans.
3. Write the shards in parallel worker processes. Each worker decodes and validates every image,
   tokenises both texts, and writes `.rec`/`.idx` plus a texts sidecar under temporary names.
   It renames them when done and writes `{stem}.done.json` last, with the size and mtime of its
   image files. A shard without that file is incomplete, and one whose image files changed since
   is stale: both are redone on the next run, so a killed run resumes without duplicates and a
   run after fixing images picks the fixed files up. A worker killed from outside (the OOM killer)
   stops the run with the names of the unfinished shards; a rerun finishes them.
4. Write the meta JSON (shards, counts, checksums, tokenizer, layout, source) and the report of
   every skipped input.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from alip.cli import UserError
from alip.data import schema
from alip.data.images import BadImage, prepare_image
from alip.data.recordio import RecordIOWriter
from alip.data.sample_index import CHUNK, CaptionTable, IndexBuilder, SampleIndex, StringColumn, StringColumnBuilder
from alip.data.sources import (
    CaptionSource,
    Columns,
    InputError,
    Skip,
    SourceSample,
    iter_manifest,
    read_image_bytes,
    read_sidecar_header,
    tar_samples,
)
from alip.data.typed_columns import decode_tokens, open_tokens_npy, read_inputs
from alip.files import FolderLock, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)


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


@dataclass
class ShardResult:
    stem: str
    records: int
    bytes: int
    sha256: str
    skipped: list[dict]
    stats: dict[str, int]
    seconds: float = 0.0  # time this shard took inside its worker
    inputs: str = ""  # shard_stamp() of the image files it was written from


@dataclass
class ConvertReport:
    meta_path: Path
    num_inputs: int
    num_records: int
    skipped: Counter
    stats: Counter
    seconds: float  # the whole run
    write_seconds: float  # wall time of the writing phase, worker start-up included (no indexing)
    worker_seconds: float  # summed time the workers spent on this run's shards: per-worker throughput
    images_written: int  # inputs processed by this run (fewer than all when resuming)


class WorkerLostError(UserError):
    """A worker process ended abruptly (OOM killer, kill -9); the message names the unfinished shards."""


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
            for item in iter_manifest(path, opts.image_root, opts.columns, first_row=builder.n + len(skips)):
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


# ---------------------------------------------------------------- 3. write

_worker: dict = {}  # per-process state: tokenizer, options, progress counter


def _init_worker(opts: ConvertOptions, counter) -> None:
    import open_clip  # imported here: only the workers tokenise

    tokens = open_tokens_npy(opts.tokens_npy) if opts.tokens_npy is not None else None  # mmap: shared pages
    _worker.update(tokenizer=open_clip.get_tokenizer(opts.tokenizer), opts=opts, counter=counter, tokens=tokens)


def _tokenize(texts: list[str]) -> np.ndarray:
    import ftfy

    # ftfy repairs mojibake first; the CLIP tokenizer then applies its own cleaning and truncates
    # to 77 tokens keeping the end token (as the original release's data did).
    return _worker["tokenizer"]([ftfy.fix_text(t) for t in texts]).numpy()


def write_shard(task: ShardTask) -> ShardResult:
    """Write one shard under temporary names, then rename; `{stem}.done.json` is written last."""
    started = time.perf_counter()
    out = _worker["opts"].out_dir
    final = {ext: out / f"{task.stem}{ext}" for ext in (".rec", ".idx", ".texts.jsonl")}
    tmp = {ext: p.with_name(p.name + ".tmp") for ext, p in final.items()}
    try:
        count, nbytes, skipped, stats = _write_records(task, tmp)
    except BaseException:
        for p in tmp.values():  # no partial files left behind (a full disk most of all)
            p.unlink(missing_ok=True)
        raise
    for ext in final:  # rec, idx, texts: all present before the done marker says so
        os.replace(tmp[ext], final[ext])
    seconds = time.perf_counter() - started
    result = ShardResult(
        task.stem, count, nbytes, sha256_file(final[".rec"]), skipped, stats, seconds, shard_stamp(task)
    )
    write_json_atomic(out / f"{task.stem}.done.json", asdict(result))
    return result


def _write_records(task: ShardTask, tmp: dict[str, Path]) -> tuple[int, int, list[dict], dict[str, int]]:
    """Every image of the shard decoded, checked and written, or skipped with its reason."""
    opts: ConvertOptions = _worker["opts"]
    samples = [s for _, s in task.items]
    inputs = read_inputs(samples, opts.columns, opts.image_root, _worker.get("tokens"))  # parquet: by row group
    raw_tokens = _token_rows([i.raw for i in inputs])
    cap_tokens = _caption_rows(inputs, len(opts.more_captions))  # [N, 77], or [N, K, 77] with K slots
    skipped, stats = [], Counter()
    with RecordIOWriter(tmp[".rec"], tmp[".idx"]) as writer, open(tmp[".texts.jsonl"], "w", encoding="utf-8") as texts:
        for i, ((key, sample), inp) in enumerate(zip(task.items, inputs, strict=True)):
            try:
                if inp.error is not None:
                    raise BadImage(inp.error)  # a null or bad value read with the row: skipped the same way
                data = inp.image if inp.image is not None else read_image_bytes(sample)
                inp.image = None  # embedded bytes: free each image once used, not the whole shard's at the end
                img = prepare_image(data, opts.max_side, opts.jpeg_quality, opts.max_pixels)
            except BadImage as e:
                skipped.append({"source": sample.source, "key": sample.key, "reason": str(e)})
            else:
                writer.write(key, schema.make_record(key, img.jpeg, raw_tokens[i], cap_tokens[i]))
                entry = _text_entry(key, sample, raw_tokens[i], cap_tokens[i], inp)
                texts.write(json.dumps(entry, ensure_ascii=False) + "\n")
                stats["passthrough" if img.passthrough else "reencoded"] += 1
                stats[f"mode_{img.source_mode}"] += 1
                stats["empty_raw_text"] += not entry["raw_text"].strip()
                stats["truncated_raw_text"] += bool(raw_tokens[i][-1])
                _caption_stats(stats, cap_tokens[i], inp, opts.texts[1:])
            if i % 16 == 15:
                _bump(16)
        _bump(len(task.items) % 16)
        writer.close(fsync=True)
        return writer.count, writer.bytes_written, skipped, dict(stats)


def _caption_stats(stats: Counter, caps: np.ndarray, inp, names: tuple[str, ...]) -> None:
    """Truncated captions (the first slot's as before K slots existed, later ones by slot) and token-id texts."""
    rows = caps.reshape(-1, schema.CONTEXT_LENGTH)  # [K, 77]
    stats["truncated_caption"] += bool(rows[0][-1])
    for name, row in zip(names[1:], rows[1:], strict=True):
        stats[f"truncated_caption_{name}"] += bool(row[-1])
    given = [inp.raw, inp.caption, *(inp.more_captions or [])]
    stats["token_id_texts"] += sum(isinstance(t, np.ndarray) for t in given)


def _caption_rows(inputs: list, more: int) -> np.ndarray:
    """[N, 77] caption ids, or [N, 1 + more, 77] with `more` caption slots after the first ("" for none)."""
    first = _token_rows([i.caption if i.caption is not None else "" for i in inputs])
    if not more:
        return first
    rest = [_token_rows([_or_empty(i.more_captions[slot]) for i in inputs]) for slot in range(more)]
    return np.stack([first, *rest], axis=1)


def _or_empty(text: str | np.ndarray | None) -> str | np.ndarray:
    return "" if text is None else text


def _token_rows(texts: list[str | np.ndarray]) -> np.ndarray:
    """[N, 77] ids: strings tokenised, rows of checked ids (pre-tokenised inputs) as they are."""
    rows = _tokenize([t if isinstance(t, str) else "" for t in texts])
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            rows[i] = t
    return rows


def _text_entry(key: int, sample: SourceSample, raw: np.ndarray, cap: np.ndarray, inp) -> dict:
    # the original strings, for inspection and noise reports (the shard holds only tokens); texts
    # given as token ids are decoded with the tokenizer and marked so (spacing and case may differ)
    raw_decoded, cap_decoded = isinstance(inp.raw, np.ndarray), isinstance(inp.caption, np.ndarray)
    slots, cap = cap, cap.reshape(-1, schema.CONTEXT_LENGTH)[0]  # the first caption slot: K = 1's caption
    entry = {
        "key": key,
        "sample_key": sample.key,
        "source": sample.source,
        "raw_text": decode_tokens(_worker["tokenizer"], raw) if raw_decoded else sample.raw_text,
        "caption": decode_tokens(_worker["tokenizer"], cap) if cap_decoded else sample.caption,
        "raw_truncated": bool(raw[-1]),
        "caption_truncated": bool(cap[-1]),
    }
    if raw_decoded or cap_decoded:
        entry["raw_decoded"], entry["caption_decoded"] = raw_decoded, cap_decoded
    if inp.more_captions is not None:
        _add_slots(entry, slots, inp)
    return entry


def _add_slots(entry: dict, cap: np.ndarray, inp) -> None:
    """K > 1 caption slots: every caption by slot name (the first is also "caption", for K = 1 readers)."""
    names = _worker["opts"].texts[1:]
    given = [inp.caption, *inp.more_captions]
    texts, truncated, decoded = {}, {}, {}
    for name, text, row in zip(names, given, cap, strict=True):
        decoded[name] = isinstance(text, np.ndarray)
        texts[name] = decode_tokens(_worker["tokenizer"], row) if decoded[name] else text
        truncated[name] = bool(row[-1])
    texts[names[0]] = entry["caption"]
    entry["captions"], entry["captions_truncated"] = texts, truncated
    if any(decoded.values()):
        entry["captions_decoded"] = decoded


def _bump(n: int) -> None:
    counter = _worker.get("counter")
    if counter is not None and n:
        with counter.get_lock():
            counter.value += n


# ---------------------------------------------------------------- 4. orchestrate


def convert(inputs: list[Path], opts: ConvertOptions) -> ConvertReport:
    """Run (or finish) a conversion. Raises InputError on unusable input or when nothing survives,
    FolderLockedError while another run writes into the folder, WorkerLostError when a worker was killed."""
    with FolderLock(opts.out_dir, "data2rec"):
        return _convert(inputs, opts)


def _convert(inputs: list[Path], opts: ConvertOptions) -> ConvertReport:
    start = time.perf_counter()
    out = opts.out_dir
    samples, index_skips = index_inputs(inputs, opts)
    num_inputs = len(samples) + len(index_skips)
    if not samples:
        _write_skip_report(out, opts.prefix, [asdict(s) for s in index_skips])
        raise InputError(f"none of the {num_inputs} input rows is usable; reasons in {opts.prefix}.skipped.jsonl")
    stat_images(samples)
    tasks = plan_shards(samples, opts)
    _claim_output(out, opts, plan_fingerprint(tasks, opts), len(tasks))
    done = _completed_shards(out, tasks)
    todo = [t for t in tasks if t.stem not in done]
    write_start = time.perf_counter()
    already = sum(t.num_samples for t in tasks) - sum(t.num_samples for t in todo)
    for result in _run_workers(todo, opts, total=len(samples), already=already):
        done[result.stem] = result
    write_seconds = time.perf_counter() - write_start
    worker_seconds = sum(done[t.stem].seconds for t in todo)
    results = [done[t.stem] for t in tasks]
    skipped = [asdict(s) for s in index_skips] + [s for r in results for s in r.skipped]
    _write_skip_report(out, opts.prefix, skipped)
    num_records = sum(r.records for r in results)
    if num_records == 0:
        raise InputError(f"every one of the {num_inputs} inputs failed; reasons in {opts.prefix}.skipped.jsonl")
    stats = Counter()
    for r in results:
        stats.update(r.stats)
    reasons = Counter(_reason_kind(s["reason"]) for s in skipped)
    meta = _build_meta(inputs, opts, results, num_inputs, reasons, stats)
    schema.write_meta(schema.meta_path(out, opts.prefix), meta)
    if num_records + len(skipped) != num_inputs:  # every input is a record or a reported skip
        raise RuntimeError(f"bookkeeping error: {num_records} records + {len(skipped)} skipped != {num_inputs} inputs")
    return ConvertReport(
        schema.meta_path(out, opts.prefix),
        num_inputs,
        num_records,
        reasons,
        stats,
        seconds=time.perf_counter() - start,
        write_seconds=write_seconds,
        worker_seconds=worker_seconds,
        images_written=sum(t.num_samples for t in todo),
    )


def _claim_output(out: Path, opts: ConvertOptions, fingerprint: str, num_shards: int) -> None:
    """Refuse to mix two different plans in one folder; --overwrite clears the old one and redoes all."""
    plan_path = out / f"{opts.prefix}.plan.json"
    if opts.overwrite:
        for p in out.glob(f"{opts.prefix}[-.]*"):
            p.unlink()
    elif plan_path.exists():
        if json.loads(plan_path.read_text()).get("fingerprint") == fingerprint:
            return
        raise InputError(
            f"{out} already holds shards '{opts.prefix}-*' from a run with other inputs or options; "
            "pass --overwrite to replace them, or choose another --out-dir/--prefix"
        )
    elif any(out.glob(f"{opts.prefix}-*")):
        raise InputError(f"{out} already holds files '{opts.prefix}-*' not made by data2rec; pass --overwrite")
    write_json_atomic(plan_path, {"fingerprint": fingerprint, "num_shards": num_shards, "seed": opts.seed})


def _completed_shards(out: Path, tasks: list[ShardTask]) -> dict[str, ShardResult]:
    """Shards an earlier run of this plan finished, from image files that have not changed since."""
    done, stale = {}, 0
    for task in tasks:
        result = _load_done(out / f"{task.stem}.done.json")
        if result is not None and result.inputs != shard_stamp(task):
            stale += 1  # an image was replaced (a bad one fixed?), added or removed: its old skips are stale
        elif result is not None:
            done[task.stem] = result
    if stale:
        logger.info("redoing %d shard(s) whose image files changed since they were written", stale)
    if done:
        logger.info("resuming: %d of %d shards already complete", len(done), len(tasks))
    return done


def _load_done(path: Path) -> ShardResult | None:
    if not path.exists():
        return None
    result = ShardResult(**json.loads(path.read_text()))
    rec = path.parent / f"{result.stem}.rec"
    if not rec.exists() or rec.stat().st_size != result.bytes:
        return None  # files changed since: redo the shard
    return result


def _run_workers(todo: list[ShardTask], opts: ConvertOptions, total: int, already: int):
    """Yield ShardResults as shards finish, with a progress bar over images."""
    from tqdm import tqdm

    if not todo:
        return
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold torch/OpenMP threads
    counter = ctx.Value("q", 0)
    bar = tqdm(total=total, initial=already, unit="img", desc="data2rec", disable=not opts.progress, smoothing=0.1)
    if opts.workers == 1:  # in this process: no pool start-up cost for small jobs and tests
        _init_worker(opts, counter)
        for task in todo:
            result = write_shard(task)
            bar.update(already + counter.value - bar.n)
            yield result
        bar.close()
        return
    # ProcessPoolExecutor, not multiprocessing.Pool: when a worker is killed (OOM killer, kill -9),
    # Pool silently replaces it and waits forever for its shard; the executor raises BrokenProcessPool.
    workers = min(opts.workers, len(todo))
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(opts, counter))
    # a few shards queued per worker, not all: a queued task holds its shard's SourceSamples
    waiting, pending = deque(todo), {}
    try:
        while True:
            while waiting and len(pending) < 2 * workers:
                pending[pool.submit(write_shard, waiting[0])] = waiting[0]
                waiting.popleft()
            if not pending:
                break
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            bar.update(already + counter.value - bar.n)
            for future in finished:
                result = future.result()  # re-raises a worker's exception here
                del pending[future]
                bar.set_postfix(shard=result.stem, skipped=len(result.skipped), refresh=False)
                yield result
    except BrokenProcessPool:
        unfinished = [t.stem for f, t in pending.items() if not (f.done() and f.exception() is None)]
        unfinished += [t.stem for t in waiting]
        raise WorkerLostError(_lost_worker_message(unfinished, len(todo))) from None
    finally:
        # After an error, queued shards are dropped and running ones finish (and are kept). Always wait: with
        # wait=False the pool's manager thread may close its wake-up pipe while the interpreter's exit hook
        # writes to it, printing an "OSError: Bad file descriptor" traceback at exit (CPython 3.11, seen in CI).
        pool.shutdown(wait=True, cancel_futures=True)
    bar.update(already + counter.value - bar.n)
    bar.close()


def _lost_worker_message(unfinished: list[str], num_todo: int) -> str:
    names = ", ".join(unfinished[:10]) + (f" and {len(unfinished) - 10} more" if len(unfinished) > 10 else "")
    return (
        "a worker process ended abruptly (killed by the out-of-memory killer or a signal, or crashed: see any "
        f"error above); {len(unfinished)} of the {num_todo} shards of this run are not finished: {names}. "
        "The finished shards are kept: rerun the same command to resume (with fewer --workers if memory ran out)"
    )


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _write_skip_report(out: Path, prefix: str, skipped: list[dict]) -> None:
    path = out / f"{prefix}.skipped.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for entry in sorted(skipped, key=lambda s: s["source"]):
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _tokenizer_info(name: str) -> dict:
    import open_clip

    tok = open_clip.get_tokenizer(name)
    if getattr(tok, "context_length", None) != schema.CONTEXT_LENGTH:
        raise InputError(f"tokenizer of {name} has context length {tok.context_length}; the layout needs 77")
    return {
        "model": name,
        "type": type(tok).__name__,
        "context_length": tok.context_length,
        "vocab_size": len(getattr(tok, "encoder", {})) or None,
        "sot_token_id": getattr(tok, "sot_token_id", None),
        "eot_token_id": getattr(tok, "eot_token_id", None),
        "cleaning": "ftfy.fix_text, then the tokenizer's own cleaning (lowercase, whitespace)",
    }


def _sidecar_captioners(opts: ConvertOptions) -> dict[str, dict]:
    """Each caption slot's captioner settings from its sidecar's header (tools/caption.py records the
    model and decoding there), by slot name: which captioner or prompt filled which slot."""
    sidecars = [(opts.caption_name, opts.captions), *((c.name, c.sidecar) for c in opts.more_captions)]
    out = {}
    for name, path in sidecars:
        header = read_sidecar_header(path) if path is not None else None
        if header and header.get("captioner") is not None:
            out[name] = header["captioner"]
    return out


def _build_meta(inputs, opts, results, num_inputs, reasons, stats) -> schema.DatasetMeta:
    shards = [
        schema.ShardInfo(f"{r.stem}.rec", f"{r.stem}.idx", r.records, r.bytes, r.sha256, texts=f"{r.stem}.texts.jsonl")
        for r in results
        if r.records > 0  # a shard whose every image failed is left out (DALI cannot read an empty shard)
    ]
    from alip import __version__

    first_caption = str(opts.captions) if opts.captions else (opts.columns.caption and f"column {opts.columns.caption}")
    captions = first_caption
    if opts.more_captions:  # K > 1: where each slot's captions came from
        captions = {opts.caption_name: first_caption, **{c.name: c.describe() for c in opts.more_captions}}
    source = {
        "inputs": [str(p) for p in inputs],
        "kind": "tar" if inputs[0].suffix == ".tar" else "manifest",
        "captions": captions,
        "num_inputs": num_inputs,
        "num_skipped": sum(reasons.values()),
        "skipped_by_reason": dict(reasons),
        "stats": dict(stats),
        "seed": opts.seed,
        "shard_records": opts.shard_records,
        "shard_bytes": opts.shard_bytes,
        "max_side": opts.max_side,
        "jpeg_quality": opts.jpeg_quality,
        "max_pixels": opts.max_pixels,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "alip_version": __version__,
    }
    if opts.tokens_npy is not None:
        source["tokens_npy"] = str(opts.tokens_npy)
    captioners = _sidecar_captioners(opts)
    if captioners:
        source["captioners"] = captioners
    slots = schema.TextSlots(opts.texts)
    return schema.DatasetMeta(
        shards=shards,
        tokenizer=_tokenizer_info(opts.tokenizer),
        source=source,
        layout=slots.layout(),
        texts=list(slots.names),
    )
