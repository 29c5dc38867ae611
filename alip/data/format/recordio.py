"""Pure-Python MXNet RecordIO: read, write, index and preflight-check `.rec`/`.idx` shards.

Byte-compatible with dmlc-core's RecordIOWriter as used by `mxnet.recordio` (checked against files
written by MXNet 1.9.1 in tests/fixtures/mxnet). No mxnet import: MXNet is retired and does not
run on NumPy >= 1.24. Nothing here needs DALI or torch.

Framing. Every record is `uint32 magic | uint32 lrec | data | zero padding to 4 bytes`, with
`lrec = cflag << 29 | length`. dmlc-core never lets the magic number appear at a 4-byte-aligned
offset inside the data: where it would, the record is split there into parts (cflag 1 = first,
2 = middle, 3 = last) and the magic itself is dropped, to be re-inserted by the reader. A 15M-image
dataset has a few dozen JPEGs where this happens, so the writer and reader implement it.

Payload (`pack`/`unpack`): `IRHeader(flag: uint32, label: float32, id: uint64, id2: uint64)`; when
the label is an array, `flag` is its length, the header's label is 0 and the float32 array follows
the header, then the image bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from alip.cli import UserError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR_FORMAT = "<IfQQ"  # == mxnet's native "IfQQ" on little-endian hosts: 24 bytes, no padding
IR_SIZE = struct.calcsize(_IR_FORMAT)
_MAX_LENGTH = (1 << 29) - 1


class RecordIOError(UserError, ValueError):
    """A malformed shard. The message names the file and the record (key and byte offset).

    A user error (alip.cli): the shard is bad, not the code that reads it.
    """


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float | np.ndarray
    id: int
    id2: int = 0


def pack(header: IRHeader, payload: bytes) -> bytes:
    """IRHeader + payload -> record bytes, as `mxnet.recordio.pack`."""
    if isinstance(header.label, (int, float, np.floating, np.integer)):
        head = struct.pack(_IR_FORMAT, 0, float(header.label), header.id, header.id2)
        return head + payload
    label = np.ascontiguousarray(header.label, dtype="<f4").ravel()
    return struct.pack(_IR_FORMAT, label.size, 0.0, header.id, header.id2) + label.tobytes() + payload


def unpack(record: bytes | memoryview) -> tuple[IRHeader, bytes]:
    """Record bytes -> (IRHeader, payload), as `mxnet.recordio.unpack`."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, rid, rid2 = struct.unpack_from(_IR_FORMAT, record)
    body = memoryview(record)[IR_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"record declares a {flag}-float label but has only {len(body)} bytes after the header")
        label = np.frombuffer(body[: 4 * flag], dtype="<f4").copy()
        body = body[4 * flag :]
    return IRHeader(flag, label, rid, rid2), bytes(body)


def frame(data: bytes) -> bytes:
    """Frame one record for the .rec file (dmlc-core RecordIOWriter::WriteRecord)."""
    n = len(data)
    if n > _MAX_LENGTH:
        raise RecordIOError(f"a RecordIO record must be under 2**29 bytes, got {n}")
    parts, start = [], 0
    # The magic number may only stand at aligned offsets of the data where it must be escaped.
    pos = data.find(_MAGIC_BYTES)
    while pos != -1 and pos + 4 <= (n & ~3):
        if pos % 4 == 0:
            cflag = 1 if start == 0 else 2
            parts.append(struct.pack("<II", MAGIC, (cflag << 29) | (pos - start)) + data[start:pos])
            start = pos + 4
            pos = data.find(_MAGIC_BYTES, start)
        else:
            pos = data.find(_MAGIC_BYTES, pos + 1)
    cflag = 3 if start else 0
    parts.append(struct.pack("<II", MAGIC, (cflag << 29) | (n - start)) + data[start:])
    parts.append(b"\0" * (-n % 4))  # dmlc pads by the whole record's length
    return b"".join(parts)


def read_idx(idx_path: str | Path) -> list[tuple[int, int]]:
    """(key, offset) pairs of an MXNet .idx file, in file order."""
    entries = []
    with open(idx_path, encoding="ascii") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            try:
                entries.append((int(fields[0]), int(fields[1])))
            except (ValueError, IndexError):
                raise RecordIOError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', got {line.rstrip()!r}") from None
    return entries


