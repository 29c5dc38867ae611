"""A data position that means something on any number of ranks, and the data it belongs to.

Within an epoch, every rank of the torch loader computes the same order of all records (a seeded
permutation, or file order) and reads a part of it. A rank's progress is recorded as intervals
`[start, end)` of positions in that order: the union over the ranks (plus what was read before
the current partition began) is the epoch's progress, whatever the world size. A resume on
another world size (`--reshard`) continues the epoch over the positions outside that union.

`shards_digest` fingerprints the records a position refers to (shard file names and record
counts, not their folder): a position is only carried over to the same records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from alip.data.format.recordio import ShardCheck

Intervals = list[list[int]]  # [[start, end), ...], sorted, disjoint, not touching


def to_intervals(positions: np.ndarray) -> Intervals:
    """The sorted runs of consecutive values in `positions` (any order, no repeats needed)."""
    values = np.asarray(positions, dtype=np.int64)
    if np.any(np.diff(values) <= 0):  # a part's positions come sorted: sort only where they are not
        values = np.unique(values)
    if len(values) == 0:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(values)]])
    return [[int(values[s]), int(values[e - 1]) + 1] for s, e in zip(starts, ends, strict=True)]


def union(*lists: Iterable[Sequence[int]]) -> Intervals:
    """The union of interval lists, merged into sorted, disjoint intervals."""
    spans = sorted((int(a), int(b)) for intervals in lists for a, b in intervals if b > a)
    out: Intervals = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def covered(intervals: Iterable[Sequence[int]]) -> int:
    """How many positions `intervals` (disjoint) cover."""
    return sum(int(b) - int(a) for a, b in intervals)


def remaining(num_records: int, seen: Iterable[Sequence[int]]) -> np.ndarray:
    """Positions 0..num_records-1 outside `seen`, in order."""
    keep = np.ones(num_records, dtype=bool)
    for a, b in seen:
        keep[int(a) : int(b)] = False
    return np.flatnonzero(keep)


def shards_digest(shards: Sequence[ShardCheck]) -> str:
    """sha256 of the shards' file names and record counts, in reading order: the same records, also when
    the folder moved. Appended, removed, reordered or regrown shards give another digest."""
    h = hashlib.sha256()
    for shard in shards:
        h.update(f"{shard.rec_path.name}\t{shard.num_records}\n".encode())
    return h.hexdigest()
