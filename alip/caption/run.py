"""Caption every image of data2rec's inputs into a sidecar: batched, multi-rank, resumable.

The steps:
1. Index the inputs exactly as data2rec does (`alip.data.ingest.shard_plan.index_inputs`), so sample keys
   and manifest paths are the ones data2rec will join on.
2. Read what earlier runs left (the final sidecar and every part file) and refuse entries made
   with other settings or for other inputs. The samples without an entry are the work; rank r of
   W takes every W-th of them. All ranks read before any rank writes (a barrier), so they agree
   on the list even when the world size changed since the interrupted run.
3. Decode and preprocess images in DataLoader workers; generate captions in batches on this
   rank's device; append each batch to this rank's part file (flushed and fsynced).
4. After a barrier, rank 0 merges: every input sample exactly once, in input order, failures
   included with their reason; then the part files are deleted.

At 15M samples nothing holds an object per sample: the index is data2rec's columnar SampleIndex,
the earlier entries are read into columns (keys only at the start), the work is an int64 array of
sample positions, a SourceSample is built when a DataLoader worker asks for its image, and the
merge streams the sidecar in input order (see alip.caption.sidecar.merge).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from alip.caption.captioner import Captioner
from alip.caption.sidecar import (
    FORMAT,
    CaptionEntry,
    ExistingEntries,
    MergeReport,
    PartWriter,
    SidecarError,
    check_settings,
    load_existing,
    merge,
    part_path,
    part_paths,
)
from alip.columns import CHUNK
from alip.data.format.images import BadImage, decode_image
from alip.data.ingest.sample_index import SampleIndex
from alip.data.ingest.shard_plan import ConvertOptions, index_inputs
from alip.data.ingest.sources import Columns, InputError, Skip, read_image_bytes
from alip.distributed import get_rank, get_world_size
from alip.files import refuse_overlap

logger = logging.getLogger(__name__)


@dataclass
class CaptionOptions:
    output: Path  # the sidecar: .jsonl, or .parquet
    image_root: Path | None = None  # manifests' image paths are relative to it (default: the manifest's folder)
    image_col: str = "image"
    key_col: str | None = None  # default: the row number, as in data2rec
    batch_size: int = 64
    workers: int = min(8, os.cpu_count() or 1)  # DataLoader workers decoding images; 0 = in this process
    max_pixels: int = 89_478_485  # decompression-bomb limit, as data2rec's
    overwrite: bool = False  # delete earlier captions of this sidecar instead of resuming
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise InputError(f"workers must be >= 0, got {self.workers}")
        if self.output.suffix not in (".jsonl", ".parquet"):
            raise InputError(f"the sidecar must end in .jsonl or .parquet, got {self.output}")


@dataclass
class CaptionReport:
    num_samples: int  # input samples (rows that could not be indexed are not samples)
    already_done: int  # entries found from earlier runs
    captioned: int  # by this rank in this run
    failed: int  # by this rank in this run
    caption_seconds: float  # this rank's captioning loop, model loading excluded
    merged: MergeReport | None  # rank 0 only

    @property
    def images_per_second(self) -> float:
        return (self.captioned + self.failed) / max(self.caption_seconds, 1e-9)


def index_for_captioning(inputs: list[Path], opts: CaptionOptions) -> tuple[SampleIndex, list[Skip]]:
    """data2rec's samples of `inputs`: same keys, same paths, same row numbering, same duplicate check."""
    # Captioning reads only images, so the image column doubles as the required text column: a
    # manifest needs no text column here, and the row numbering (the default keys) is unchanged.
    columns = Columns(image=opts.image_col, text=opts.image_col, caption=None, key=opts.key_col)
    convert_opts = ConvertOptions(
        out_dir=opts.output.parent, image_root=opts.image_root, columns=columns, require_caption=False, workers=1
    )
    samples, skips = index_inputs(inputs, convert_opts)
    if not len(samples):
        raise InputError(f"none of the {len(skips)} input rows names an image")
    for skip in skips[:5]:
        logger.warning("not captioned: %s: %s", skip.source, skip.reason)
    if skips:
        logger.warning("%d input rows cannot be samples and are not captioned (data2rec skips them too)", len(skips))
    return samples, skips


