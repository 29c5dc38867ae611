"""Caption sidecars: the file that maps a sample to its synthetic caption, and the part files behind it.

The final sidecar is what `tools/data2rec.py --captions` joins (see `alip.data.ingest.sources.read_caption_sidecar`):

    {"meta": {"format": "alip-caption-sidecar", "captioner": {...}, ...}}      first line: header
    {"key": "17", "path": "img/17.jpg", "caption": "a dog running on a beach"}
    {"key": "18", "path": "img/18.jpg", "caption": null, "reason": "corrupt or unreadable image: ..."}

or the same rows in parquet, with the header in the schema metadata. "path" is written for
manifest inputs only (img2dataset tars have keys, not paths).

While captioning, every rank appends to its own part file `{sidecar}.part{rank:05d}.jsonl` (same
header and rows). Each batch is written with one write, flushed and fsynced, so a crash loses at
most the batch being written; a torn last line is ignored when read back and cut off before the
part is appended to again. The merge checks the parts against the inputs (every sample exactly
once), writes the final sidecar in input order, then deletes the parts.

This module does file I/O only: no torch, no model.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alip.columns import CHUNK, StringColumn, StringColumnBuilder
from alip.data.ingest.sources import CAPTION_META_KEY, InputError
from alip.files import json_lines

logger = logging.getLogger(__name__)

FORMAT = "alip-caption-sidecar"
_PARQUET_META_KEY = CAPTION_META_KEY  # where data2rec reads the header of a parquet sidecar


class SidecarError(InputError):
    """A sidecar or part file that does not fit the inputs or the run: gaps, duplicates, other settings."""


@dataclass(frozen=True, slots=True)
class CaptionEntry:
    key: str
    caption: str | None  # None: captioning failed, see reason
    path: str | None = None  # the manifest's image path as written; None for tar samples
    reason: str | None = None

    def to_json(self) -> dict:
        row = {"key": self.key}
        if self.path is not None:
            row["path"] = self.path
        row["caption"] = self.caption
        if self.reason is not None:
            row["reason"] = self.reason
        return row

    @classmethod
    def from_json(cls, row: dict, where: str) -> CaptionEntry:
        if "key" not in row or "caption" not in row:
            raise SidecarError(f"{where}: an entry needs 'key' and 'caption', got {sorted(row)}")
        caption = row["caption"]
        return cls(str(row["key"]), None if caption is None else str(caption), row.get("path"), row.get("reason"))


@dataclass(frozen=True)
class MergeReport:
    path: Path
    num_samples: int
    num_captioned: int
    num_failed: int
    failures: dict[str, int]  # reason kind (text before the first ':') -> count


def part_path(sidecar: Path, rank: int) -> Path:
    return sidecar.with_name(f"{sidecar.name}.part{rank:05d}.jsonl")


def part_paths(sidecar: Path) -> list[Path]:
    """Part files of any earlier run, whatever its world size (rank numbers may have gaps)."""
    return sorted(sidecar.parent.glob(f"{sidecar.name}.part[0-9][0-9][0-9][0-9][0-9].jsonl"))


def repair_torn_tail(path: Path) -> int:
    """Cut off a last line without its newline (a write a crash interrupted). Returns the bytes dropped."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep == len(data):
            return 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", path, len(data) - keep)
    return len(data) - keep