def read_idx_arrays(idx_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of an .idx as int64 arrays [N], in file order: `read_idx` parsed by NumPy.

    About 50x faster than `read_idx` (a 15M-record dataset's .idx files are ~250 MB of text that
    every loader start reads). Anything unusual (a blank line, a third column, a bad number) falls
    back to `read_idx`, which skips or names the line.
    """
    data = Path(idx_path).read_bytes()
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    try:
        values = np.fromstring(data.decode("ascii"), dtype=np.int64, sep=" ") if lines else np.empty(0, np.int64)
    except (ValueError, UnicodeDecodeError):
        values = None
    if values is None or values.size != 2 * lines:
        pairs = np.asarray(read_idx(idx_path), dtype=np.int64).reshape(-1, 2)
    else:
        pairs = values.reshape(-1, 2)
    return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])


class RecordIOWriter:
    """Append records to a .rec file and its .idx (`mxnet.recordio.MXIndexedRecordIO` in write mode).

    Writes exactly what MXNet writes. Atomicity is the caller's: write to temporary names and
    rename when the shard is complete (see alip.data.ingest.convert).
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._rec: BinaryIO = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii") if self.idx_path else None
        self._pos = 0
        self.count = 0

    def write(self, key: int, record: bytes) -> None:
        data = frame(record)
        self._rec.write(data)
        if self._idx is not None:
            self._idx.write(f"{key}\t{self._pos}\n")
        self._pos += len(data)
        self.count += 1

    @property
    def bytes_written(self) -> int:
        return self._pos

    def close(self, fsync: bool = False) -> None:
        for f in (self._rec, self._idx):
            if f is not None and not f.closed:
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
                f.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordIOReader:
    """Random and sequential access to a .rec file through its .idx (or a scan when there is none)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None, read_index: bool = True) -> None:
        """read_index=False: no index at all (no .idx read, no scan); for `parts` and `read_at` only."""
        self.rec_path = Path(rec_path)
        if idx_path is None and self.rec_path.with_suffix(".idx").exists():
            idx_path = self.rec_path.with_suffix(".idx")
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._f: BinaryIO = open(self.rec_path, "rb")
        self.size = os.fstat(self._f.fileno()).st_size
        if not read_index:
            self.index = []
        elif self.idx_path is not None:
            self.index = read_idx(self.idx_path)
        else:
            self.index = list(enumerate(self._scan()))
        self._offsets = dict(self.index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def keys(self) -> list[int]:
        return [k for k, _ in self.index]

    def parts(self, offset: int, what: str = "record") -> tuple[list[tuple[int, int]], int]:
        """Walk the framing of the record at `offset` reading headers only.

        Returns ([(data offset, length)] of its parts, offset just past its padding). Raises
        RecordIOError naming the file, the record and the byte offset on any inconsistency.
        """
        parts: list[tuple[int, int]] = []
        while True:
            if offset + 8 > self.size:
                raise RecordIOError(f"{self.rec_path}: {what} at byte {offset}: file truncated (size {self.size})")
            self._f.seek(offset)
            magic, lrec = struct.unpack("<II", self._f.read(8))
            if magic != MAGIC:
                raise RecordIOError(f"{self.rec_path}: {what} at byte {offset}: bad magic number 0x{magic:08x}")
            cflag, length = lrec >> 29, lrec & _MAX_LENGTH
            if offset + 8 + length > self.size:
                raise RecordIOError(
                    f"{self.rec_path}: {what} at byte {offset}: {length}-byte record runs past the end of "
                    f"the file (size {self.size}): truncated shard"
                )
            if cflag > 3 or (cflag in (2, 3)) != bool(parts):
                raise RecordIOError(f"{self.rec_path}: {what} at byte {offset}: unexpected part flag {cflag}")
            parts.append((offset + 8, length))
            if cflag in (0, 3):
                # dmlc pads by the whole record's length; earlier parts are 4-aligned, so this is the same
                return parts, offset + 8 + length + (-length % 4)
            offset += 8 + length

    def read_at(self, offset: int, what: str = "record") -> bytes:
        """The record starting at byte `offset`, parts re-joined with the magic number they replaced."""
        chunks = []
        for data_offset, length in self.parts(offset, what)[0]:
            self._f.seek(data_offset)
            chunks.append(self._f.read(length))
        return _MAGIC_BYTES.join(chunks)

    def read_key(self, key: int) -> bytes:
        try:
            offset = self._offsets[key]
        except KeyError:
            raise KeyError(f"{self.rec_path}: no record with key {key}") from None
        return self.read_at(offset, what=f"record key {key}")

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for key, offset in self.index:
            yield key, self.read_at(offset, what=f"record key {key}")

    def _scan(self) -> list[int]:
        """Record offsets of a .rec without .idx, by walking the framing."""
        offsets, offset = [], 0
        while offset < self.size:
            offsets.append(offset)
            offset = self.parts(offset, what=f"record {len(offsets) - 1}")[1]
        return offsets

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ShardCheck:
    rec_path: Path
    idx_path: Path
    num_records: int
    num_bytes: int


def check_shard(
    rec_path: str | Path,
    idx_path: str | Path | None = None,
    label_length: int | None = None,
    expected_records: int | None = None,
) -> ShardCheck:
    """Preflight a shard before a training run trusts it.

    Checks that the .idx parses, every offset lies inside the .rec and starts with the magic number,
    every record's framing fits in the file, records tile the file without gaps or trailing bytes,
    the count matches `expected_records`, and each record's label has `label_length` floats. Reads
    the 8-byte frame headers and the label length only, so large shards are checked quickly.
    Raises RecordIOError naming the file and the record.
    """
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    for p in (rec_path, idx_path):
        if not p.is_file():
            raise RecordIOError(f"shard file missing: {p}")
    with RecordIOReader(rec_path, idx_path) as reader:
        if expected_records is not None and len(reader) != expected_records:
            raise RecordIOError(
                f"{idx_path}: {len(reader)} records, but the meta JSON says {expected_records}: "
                "mismatched or partially written shard"
            )
        expected_next = 0
        for key, offset in sorted(reader.index, key=lambda e: e[1]):
            what = f"record key {key}"
            if offset >= reader.size:
                raise RecordIOError(
                    f"{idx_path}: {what} has offset {offset} beyond the end of {rec_path} (size {reader.size})"
                )
            if offset != expected_next:
                raise RecordIOError(
                    f"{rec_path}: {what} starts at byte {offset}, but the previous record ends at byte "
                    f"{expected_next}: .idx does not match the .rec"
                )
            parts, expected_next = reader.parts(offset, what)
            _check_label(reader, parts, offset, what, label_length)
        if expected_next != reader.size:
            raise RecordIOError(
                f"{rec_path}: records end at byte {expected_next} but the file has {reader.size} bytes: "
                "records missing from the .idx, or trailing garbage"
            )
        return ShardCheck(rec_path, idx_path, len(reader), reader.size)


def quick_check_shard(
    rec_path: str | Path,
    idx_path: str | Path | None = None,
    label_length: int | None = None,
    expected_records: int | None = None,
    expected_bytes: int | None = None,
) -> ShardCheck:
    """The loaders' default start-up check: what sizes, counts and the .idx say, plus three records.

    Checks that both files exist, the .rec's size equals `expected_bytes` (the meta JSON's) and the
    .idx's count `expected_records`, the .idx parses, its offsets are distinct, 4-byte aligned,
    start at 0, leave room for a frame header (and `label_length` floats) between neighbours and
    lie inside the .rec; then walks the framing of the first, middle and last record (magic, part
    flags, lengths inside the file, the label length, no split inside the IRHeader) and checks
    that the last record ends exactly at the end of the file. Cost: one .idx read and three frame
    headers, whatever the shard's size (`check_shard` reads one header per record).

    What it cannot see: a damaged frame header of a record other than those three, or .idx offsets
    that are wrong but still ordered and spaced plausibly. `check_shard` (the loaders' opt-in
    `full_check`, `tools/inspect_rec.py --check`) walks every record. Raises RecordIOError naming
    the file (and the record).
    """
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
    for p in (rec_path, idx_path):
        if not p.is_file():
            raise RecordIOError(f"shard file missing: {p}")
    size = rec_path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise RecordIOError(
            f"{rec_path}: {size} bytes, but the meta JSON says {expected_bytes}: truncated, or changed since "
            "it was written"
        )
    keys, offsets = read_idx_arrays(idx_path)
    n = len(offsets)
    if expected_records is not None and n != expected_records:
        raise RecordIOError(
            f"{idx_path}: {n} records, but the meta JSON says {expected_records}: mismatched or partially written shard"
        )
    if n == 0:
        if size:
            raise RecordIOError(
                f"{idx_path}: no records, but {rec_path} has {size} bytes: .idx does not match the .rec"
            )
        return ShardCheck(rec_path, idx_path, 0, 0)
    order = np.argsort(offsets, kind="stable")
    layout = _IdxLayout(rec_path, keys[order], offsets[order], size, label_length)
    with RecordIOReader(rec_path, idx_path, read_index=False) as reader:
        layout.check_offsets(reader)
        for i in sorted({0, n // 2, n - 1}):
            layout.walk(reader, i)
    return ShardCheck(rec_path, idx_path, n, size)


@dataclass
class _IdxLayout:
    """A shard's records as its .idx places them, in file order, for `quick_check_shard`."""

    rec_path: Path
    keys: np.ndarray  # [N] record keys, in file order
    starts: np.ndarray  # [N] record offsets, ascending
    size: int  # the .rec's size in bytes
    label_length: int | None

    def walk(self, reader: RecordIOReader, i: int) -> None:
        """Read the framing (and label) of the i-th record and check it ends where the next begins."""
        key, offset, n = int(self.keys[i]), int(self.starts[i]), len(self.starts)
        what = f"record key {key}"
        parts, end = reader.parts(offset, what)  # raises on a cut record, naming it
        _check_label(reader, parts, offset, what, self.label_length)
        following = int(self.starts[i + 1]) if i + 1 < n else self.size
        if end != following:
            raise RecordIOError(
                f"{self.rec_path}: {what} at byte {offset} ends at byte {end}, but "
                + (
                    f"the next record starts at byte {following}: .idx does not match the .rec"
                    if i + 1 < n
                    else f"the file has {self.size} bytes: records missing from the .idx, or trailing garbage"
                )
            )

    def check_offsets(self, reader: RecordIOReader) -> None:
        """Offsets inside the file, the first at 0, each 4-byte aligned and room for a record before the next."""
        starts, size, n = self.starts, self.size, len(self.starts)
        # The smallest record: frame header, plus IRHeader and label when the layout is known.
        smallest = 8 + (IR_SIZE + 4 * self.label_length if self.label_length else 0)
        if starts[-1] + smallest > size:
            # The .idx reaches past the end of the .rec: name the record that was cut (a truncated
            # shard), else the first one that starts beyond the end.
            inside = int(np.searchsorted(starts, size))
            self.walk(reader, max(inside - 1, 0))
            i = min(inside, n - 1)
            raise RecordIOError(
                f"{self.rec_path}: record key {int(self.keys[i])} at byte {int(starts[i])}: beyond the end of "
                f"the file (size {size}): truncated shard, or the .idx of another shard"
            )
        gaps = np.diff(np.append(starts, size))  # [N] bytes from each record to the next one (or the end)
        bad = np.flatnonzero((starts % 4 != 0) | (gaps < smallest))
        if starts[0] == 0 and not bad.size:
            return
        i = 0 if starts[0] != 0 else int(bad[0])
        key, offset = int(self.keys[i]), int(starts[i])
        if i == 0 and offset != 0:
            why = "is the first record but does not start the file"
        elif offset % 4:
            why = "is not on a 4-byte record boundary"
        else:
            why = f"leaves {int(gaps[i])} bytes before the next record, too few for one"
        raise RecordIOError(f"{self.rec_path}: record key {key} at byte {offset} {why}: .idx does not match the .rec")