class SampleKeys:
    """The keys of a SampleIndex's samples in sample order, read CHUNK at a time: what the merge
    checks and writes in order, without a list of 15M keys."""

    def __init__(self, samples: SampleIndex) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def chunks(self) -> Iterator[list[str]]:
        """The keys, CHUNK at a time."""
        samples, keys = self.samples, self.samples.strings["key"]
        for first in range(0, len(samples), CHUNK):
            yield keys.take(samples.physical(np.arange(first, min(first + CHUNK, len(samples)))))

    def __iter__(self) -> Iterator[str]:
        for chunk in self.chunks():
            yield from chunk


def select_todo(samples: SampleIndex, existing: ExistingEntries, sidecar: Path) -> np.ndarray:
    """The positions (int64, in sample order) of the samples without an entry in `existing`.

    Raises SidecarError when an entry is for a key that is not a sample of these inputs."""
    matched = np.zeros(len(existing), bool)
    todo = []
    first = 0
    for keys in SampleKeys(samples).chunks():
        found = existing.find(keys)
        matched[found[found >= 0]] = True
        todo.append(first + np.flatnonzero(found < 0))
        first += len(keys)
    stray = np.flatnonzero(~matched)
    if len(stray):
        raise SidecarError(
            f"{sidecar}: {len(stray)} existing entries are for samples not in these inputs "
            f"(e.g. {existing.keys.take(stray[:5])}); caption other inputs into another sidecar, or pass --overwrite"
        )
    return np.concatenate(todo) if todo else np.zeros(0, np.int64)


@dataclass
class Work:
    """What a rank learns at the start: the samples, the rows not indexed, its share of the work."""

    samples: SampleIndex
    skips: list[Skip]
    mine: np.ndarray  # int64 positions of this rank's samples without an entry: every W-th of the work
    already: int  # entries from earlier runs
    todo: int  # samples without an entry (all ranks)


def refuse_inputs(inputs: list[Path], opts: CaptionOptions) -> None:
    """Before anything is read or deleted (--overwrite removes the sidecar and its parts): the sidecar is
    no input, and lies inside no --image-root. OutputOverlapError names both."""
    roots = [("--image-root", opts.image_root)] if opts.image_root is not None else []
    refuse_overlap(("--out", opts.output), [*(("input", p) for p in inputs), *roots])


def start_work(inputs: list[Path], opts: CaptionOptions, settings: dict, rank: int, world: int) -> Work:
    """Index the inputs, read what earlier runs left (refusing other settings and other inputs) and
    take this rank's share of the samples without an entry. Call it on every rank (it has barriers)."""
    sidecar = opts.output
    refuse_inputs(inputs, opts)
    samples, skips = index_for_captioning(inputs, opts)
    if opts.overwrite and rank == 0:
        for p in [sidecar, *part_paths(sidecar)]:
            p.unlink(missing_ok=True)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    _barrier()  # nobody reads before rank 0 has cleared an overwritten run

    metas, existing = load_existing(sidecar, values=False)  # the keys: the start needs no captions
    check_settings(metas, settings)
    todo = select_todo(samples, existing, sidecar)
    work = Work(samples, skips, todo[rank::world].copy(), len(existing), len(todo))
    del existing, todo
    if work.already and rank == 0:
        logger.info("resuming: %d of %d samples already have an entry; %d to go", work.already, len(samples), work.todo)
    _barrier()  # every rank has read the same state before any rank appends to it
    return work


class _ImageDataset(Dataset):
    """Decodes and preprocesses one image per item; runs in DataLoader workers. Each item's
    SourceSample is built from the index when it is asked for."""

    def __init__(self, samples: SampleIndex, positions: np.ndarray, image_processor, max_pixels: int) -> None:
        self.samples = samples
        self.positions = positions  # [M] int64 sample positions
        self.image_processor = image_processor
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = decode_image(read_image_bytes(self.samples[int(self.positions[i])]), self.max_pixels)
        except BadImage as e:
            return i, None, str(e)
        except OSError as e:  # e.g. a tar that vanished or a read error on a network disk
            return i, None, f"unreadable file: {e.strerror or e}"
        try:
            pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]  # [3, H, W]
        except Exception as e:  # a processor that cannot handle this image (e.g. 1x1) fails only this sample
            return i, None, f"preprocessing failed: {type(e).__name__}: {e}"
        return i, pixels, None


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict:
    ok = [(i, p) for i, p, _ in items if p is not None]
    return {
        "order": [i for i, _, _ in items],
        "ok": [i for i, _ in ok],
        "pixels": torch.stack([p for _, p in ok]) if ok else None,  # [B_ok, 3, H, W]
        "failed": {i: reason for i, p, reason in items if p is None},
    }


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _final_meta(inputs: list[Path], captioner: dict, skips: list[Skip]) -> dict:
    return {
        "format": FORMAT,
        "version": 1,
        "captioner": captioner,
        "transformers_version": version("transformers"),
        "inputs": [str(p) for p in inputs],
        "rows_not_indexed": len(skips),
    }


