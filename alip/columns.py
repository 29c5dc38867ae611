"""Strings in columns: many strings held at the cost of their bytes, not of Python objects.

data2rec's index (alip.data.ingest.sample_index), the caption tool's sidecar (alip.caption.sidecar) and
`alip score`'s ranked rows (alip.score) hold a string per sample of a dataset at once, 15M of them for
YFCC15M. A Python str costs 49 bytes plus its length, plus a pointer; here a string costs its length + 8.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterator

import numpy as np

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
