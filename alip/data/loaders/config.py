"""How the loaders turn shards into batches: their settings, and how an epoch is cut.

Both loaders (alip.data.loaders.dali, alip.data.loaders.torch_loader) take the same `LoaderConfig`
and yield the same batches, so a run can switch between them without touching the recipe. This
module imports neither torch nor DALI: the run config (alip.config) builds on `LoaderSettings`.

The defaults are the original ALIP training augmentation: a random crop covering 70-100% of the
image with aspect ratio 0.8-1.25 (100 attempts, as the release), resized to 224x224, a horizontal
flip with probability 0.5 and CLIP's mean/std normalisation.

How an epoch is cut into batches (both loaders alike). The records are split into `world_size`
contiguous parts as DALI's reader splits them (`rank_part`), and rank r reads part (r + epoch) % W
(DALI moves each rank on to the next part after every epoch). A part rarely divides into whole
batches, and parts can differ by one record; `last_batch` says what happens to the rest:

- "drop" (our default): every rank takes `N // (W * B)` full batches of its part; the records left
  over (fewer than W * B per epoch, `dropped_per_epoch`) are not read this epoch. Every batch, and
  every step's global batch over all ranks, holds distinct records, and the trainer's
  `samples_seen` (global batch per step) counts real, distinct samples.
- "fill" (the release config's): every rank takes as many full batches as "pad",
  ceil(ceil(N / W) / B), and the positions "pad" fills with copies of the part's last sample hold
  other real records of the same rank's part in the same epoch: the first ones of the part's order
  (the torch loader reads them again by index; DALI's loader keeps them from the first batch it
  yields in the epoch, see alip.data.loaders.dali). Parts are disjoint, so no batch and no global batch
  holds two copies of a record; the fill rows are records this epoch has already trained on once
  (fewer than B per rank per epoch). `samples_seen` counts them, as it counts "pad"'s copies: they
  are trained rows. Needs every rank's part to hold at least one batch (`steps_per_epoch` refuses
  it otherwise: the fill rows would then be records of the same batch).
- "pad" (DALI's `pad_last_batch=True`, the release's first reader's): every rank takes ceil(ceil(N / W) / B)
  batches; a part that does not fill them is padded by repeating its last sample (fewer than W * B
  copies per epoch, but up to a whole batch of one sample where parts differ by one record). The
  copies sit in one batch, where a contrastive loss treats them as negatives of each other;
  `samples_seen` counts them as samples. Kept so that runs started with it resume unchanged; it logs
  a warning at loader start.

Eval mode (train=False) never drops a record: "pad" pads as above, "drop" and "fill" yield the last
batches short (even empty on a rank whose part ran out), so that every record comes exactly once
and every rank still takes the same number of steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Literal

logger = logging.getLogger(__name__)

# What happens to the records of an epoch that do not fill a batch on every rank (module docstring).
LAST_BATCH_MODES = ("drop", "fill", "pad")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(kw_only=True)
class LoaderSettings:
    """The loader settings a run config sets (its `data` section, alip.config.DataConfig, is one). Each
    is said here once; `LoaderConfig` adds what the trainer decides (batch size, seed)."""

    image_size: int = 224  # side of the square output image
    # Train-mode random crop: the fraction of the image area and the width/height ratio drawn
    # (torchvision's scale/ratio, DALI's random_area/random_aspect_ratio); the release's ranges.
    random_area: tuple[float, float] = (0.7, 1.0)
    random_aspect_ratio: tuple[float, float] = (0.8, 1.25)
    # Draws of (area, ratio) before the crop gives up and takes its fallback window: the whole image,
    # its aspect ratio clamped into the range (DALI places it at random, the torch loader centres it
    # as torchvision does), i.e. no scale augmentation. DALI's `num_attempts`; the torch loader runs
    # the same loop. With these ranges a 3:2 photo fits about one draw in twelve, so DALI's and
    # torchvision's default of 10 falls back for a large share of photos (README, release vs
    # default); the release uses 100, so do we.
    crop_attempts: int = 100
    flip_prob: float = 0.5  # probability of a horizontal flip in train mode
    # The records of an epoch that do not fill a batch on every rank: "drop", "fill" (the release
    # config's) or "pad" (DALI's pad_last_batch; warns at start). The module docstring says what each does.
    last_batch: Literal["drop", "fill", "pad"] = "drop"
    # DALI's `initial_fill`: the reader shuffles only within a buffer of this many records, which is
    # why data2rec shuffles the whole dataset before sharding.
    shuffle_buffer: int = 4096
    num_threads: int = 4  # DALI CPU threads per rank
    num_workers: int = 4  # torch loader worker processes per rank (0: decode in the main process)
    # The start-up check of every shard (alip.data.loaders.preflight): by default the quick one
    # (sizes and counts against the meta JSON and the .idx, the framing of three records per shard).
    # `full_check` walks every record's frame header instead (`tools/inspect_rec.py --check`): one
    # small read per record, long on a cold shared filesystem (benchmarks/scale.py), so run it once
    # after copying the data rather than at every start. `deep_check` also verifies checksums and
    # decodes every label and image (`tools/inspect_rec.py --check --deep`): reads every byte.
    full_check: bool = False
    deep_check: bool = False


@dataclass(kw_only=True)
class LoaderConfig(LoaderSettings):
    """`LoaderSettings` plus what the trainer decides; validated on construction (ValueError).

    batch_size: samples per step on each rank (the global batch is batch_size * world size).
    mean, std: per-channel normalisation on the [0, 1] scale (RGB order).
    shuffle: shuffle samples in train mode (eval mode never shuffles).
    seed: base seed of the shuffling and of the augmentation; each rank derives its own from it.
    prefetch: batches prepared ahead (DALI `prefetch_queue_depth`, DataLoader `prefetch_factor`).
    preflight: run the quick start-up check (above); switch it off only for data checked already.
    """

    batch_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    shuffle: bool = True
    seed: int = 0
    prefetch: int = 2
    preflight: bool = True

    @classmethod
    def from_settings(cls, settings: LoaderSettings, **decided) -> LoaderConfig:
        """A LoaderConfig with every field of `settings` (a run config's `data`, say) and `decided`."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(LoaderSettings)}, **decided)

    def __post_init__(self) -> None:
        # Tuples may arrive as lists from YAML/JSON; normalise so equality and hashing behave.
        self.random_area = _pair("random_area", self.random_area)
        self.random_aspect_ratio = _pair("random_aspect_ratio", self.random_aspect_ratio)
        self.mean = _triple("mean", self.mean)
        self.std = _triple("std", self.std)
        for name in ("batch_size", "image_size", "shuffle_buffer", "num_threads", "prefetch", "crop_attempts"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        lo, hi = self.random_area
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"random_area must satisfy 0 < low <= high <= 1, got {self.random_area}")
        lo, hi = self.random_aspect_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"random_aspect_ratio must satisfy 0 < low <= high, got {self.random_aspect_ratio}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if any(s <= 0.0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.last_batch not in LAST_BATCH_MODES:
            raise ValueError(f"last_batch must be one of {', '.join(LAST_BATCH_MODES)}, got {self.last_batch!r}")

    def epoch_mode(self, train: bool) -> str:
        """How a loader in train or eval mode cuts the epoch: "drop", "fill", "pad" or "trim" (eval
        never drops nor fills: every record exactly once). Called by each loader at its start."""
        if self.last_batch != "pad" and not train:
            return "trim"
        if self.last_batch == "drop" and not self.shuffle:
            # In file order every part ends with the same records: those dropped are never read.
            logger.warning("last_batch=drop without shuffling: the records dropped are the same every epoch")
        if self.last_batch == "pad":
            warn_pad_once()
        return self.last_batch

    @property
    def mean_255(self) -> list[float]:
        """`mean` on the 0-255 scale, as DALI's crop_mirror_normalize applies it to uint8 pixels."""
        return [255.0 * m for m in self.mean]

    @property
    def std_255(self) -> list[float]:
        return [255.0 * s for s in self.std]


_pad_warned = False


def warn_pad_once() -> None:
    """Say once per process that last_batch=pad repeats samples within a batch."""
    global _pad_warned
    if not _pad_warned:
        _pad_warned = True
        logger.warning(
            "data.last_batch=pad repeats samples within a batch: each rank's last batch of an epoch is filled "
            "with copies of its last sample (negatives of each other in the loss); data.last_batch=fill fills "
            "it with other real records instead"
        )


def _pair(name: str, value: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return lo, hi


def _triple(name: str, value: object) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers (R, G, B), got {value!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be three finite numbers (R, G, B), got {value!r}")
    return values  # type: ignore[return-value]


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def rank_part(num_records: int, world_size: int, part: int) -> tuple[int, int]:
    """[begin, end) of part `part` of the records, as DALI's reader splits them across `world_size`."""
    return num_records * part // world_size, num_records * (part + 1) // world_size


def steps_per_epoch(num_records: int, batch_size: int, world_size: int, mode: str) -> int:
    """Steps every rank takes per epoch, the same on every rank (else DDP waits forever).

    "drop": full batches only, N // (W * B), which is also floor(floor(N / W) / B): the smallest
    part decides. "fill", "pad" and "trim": ceil(ceil(N / W) / B), the largest part decides (what
    DALI's reader does with `pad_last_batch=True`). Raises ValueError when "drop" leaves no step at
    all, and when "fill" finds a part smaller than one batch (`fill_rows`).
    """
    if num_records < 1 or batch_size < 1 or world_size < 1:
        raise ValueError(f"need positive sizes, got {num_records=}, {batch_size=}, {world_size=}")
    if mode == "drop":
        steps = num_records // (world_size * batch_size)
        if steps == 0:
            raise ValueError(
                f"{num_records} records do not fill one global batch of {world_size} rank(s) x {batch_size}: "
                "use a smaller batch, or last_batch=pad to repeat records"
            )
        return steps
    if mode == "fill" and num_records // world_size < batch_size:
        raise ValueError(
            f"data.last_batch=fill needs every rank's part of the {num_records} records to hold a whole batch, "
            f"but the smallest of {world_size} parts holds {num_records // world_size} records, fewer than the "
            f"per-rank batch of {batch_size}: the fill rows would repeat records of the same batch; use a "
            "smaller batch, or data.last_batch=pad"
        )
    return math.ceil(math.ceil(num_records / world_size) / batch_size)


def fill_rows(num_records: int, batch_size: int, world_size: int, part: int) -> int:
    """Rows of the last batch of a rank reading `part` that are not its part's own tail: "pad" repeats
    the part's last sample in them, "fill" puts the part's first records there (0 to B).

    With every part at least one batch long (what `steps_per_epoch` asks of "fill"), these first
    records sit in an earlier batch than the last one, so the last batch holds no record twice."""
    begin, end = rank_part(num_records, world_size, part)
    return steps_per_epoch(num_records, batch_size, world_size, "pad") * batch_size - (end - begin)


def dropped_per_epoch(num_records: int, batch_size: int, world_size: int, mode: str) -> int:
    """Records not read in an epoch, over all ranks: N - W * steps * B with "drop", else 0."""
    if mode != "drop":
        return 0
    return num_records - world_size * batch_size * steps_per_epoch(num_records, batch_size, world_size, mode)


def batch_rows(num_records: int, batch_size: int, world_size: int, part: int, step: int, mode: str) -> int:
    """Real samples in batch `step` of a rank reading `part`: `batch_size`, but fewer (even 0) with "trim"."""
    if mode != "trim":
        return batch_size
    begin, end = rank_part(num_records, world_size, part)
    return min(batch_size, max(0, end - begin - step * batch_size))