def caption_inputs(inputs: list[Path], captioner: Captioner, opts: CaptionOptions) -> CaptionReport:
    """Caption this rank's share of the samples not captioned yet; rank 0 then merges the sidecar.

    Call it on every rank of an initialised process group (or in a single process). Raises
    SidecarError when earlier entries were made with other settings or for other inputs, and
    when the merge finds a gap or a duplicate.
    """
    rank, world = get_rank(), get_world_size()
    sidecar = opts.output
    settings = captioner.describe()
    work = start_work(inputs, opts, settings, rank, world)
    samples, mine = work.samples, work.mine

    start = time.perf_counter()
    captioned = failed = 0
    if len(mine):
        header = {"format": FORMAT, "part": rank, "captioner": settings}
        captioned, failed = _caption_slice(
            samples, mine, captioner, opts, part_path(sidecar, rank), header, rank, world
        )
    seconds = time.perf_counter() - start
    logger.info(
        "rank %d/%d: %d captioned, %d failed in %.1f s (%.1f images/s)",
        rank,
        world,
        captioned,
        failed,
        seconds,
        (captioned + failed) / max(seconds, 1e-9),
    )
    _barrier()  # all parts complete before the merge reads them
    merged = None
    if rank == 0:
        merged = merge(sidecar, SampleKeys(samples), _final_meta(inputs, settings, work.skips))
    return CaptionReport(len(samples), work.already, captioned, failed, seconds, merged)


def _caption_slice(
    samples: SampleIndex,
    mine: np.ndarray,
    captioner: Captioner,
    opts: CaptionOptions,
    part: Path,
    header: dict,
    rank: int,
    world: int,
) -> tuple[int, int]:
    from tqdm import tqdm

    loader = DataLoader(
        _ImageDataset(samples, mine, captioner.image_processor, opts.max_pixels),
        batch_size=opts.batch_size,
        num_workers=opts.workers,
        collate_fn=_collate,
        pin_memory=captioner.device.type == "cuda",
    )
    bar = tqdm(total=len(mine), unit="img", desc=f"caption rank {rank}/{world}", disable=not opts.progress or rank != 0)
    captioned = failed = 0
    with PartWriter(part, header) as writer, bar:
        for batch in loader:
            entries: dict[int, CaptionEntry] = {}
            texts = captioner.caption(batch["pixels"]) if batch["ok"] else []
            rows = samples.physical(mine[np.asarray(batch["order"], np.int64)])
            keys, paths = samples.strings["key"].take(rows), samples.strings["path"].take(rows)
            where = {i: (key, path) for i, key, path in zip(batch["order"], keys, paths, strict=True)}
            for i, text in zip(batch["ok"], texts, strict=True):
                reason = None if text else "empty caption: the model generated no text"
                entries[i] = CaptionEntry(where[i][0], text or None, where[i][1], reason)
            for i, reason in batch["failed"].items():
                entries[i] = CaptionEntry(where[i][0], None, where[i][1], reason)
            writer.write([entries[i] for i in batch["order"]])
            n_failed = sum(e.caption is None for e in entries.values())
            captioned += len(entries) - n_failed
            failed += n_failed
            bar.update(len(entries))
            bar.set_postfix(failed=failed, refresh=False)
    return captioned, failed


def merge_parts(inputs: list[Path], opts: CaptionOptions) -> MergeReport:
    """Merge the part files of a finished run without loading a model (e.g. rank 0 died before its merge)."""
    refuse_inputs(inputs, opts)
    samples, skips = index_for_captioning(inputs, opts)
    metas, _ = load_existing(opts.output, values=False)
    if not metas:
        raise SidecarError(f"nothing to merge: neither {opts.output} nor its part files exist")
    first = metas[0]["meta"] or {}
    if "captioner" not in first:
        raise SidecarError(f"{metas[0]['file']} has no captioner header; it was not written by tools/caption.py")
    check_settings(metas, first["captioner"])
    return merge(opts.output, SampleKeys(samples), _final_meta(inputs, first["captioner"], skips))
