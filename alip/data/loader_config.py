"""Settings shared by the DALI loader (alip.data.dali) and the PyTorch fallback (alip.data.torch_loader).

Both loaders take the same `LoaderConfig` and yield the same batches, so a run can switch between
them without touching the recipe. This module imports neither DALI nor torchvision: the trainer
reads its configuration before it knows which loader it will build.

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
  yields in the epoch, see alip.data.dali). Parts are disjoint, so no batch and no global batch
  holds two copies of a record; the fill rows are records this epoch has already trained on once
  (fewer than B per rank per epoch). `samples_seen` counts them, as it counts "pad"'s copies: they
  are trained rows. Needs every rank's part to hold at least one batch (`steps_per_epoch` refuses
  it otherwise: the fill rows would then be records of the same batch).
- "pad" (DALI's `pad_last_batch=True`, the release's at c507915): every rank takes ceil(ceil(N / W) / B)
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
from dataclasses import dataclass
from pathlib import Path

import torch

from alip.data import schema
from alip.data.recordio import RecordIOError, ShardCheck, check_shard, quick_check_shard
from alip.distributed import read_env

logger = logging.getLogger(__name__)

# What happens to the records of an epoch that do not fill a batch on every rank (module docstring).
LAST_BATCH_MODES = ("drop", "fill", "pad")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoaderConfig:
    """How to turn shards into batches. Values are validated on construction (ValueError).

    batch_size: samples per step on each rank (the global batch is batch_size * world size).
    image_size: side of the square output image.
    random_area, random_aspect_ratio: train-mode random crop: fraction of the image area and
        width/height ratio range (torchvision's `scale`/`ratio`, DALI's `random_area`/`random_aspect_ratio`).
    crop_attempts: draws of (area, ratio) before the random crop gives up and takes its fallback
        window: the whole image with its aspect ratio clamped into `random_aspect_ratio` (DALI
        places it at random, the torch loader centres it as torchvision does). DALI's
        `num_attempts`; the torch loader runs the same loop with this count. DALI's and
        torchvision's default is 10: with the default area and ratio ranges a 3:2 photo fits only
        about one draw in twelve, so 10 attempts fall back for about 4 in 10 of them (measured with
        DALI 2.4: 40% of 3:2, 41% of 2:3, 5.5% of 4:3 images), always with the largest window: no
        scale augmentation. 100 attempts fall back for about 1 in 7500. The release uses 100, so
        do we.
    flip_prob: probability of a horizontal flip in train mode.
    mean, std: per-channel normalisation on the [0, 1] scale (RGB order).
    shuffle: shuffle samples in train mode (eval mode never shuffles).
    shuffle_buffer: DALI's `initial_fill`, the size of the reader's shuffling buffer. DALI shuffles
        only within this buffer, which is why the converter shuffles the dataset before sharding.
    seed: base seed of the shuffling and of the augmentation; each rank derives its own from it.
    num_threads: DALI CPU worker threads per pipeline.
    num_workers: PyTorch DataLoader worker processes (0 = decode in the main process).
    prefetch: batches prepared ahead (DALI `prefetch_queue_depth`, DataLoader `prefetch_factor`).
    preflight: check every shard before reading it, cheaply (alip.data.recordio.quick_check_shard): the
        .rec's size and the .idx's record count against the meta JSON, the .idx parsed (offsets
        ordered, aligned, spaced, inside the file), the framing and label length of the first,
        middle and last record, the last record ending at the end of the file. One .idx read and
        three frame headers per shard: 0.06 s for 1M records in 100 shards, about 1 s for YFCC15M
        (extrapolated, benchmarks/scale.py).
        Switch off only for datasets already checked with `tools/inspect_rec.py --check`.
    full_check: check every record's framing instead (alip.data.recordio.check_shard, what
        `tools/inspect_rec.py --check` runs): reads one 8-byte frame header per record, i.e.
        15M small reads per rank for YFCC15M (about 30 s from the page cache, extrapolated in
        benchmarks/scale.py; far longer cold on a shared filesystem); it also sees a damaged
        frame header in the middle of a shard and a record split inside its IRHeader, which the
        default check sees only in its three sampled records. Run it once after copying the data
        (inspect_rec.py) rather than at every start.
    last_batch: "drop" (default), "fill" or "pad" (DALI's `pad_last_batch`): what happens to the
        records of an epoch that do not make a full batch on every rank; see the module docstring.
        "drop" and "fill" keep every global batch free of copies in both loaders. "fill" completes
        each rank's last batch with other records of its own part (the release config's choice: the
        release's DALI reader at 8657eef completes the last batch with other real samples, by reading
        on into the next epoch's part, `pad_last_batch=False`, which can take records that another
        rank reads in the same step, or, with one rank, the same batch: "fill" does not). "drop"
        keeps epochs and resume exact in both loaders (DALI's "fill" after a mid-epoch resume is
        close, not exact: alip.data.dali) and costs fewer than W * B records an epoch (under 0.03%
        of YFCC15M at W=8, B=512), other ones every epoch when shuffling; open_clip's training
        loaders drop the last batch too (`drop_last`). "pad" repeats a sample within a batch and
        warns so.
    deep_check: also run the deep check at start (`schema.deep_check_shard`: checksums against the meta
        JSON, every label, every image decoded). Reads and decodes the whole dataset, on every
        rank: for small datasets, or once after copying; `tools/inspect_rec.py --check --deep`
        does the same in parallel, outside training.
    """

    batch_size: int
    image_size: int = 224
    random_area: tuple[float, float] = (0.7, 1.0)
    random_aspect_ratio: tuple[float, float] = (0.8, 1.25)
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    shuffle: bool = True
    shuffle_buffer: int = 4096
    seed: int = 0
    num_threads: int = 4
    num_workers: int = 4
    prefetch: int = 2
    preflight: bool = True
    full_check: bool = False
    deep_check: bool = False
    crop_attempts: int = 100
    last_batch: str = "drop"

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


def _deep_checked(info: schema.ShardInfo, slots: schema.TextSlots) -> ShardCheck:
    found = schema.deep_check_shard(info, keep=1, slots=slots)
    if found.num_problems:
        raise RecordIOError(
            f"deep check: {found.num_problems} problem(s) in {found.shard.rec_path}, the first: "
            f"{found.problems[0]}; {schema.DEEP_CHECK_HINT}"
        )
    return found.shard


def prepare_shards(
    spec: str | Path | list[str | Path], preflight: bool = True, deep: bool = False, full: bool = False
) -> list[ShardCheck]:
    """`prepare_dataset` without the texts (every caller that reads K = 1 labels only)."""
    return prepare_dataset(spec, preflight, deep, full)[0]


def prepare_dataset(
    spec: str | Path | list[str | Path], preflight: bool = True, deep: bool = False, full: bool = False
) -> tuple[list[ShardCheck], schema.TextSlots]:
    """Resolve `spec` (see schema.resolve_dataset) and check every shard before a loader trusts it.

    Returns the checked shards and the texts of their labels (the meta JSON's "texts", else the
    label length of the records), on which all shards must agree.
    With `preflight`, each shard goes through `quick_check_shard` (sizes and record counts against
    the meta JSON, the .idx against the .rec's size, three records' framing and label length),
    so a bad shard fails here with the file named instead of inside a DALI worker thread. `full`
    runs `check_shard` instead (every record's framing), `deep` runs `schema.deep_check_shard`
    (the full check plus checksums, every label, every image decoded: it reads everything).
    Shards without records are dropped (DALI's RecordIO index cannot represent an empty file
    between two others). Raises FileNotFoundError / ValueError / RecordIOError.
    """
    resolved = schema.resolve_dataset(spec)
    slots = schema.agreed_slots(resolved)
    shards = []
    for info, named in resolved:
        try:
            checked = _check_one(info, slots, preflight, deep, full)
        except RecordIOError as e:
            if named is None or "floats, expected" not in str(e):
                raise
            # a label length that disagrees with the meta JSON: say what the meta JSON promised
            raise RecordIOError(f"{e}: the meta JSON names {len(slots.names)} texts {list(slots.names)}") from None
        if checked.num_records == 0:
            logger.warning("skipping empty shard %s", checked.rec_path)
            continue
        shards.append(checked)
    if not shards:
        raise RecordIOError(f"no records in the shards of {spec}")
    return shards, slots


def _check_one(info: schema.ShardInfo, slots: schema.TextSlots, preflight: bool, deep: bool, full: bool) -> ShardCheck:
    length = slots.label_length
    if deep:
        return _deep_checked(info, slots)
    if full:
        return check_shard(info.rec, info.idx, label_length=length, expected_records=info.records)
    if preflight:
        return quick_check_shard(info.rec, info.idx, length, expected_records=info.records, expected_bytes=info.bytes)
    # Only the record count, from the .idx: the cheapest thing a loader cannot do without.
    with open(info.idx, encoding="ascii") as f:
        count = sum(1 for line in f if line.strip())
    return ShardCheck(Path(info.rec), Path(info.idx), count, Path(info.rec).stat().st_size)


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Where a loader yields batches: default `cuda:<local rank>` when CUDA is available, else the CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", read_env().local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"the loaders yield on 'cpu' or 'cuda' devices, got {device}")
    return device


def place_loader(
    spec: str | Path | list[str | Path],
    config: LoaderConfig,
    rank: int | None,
    world_size: int | None,
    device: str | torch.device | None,
) -> tuple[int, int, torch.device, list[ShardCheck], schema.TextSlots]:
    """What both loaders settle first: (rank, world size, device, preflighted shards, their texts).

    rank and world size default to the torch.distributed process group (0 and 1 without one).
    """
    from alip.distributed import get_rank, get_world_size

    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    shards, slots = prepare_dataset(spec, preflight=config.preflight, deep=config.deep_check, full=config.full_check)
    return rank, world_size, resolve_device(device), shards, slots


def check_loader_state(state: dict, kind: str, version: int, expected: dict, steps: int) -> None:
    """Refuse a loader state written by another kind of loader or for another sharding (ValueError)."""
    if state.get("kind") != kind or state.get("version") != version:
        raise ValueError(
            f"not a {kind} state v{version} (kind={state.get('kind')!r}, version={state.get('version')!r})"
        )
    wrong = [f"{k}={state.get(k)} (this loader: {v})" for k, v in expected.items() if state.get(k) != v]
    if wrong:
        raise ValueError(
            f"{kind} state does not fit this loader: " + ", ".join(wrong) + ". Restore each rank from its "
            "own state, with the same world size, batch size and shards."
        )
    if not 0 <= state.get("step", -1) <= steps:
        raise ValueError(f"state step {state.get('step')} outside 0..{steps}")