class SidecarReader:
    """The entries of a sidecar or part file (JSONL or parquet), read as a stream: iterate it for the
    entries; `meta` is the header (None if the file has none), complete once the iteration ends.
    In JSONL a last line without newline is torn by a crash: ignored (repair_torn_tail cuts it off
    before a part is appended to again)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise SidecarError(f"caption sidecar not found: {path}")
        self.path = path
        self.meta: dict | None = None

    def __iter__(self) -> Iterator[CaptionEntry]:
        return self._parquet() if self.path.suffix == ".parquet" else self._jsonl()

    def _jsonl(self) -> Iterator[CaptionEntry]:
        path = self.path
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break  # torn by a crash mid-write
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SidecarError(
                        f"{path}:{lineno}: not valid JSON ({e}); only the last line may be torn"
                    ) from None
                if set(row) == {"meta"}:
                    self.meta = row["meta"]
                else:
                    yield CaptionEntry.from_json(row, f"{path}:{lineno}")

    def _parquet(self) -> Iterator[CaptionEntry]:
        import pyarrow.parquet as pq

        f = pq.ParquetFile(self.path)
        raw_meta = (f.schema_arrow.metadata or {}).get(_PARQUET_META_KEY)
        self.meta = json.loads(raw_meta) if raw_meta else None
        where = str(self.path)
        for batch in f.iter_batches(batch_size=CHUNK):
            for row in batch.to_pylist():
                yield CaptionEntry.from_json(row, where)


def read_sidecar(path: Path) -> tuple[dict | None, list[CaptionEntry]]:
    """Header meta (None if the file has none) and entries of a sidecar or part file, JSONL or parquet.
    All entries at once: for a small file (a test, a look); the tool itself reads with SidecarReader."""
    reader = SidecarReader(path)
    entries = list(reader)
    return reader.meta, entries


def count_entries(path: Path) -> int:
    """Entries in a sidecar file, each parsed but none kept (a second copy of 15M entries would
    double the merge's memory): parquet's row count, or JSONL's entry lines."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    return sum(set(row) != {"meta"} for _, row in json_lines(path, SidecarError))


PARQUET_ROW_GROUP = 1024 * 1024  # rows per row group: pyarrow's default, as pq.write_table cuts a table


def write_sidecar(path: Path, meta: dict, entries: Iterable[CaptionEntry]) -> None:
    """Write the final sidecar atomically (temporary file, fsync, rename): JSONL, or parquet by suffix.

    `entries` is read as a stream: JSONL a line at a time, parquet a row group at a time (the bytes
    pq.write_table writes for the whole table)."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = ("key", "path", "caption", "reason")
        schema = pa.schema(
            [(name, pa.string()) for name in names],
            metadata={_PARQUET_META_KEY: json.dumps(meta, ensure_ascii=False).encode()},
        )
        entries = iter(entries)
        with pq.ParquetWriter(tmp, schema) as writer:
            for group in itertools.count():
                batches = []  # one row group, in Arrow batches of CHUNK entries
                while len(batches) < PARQUET_ROW_GROUP // CHUNK and (chunk := list(itertools.islice(entries, CHUNK))):
                    columns = [[e.key for e in chunk], [e.path for e in chunk], [e.caption for e in chunk]]
                    columns.append([e.reason for e in chunk])
                    batches.append(pa.record_batch([pa.array(c, pa.string()) for c in columns], schema=schema))
                rows = sum(len(b) for b in batches)
                if rows or not group:  # no entries at all: one empty table, as pq.write_table writes it
                    # a single chunk per column, as pa.Table.from_pylist makes it
                    writer.write_table(pa.Table.from_batches(batches, schema).combine_chunks())
                if rows < PARQUET_ROW_GROUP:
                    break
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"meta": meta}, ensure_ascii=False) + "\n")
            for e in entries:
                f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class PartWriter:
    """Appends batches of entries to one rank's part file; each batch is durable once `write` returns."""

    def __init__(self, path: Path, meta: dict) -> None:
        repair_torn_tail(path)
        new = not path.exists() or path.stat().st_size == 0
        self.path = path
        self._f = open(path, "a", encoding="utf-8")
        if new:
            self.write_lines([json.dumps({"meta": meta}, ensure_ascii=False)])

    def write(self, entries: Sequence[CaptionEntry]) -> None:
        self.write_lines([json.dumps(e.to_json(), ensure_ascii=False) for e in entries])

    def write_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        # one write per batch, then flush + fsync: a crash tears at most this batch's last line
        self._f.write("".join(line + "\n" for line in lines))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_hash = hash  # a name, so that a test can force collisions


class ExistingEntries:
    """The entries already on disk for a sidecar (the final file, then every part file, in file
    order), in columns: `keys`, and with values also `paths`, `captions`, `reasons` (StringColumns,
    a few bytes over the strings' own per entry instead of a CaptionEntry of Python strings, about
    400 bytes). Keys are looked up by their 64-bit hashes sorted in NumPy (16 bytes an entry);
    hashes that collide are compared by string."""

    def __init__(self, keys: StringColumn, paths=None, captions=None, reasons=None) -> None:
        self.keys, self.paths, self.captions, self.reasons = keys, paths, captions, reasons
        hashes = np.fromiter((_hash(k) for k in keys), np.int64, count=len(keys))
        self.order = np.argsort(hashes, kind="stable")  # equal hashes keep file order
        self.sorted = hashes[self.order]

    def __len__(self) -> int:
        return len(self.keys)

    def duplicate(self) -> str | None:
        """The key that occurs twice whose second entry comes first in file order, or None."""
        same = np.flatnonzero(self.sorted[1:] == self.sorted[:-1])
        if not len(same):
            return None
        candidates = np.unique(np.concatenate([self.order[same], self.order[same + 1]]))
        first_seen, second = {}, []
        for position, key in zip(candidates.tolist(), self.keys.take(candidates), strict=True):
            if key in first_seen:
                second.append((position, key))
            else:
                first_seen[key] = position
        return min(second)[1] if second else None

    def find(self, queries: list[str]) -> np.ndarray:
        """The position of each query's entry (int64), -1 where it has none."""
        out = np.full(len(queries), -1, np.int64)
        if not len(queries) or not len(self.order):
            return out
        h = np.fromiter((_hash(q) for q in queries), np.int64, count=len(queries))
        lo, hi = np.searchsorted(self.sorted, h, "left"), np.searchsorted(self.sorted, h, "right")
        hit = np.flatnonzero(hi > lo)
        first = self.order[lo[hit]]
        for j, p, key in zip(hit.tolist(), first.tolist(), self.keys.take(first), strict=True):
            if key == queries[j]:
                out[j] = p
            else:  # a hash collision: look through the other keys with this hash
                same = self.order[lo[j] + 1 : hi[j]].tolist()
                out[j] = next((q for q in same if self.keys[q] == queries[j]), -1)
        return out

    def entries(self, positions: np.ndarray) -> list[CaptionEntry]:
        """The entries at `positions` (read with values)."""
        columns = (self.keys, self.paths, self.captions, self.reasons)
        return [
            CaptionEntry(k, c, p, r) for k, p, c, r in zip(*(column.take(positions) for column in columns), strict=True)
        ]

    def failures(self) -> Counter:
        """Failed entries by reason kind (the text before the first ':'; "unknown" without a reason)."""
        failed = np.flatnonzero(~self.captions.valid) if self.captions.valid is not None else np.zeros(0, np.int64)
        kinds: Counter = Counter()
        for first in range(0, len(failed), CHUNK):
            reasons = self.reasons.take(failed[first : first + CHUNK])
            kinds.update(r.split(":", 1)[0] if r else "unknown" for r in reasons)
        return kinds


def load_existing(sidecar: Path, values: bool = True) -> tuple[list[dict], ExistingEntries]:
    """Headers and entries already on disk for `sidecar`: the final file (if any) and all part files,
    read as streams into columns (`values=False`: the keys only, all the start-up needs).

    Raises SidecarError on a key that occurs twice (two runs wrote the same sample).
    """
    metas = []
    columns = [StringColumnBuilder() for _ in range(4 if values else 1)]
    sources = ([sidecar] if sidecar.exists() else []) + part_paths(sidecar)
    n = 0
    for path in sources:
        reader = SidecarReader(path)
        for e in reader:
            columns[0].pending.append(e.key)
            if values:
                columns[1].pending.append(e.path)
                columns[2].pending.append(e.caption)
                columns[3].pending.append(e.reason)
            n += 1
            if n % CHUNK == 0:
                for c in columns:
                    c.flush()
        metas.append({"file": str(path), "meta": reader.meta})
    existing = ExistingEntries(*(c.finish() for c in columns))
    twice = existing.duplicate()
    if twice is not None:
        raise SidecarError(f"sample key {twice!r} occurs twice in {sources}; remove the stray file(s)")
    return metas, existing


def check_settings(metas: list[dict], captioner: dict) -> None:
    """Refuse to mix captions made with other settings (model, dtype, decoding) into one sidecar."""
    for m in metas:
        theirs = (m["meta"] or {}).get("captioner")
        if theirs != captioner:
            raise SidecarError(
                f"{m['file']} holds captions made with other settings ({theirs}) than this run ({captioner}); "
                "rerun with the same settings to resume, or pass --overwrite to start over"
            )


def _key_chunks(expected: Iterable) -> Iterator[list[str]]:
    """Lists of up to CHUNK keys of `expected` (keys, or (key, path) pairs), in order."""
    if hasattr(expected, "chunks"):  # run.SampleKeys: read from the index's key column a chunk at a time
        yield from expected.chunks()
        return
    items = iter(expected)
    while chunk := list(itertools.islice(items, CHUNK)):
        yield [k if isinstance(k, str) else k[0] for k in chunk]


def merge(sidecar: Path, expected: Iterable, meta: dict) -> MergeReport:
    """Check the final file + parts against the inputs and write the final sidecar in input order.

    `expected` holds the key of every input sample in input order: keys (a StringColumn, a
    SampleKeys), or (key, path) pairs; it is read once, CHUNK keys at a time. Every sample
    must have exactly one entry (captioned or failed) and there must be no entry for another key;
    then the parts are deleted. On a gap nothing is written: rerun the captioning to fill it.
    The entries are held in columns (ExistingEntries); the sidecar is written as a stream.
    """
    _, existing = load_existing(sidecar)
    matched = np.zeros(len(existing), bool)
    found_all = []  # each sample's entry, in input order: int64 positions into `existing`
    num_missing = 0
    missing: list[str] = []  # the first few, for the message
    for keys in _key_chunks(expected):
        found = existing.find(keys)
        found_all.append(found)
        hit = found[found >= 0]
        if matched[hit].any() or len(np.unique(hit)) != len(hit):
            raise SidecarError("the inputs have duplicate sample keys")
        matched[hit] = True
        gaps = np.flatnonzero(found < 0)
        num_missing += len(gaps)
        missing += [keys[j] for j in gaps[: 5 - len(missing)].tolist()]
    where = np.concatenate(found_all) if found_all else np.zeros(0, np.int64)
    del found_all
    n = len(where)
    stray = np.flatnonzero(~matched)
    if len(stray):
        raise SidecarError(
            f"{len(stray)} entries are for samples not in the inputs (e.g. {existing.keys.take(stray[:5])}): "
            "the inputs changed since these captions were made; pass --overwrite to start over"
        )
    if num_missing:
        raise SidecarError(
            f"{num_missing} of {n} samples have no caption entry yet (e.g. {missing}); "
            "run the captioning again (it resumes) before merging"
        )
    del matched
    failures = existing.failures()  # every entry is one sample's: their failures are the samples'
    num_failed = sum(failures.values())
    meta = {
        **meta,
        "num_samples": n,
        "num_captioned": n - num_failed,
        "num_failed": num_failed,
        "failures": dict(sorted(failures.items())),
    }
    in_order = (e for first in range(0, n, CHUNK) for e in existing.entries(where[first : first + CHUNK]))
    write_sidecar(sidecar, meta, in_order)
    written = count_entries(sidecar)  # the count check on what actually landed on disk
    if written != n:
        raise SidecarError(f"{sidecar}: wrote {written} entries, expected {n}")
    for part in part_paths(sidecar):
        part.unlink()
    return MergeReport(sidecar, n, n - num_failed, num_failed, meta["failures"])