def _check_label(
    reader: RecordIOReader, parts: list[tuple[int, int]], offset: int, what: str, label_length: int | None
) -> None:
    """The IRHeader checks for one record: no split inside the IRHeader, `label_length` floats."""
    if label_length is None:
        return
    if len(parts) > 1 and parts[0][1] < IR_SIZE:
        # DALI 2.4's reader rejects a multi-part record whose first part cannot hold the IRHeader
        # (it re-joins later splits, inside the payload, correctly).
        raise RecordIOError(
            f"{reader.rec_path}: {what} at byte {offset} is split inside its IRHeader (the magic number "
            "occurs in its id fields); DALI cannot read it: rewrite the record with another id"
        )
    data_offset, length = parts[0]
    reader._f.seek(data_offset)
    flag = struct.unpack("<I", reader._f.read(4))[0] if length >= 4 else None
    if flag != label_length:
        raise RecordIOError(
            f"{reader.rec_path}: {what} at byte {offset}: label has {flag} floats, expected {label_length}"
        )


def write_records(rec_path: str | Path, idx_path: str | Path, records: Sequence[tuple[int, bytes]]) -> None:
    """Convenience: write (key, record bytes) pairs to a new shard."""
    with RecordIOWriter(rec_path, idx_path) as w:
        for key, record in records:
            w.write(key, record)
