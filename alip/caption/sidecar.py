"""Caption sidecars: the file that maps a sample to its synthetic caption, and the part files behind it.

The final sidecar is what `tools/data2rec.py --captions` joins (see `alip.data.sources.read_caption_sidecar`):

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

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from alip.data.sources import CAPTION_META_KEY, InputError
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


def _read_jsonl(path: Path) -> tuple[dict | None, list[CaptionEntry]]:
    """Header meta and entries of a JSONL sidecar or part. A last line without newline is torn: ignored."""
    meta, entries = None, []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # torn by a crash mid-write; repair_torn_tail removes it before appending
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SidecarError(f"{path}:{lineno}: not valid JSON ({e}); only the last line may be torn") from None
            if set(row) == {"meta"}:
                meta = row["meta"]
            else:
                entries.append(CaptionEntry.from_json(row, f"{path}:{lineno}"))
    return meta, entries


def read_sidecar(path: Path) -> tuple[dict | None, list[CaptionEntry]]:
    """Header meta (None if the file has none) and entries of a sidecar or part file, JSONL or parquet."""
    if not path.is_file():
        raise SidecarError(f"caption sidecar not found: {path}")
    if path.suffix != ".parquet":
        return _read_jsonl(path)
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw_meta = (table.schema.metadata or {}).get(_PARQUET_META_KEY)
    meta = json.loads(raw_meta) if raw_meta else None
    return meta, [CaptionEntry.from_json(row, str(path)) for row in table.to_pylist()]


def count_entries(path: Path) -> int:
    """Entries in a sidecar file, each parsed but none kept (a second copy of 15M entries would
    double the merge's memory): parquet's row count, or JSONL's entry lines."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows
    return sum(set(row) != {"meta"} for _, row in json_lines(path, SidecarError))


def write_sidecar(path: Path, meta: dict, entries: Iterable[CaptionEntry]) -> None:
    """Write the final sidecar atomically (temporary file, fsync, rename): JSONL, or parquet by suffix."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{"key": e.key, "path": e.path, "caption": e.caption, "reason": e.reason} for e in entries]
        schema = pa.schema(
            [(name, pa.string()) for name in ("key", "path", "caption", "reason")],
            metadata={_PARQUET_META_KEY: json.dumps(meta, ensure_ascii=False).encode()},
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
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


def load_existing(sidecar: Path) -> tuple[list[dict], dict[str, CaptionEntry]]:
    """Headers and entries already on disk for `sidecar`: the final file (if any) and all part files.

    Raises SidecarError on a key that occurs twice (two runs wrote the same sample).
    """
    metas, done = [], {}
    sources = ([sidecar] if sidecar.exists() else []) + part_paths(sidecar)
    for path in sources:
        meta, entries = read_sidecar(path)
        metas.append({"file": str(path), "meta": meta})
        for e in entries:
            if e.key in done:
                raise SidecarError(f"sample key {e.key!r} occurs twice in {sources}; remove the stray file(s)")
            done[e.key] = e
    return metas, done


def check_settings(metas: list[dict], captioner: dict) -> None:
    """Refuse to mix captions made with other settings (model, dtype, decoding) into one sidecar."""
    for m in metas:
        theirs = (m["meta"] or {}).get("captioner")
        if theirs != captioner:
            raise SidecarError(
                f"{m['file']} holds captions made with other settings ({theirs}) than this run ({captioner}); "
                "rerun with the same settings to resume, or pass --overwrite to start over"
            )


def merge(sidecar: Path, expected: Sequence[tuple[str, str | None]], meta: dict) -> MergeReport:
    """Check the final file + parts against the inputs and write the final sidecar in input order.

    `expected` lists (key, path) of every input sample in input order. Every sample must have
    exactly one entry (captioned or failed) and there must be no entry for another key; then the
    parts are deleted. On a gap nothing is written: rerun the captioning to fill it.
    """
    _, done = load_existing(sidecar)
    keys = [k for k, _ in expected]
    wanted = set(keys)
    if len(wanted) != len(keys):
        raise SidecarError("the inputs have duplicate sample keys")
    stray = [k for k in done if k not in wanted]
    if stray:
        raise SidecarError(
            f"{len(stray)} entries are for samples not in the inputs (e.g. {stray[:5]}): "
            "the inputs changed since these captions were made; pass --overwrite to start over"
        )
    missing = [k for k in keys if k not in done]
    if missing:
        raise SidecarError(
            f"{len(missing)} of {len(keys)} samples have no caption entry yet (e.g. {missing[:5]}); "
            "run the captioning again (it resumes) before merging"
        )
    entries = [done[k] for k in keys]
    failures = Counter(e.reason.split(":", 1)[0] if e.reason else "unknown" for e in entries if e.caption is None)
    num_failed = sum(failures.values())
    meta = {
        **meta,
        "num_samples": len(entries),
        "num_captioned": len(entries) - num_failed,
        "num_failed": num_failed,
        "failures": dict(sorted(failures.items())),
    }
    write_sidecar(sidecar, meta, entries)
    written = count_entries(sidecar)  # the count check on what actually landed on disk
    if written != len(keys):
        raise SidecarError(f"{sidecar}: wrote {written} entries, expected {len(keys)}")
    for part in part_paths(sidecar):
        part.unlink()
    return MergeReport(sidecar, len(entries), len(entries) - num_failed, num_failed, meta["failures"])
