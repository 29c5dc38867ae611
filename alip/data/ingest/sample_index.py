"""data2rec's index in columns: every sample of a dataset held at once (to shuffle it) at about 250
bytes a sample instead of the 680 of one `SourceSample` with its five Python strings.

The strings of all samples are kept in Arrow's layout (UTF-8 bytes end to end and int64 offsets,
`StringColumn`), the numbers in NumPy arrays (`SampleIndex`). `SourceSample`s are built from it on
demand, a shard's worth at a time. Caption sidecars are joined the same way (`CaptionTable`).
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from alip.columns import CHUNK, StringColumn, StringColumnBuilder
from alip.data.ingest.sources import SourceSample, sidecar_entries

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
