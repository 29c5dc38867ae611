"""PyTorch DataLoader fallback over ALIP RecordIO shards: PIL decoding, torchvision transforms.

A RecordLoader (alip.data.loaders.base: the batch contract, the epoch semantics, the state) like
alip.data.loaders.dali.DaliLoader. It is what runs where DALI is not installed, and the
baseline for benchmarks/loader_throughput.py.

Batches are cut from the epoch as DALI cuts them (see alip.data.loaders.config: the same parts per
rank, moving on by one part per epoch, the same `last_batch` modes and the same step counts), and
the random crop makes `config.crop_attempts` attempts as DALI's does (torchvision's
RandomResizedCrop makes 10). The one difference by design: the shuffle is a full permutation per
epoch, drawn before the records are split into parts (DALI shuffles within a buffer of each part).
Augmentation is seeded per sample position, so it does not depend on the number of workers and a
mid-epoch resume (which skips the batches already seen) reproduces the same samples and the same
augmentations. The state also records, in positions of the epoch's global order, what each rank
has read (alip.data.format.position): on another world size, `continue_epoch` continues the epoch over
the records no rank had read, cut into parts and batches over the new ranks.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from alip.data.format import position, schema
from alip.data.format.images import BadImage, open_image
from alip.data.format.recordio import RecordIOError, RecordIOReader, ShardCheck, read_idx_arrays
from alip.data.loaders.base import RecordLoader
from alip.data.loaders.config import LoaderConfig, rank_part, steps_per_epoch

logger = logging.getLogger(__name__)

STATE_KIND = "alip-torch-loader"
STATE_VERSION = 1


def crop_window(
    height: int, width: int, area: tuple[float, float], ratio: tuple[float, float], attempts: int
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop of `area` (fraction of the image) and width/height `ratio`.

    Up to `attempts` draws of (area, log-uniform ratio); the first window that fits is placed
    uniformly. When none fits, the fallback window: the whole image with its aspect ratio clamped
    into `ratio`, centred. Draws from torch's global generator in torchvision's order, so with 10
    attempts this is torchvision's RandomResizedCrop.get_params, draw for draw.
    """
    log_lo, log_hi = torch.log(torch.tensor(ratio)).tolist()  # float32 logs, as torchvision's
    for _ in range(attempts):
        target = height * width * torch.empty(1).uniform_(area[0], area[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi)).item()
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:  # too tall: full width, height cut to the narrowest allowed ratio
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:  # too wide: full height
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomAreaCrop(T.RandomResizedCrop):
    """RandomResizedCrop with `attempts` draws before the fallback window (torchvision: always 10)."""

    def __init__(self, size: int, area: tuple[float, float], ratio: tuple[float, float], attempts: int) -> None:
        super().__init__(size, scale=area, ratio=ratio)
        self.attempts = attempts

    def forward(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        _, height, width = TF.get_dimensions(img)
        top, left, h, w = crop_window(height, width, self.scale, self.ratio, self.attempts)
        return TF.resized_crop(img, top, left, h, w, self.size, self.interpolation, antialias=self.antialias)


def build_transform(config: LoaderConfig, train: bool) -> T.Compose:
    """PIL RGB image -> normalised float32 [3, size, size]; the torchvision twin of the DALI pipeline."""
    size = config.image_size
    if train:
        geometry = [
            RandomAreaCrop(size, config.random_area, config.random_aspect_ratio, config.crop_attempts),
            T.RandomHorizontalFlip(config.flip_prob),
        ]
    else:
        geometry = [T.Resize(size), T.CenterCrop(size)]  # Resize(int) scales the shorter side
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(config.mean, config.std)])


class RecordDataset(Dataset):
    """Map-style dataset over every record of every shard, in shard order.

    Items are addressed as `(index, aug_seed)`: the sampler decides both, so an augmentation is a
    function of the sample's position in the epoch, not of which worker draws it. `aug_seed < 0`
    means no seeding (eval transforms are deterministic anyway).

    File handles are opened lazily and per process: a handle opened before the DataLoader forks
    would share its file offset between workers, and their seeks would race.
    """

    def __init__(
        self, shards: list[ShardCheck], config: LoaderConfig | None, train: bool, slots: schema.TextSlots | None = None
    ) -> None:
        """slots: the texts every label must hold (prepare_dataset's); None: each record's own (77 x (1 + K))."""
        self.shards = shards
        self.slots = slots
        # config None: no transform; callers read decoded records with `read` (alip score does)
        self.transform = build_transform(config, train) if config is not None else None
        # [N] shard number and byte offset of every record, from the .idx files only (parsed by NumPy:
        # this runs at every start, over all 15M records of YFCC15M; see benchmarks/scale.py).
        offsets = [read_idx_arrays(shard.idx_path)[1] for shard in shards]
        self._shard_ids = np.repeat(np.arange(len(shards), dtype=np.int32), [len(o) for o in offsets])
        self._offsets = np.concatenate([np.empty(0, np.int64), *offsets])
        self._readers: dict[int, RecordIOReader] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def _reader(self, shard_id: int) -> RecordIOReader:
        if self._pid != os.getpid():
            self._readers, self._pid = {}, os.getpid()  # never use a parent's handles
        reader = self._readers.get(shard_id)
        if reader is None:
            shard = self.shards[shard_id]
            reader = self._readers[shard_id] = RecordIOReader(shard.rec_path, shard.idx_path)
        return reader

    def shard_of(self, index: int) -> int:
        """Position in `shards` of the shard holding record `index`."""
        return int(self._shard_ids[index])

    def read(self, index: int) -> tuple[int, np.ndarray, np.ndarray, Image.Image]:
        """Record `index` as (key, raw-text tokens [77], caption tokens [77] or [K, 77], RGB image).

        A record the preflight cannot see is damaged (a label value that is not a token id, an
        image that does not decode) raises RecordIOError naming the shard and the record key.
        """
        shard_id, offset = int(self._shard_ids[index]), int(self._offsets[index])
        rec_path = self.shards[shard_id].rec_path
        record = self._reader(shard_id).read_at(offset, what=f"record {index}")
        try:
            key, raw, caption, jpeg = schema.parse_record(record, self.slots)
            image = open_image(jpeg).convert("RGB")  # grayscale and CMYK JPEGs too
        except RecordIOError as e:
            raise RecordIOError(f"{rec_path}: {e}; {schema.DEEP_CHECK_HINT}") from None
        except BadImage as e:
            raise RecordIOError(f"{rec_path}: record key {key}: {e}; {schema.DEEP_CHECK_HINT}") from None
        return key, raw, caption, image

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, aug_seed = item
        _, raw, caption, image = self.read(index)
        if aug_seed >= 0:
            # torchvision's random transforms draw from torch's global generator. Fork it so the
            # caller's random state (the trainer's, when num_workers=0) is left untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(aug_seed)
                pixels = self.transform(image)
        else:
            pixels = self.transform(image)
        return {
            "image": pixels,  # [3, H, W] float32
            "text": torch.from_numpy(raw),  # [77] int64
            "caption": torch.from_numpy(caption),  # [77] int64, [K, 77] with K caption slots
        }

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}


@contextmanager
def worker_errors() -> Iterator[None]:
    """Give a shard error raised in a DataLoader worker back its own one-line message.

    DataLoader re-raises a worker's exception as `type(message)`, with the worker's traceback
    inside the message; a user error must stay one clear line (`--debug` shows the chain).
    """
    try:
        yield
    except RecordIOError as e:
        text = str(e)
        if "\nOriginal Traceback" not in text:
            raise
        last = text.rstrip().splitlines()[-1]
        raise RecordIOError(last.partition(": ")[2] or last) from e


class EpochSampler(Sampler):
    """This rank's `(index, aug_seed)` items of one epoch, from a given step on.

    Every rank computes the same epoch order (a seeded permutation, or file order) and reads part
    (rank + epoch) % W of it, as DALI's reader splits and rotates its parts. `mode` (see
    LoaderConfig.epoch_mode) then makes `steps` batches of the part: "pad" repeats the part's last
    item up to `steps` full batches, "fill" appends the part's first items instead (other records,
    read again by index, with augmentation seeds of their own), "drop" keeps the first `steps` full
    batches, "trim" keeps the part as it is (TorchLoader ends the epoch with short or empty batches).

    `excluded` (intervals of positions in the epoch order, see alip.data.format.position): positions read
    before this partition began, by a run on another number of ranks. The epoch then continues over
    the other positions only, cut into parts and batches as above (a shorter epoch); with "fill",
    where the positions left do not give every rank a whole batch, that epoch has no step left (the
    fill rows would repeat records of the same batch): the fewer than W * B records left are not read.
    """

    def __init__(
        self,
        num_records: int,
        batch_size: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        seed: int,
        augment: bool,
        mode: str,
    ) -> None:
        self.num_records = num_records
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.mode = mode
        self.steps = steps_per_epoch(num_records, batch_size, world_size, mode)
        self.epoch = 0
        self.start_step = 0
        self.excluded: position.Intervals = []

    def set_position(self, epoch: int, step: int, excluded: position.Intervals | None = None) -> None:
        self.epoch, self.start_step, self.excluded = epoch, step, list(excluded or [])

    def positions(self) -> np.ndarray:
        """Positions of the epoch order that this epoch's partition reads: all, or those not excluded."""
        if not self.excluded:
            return np.arange(self.num_records)
        return position.remaining(self.num_records, self.excluded)

    def epoch_steps(self) -> int:
        """Steps of the current epoch: `steps`, fewer where positions are excluded (0: none fills a step)."""
        if not self.excluded:
            return self.steps
        count = len(self.positions())
        # "drop": no full global batch left; "fill": a part shorter than a batch (its fill rows would be
        # copies); "pad": a rank would have nothing to repeat (its part empty)
        if count < (self.world_size * self.batch_size if self.mode in ("drop", "fill") else self.world_size):
            return 0
        return steps_per_epoch(count, self.batch_size, self.world_size, self.mode)

    def _part(self) -> np.ndarray:
        """Positions (in the epoch order) of this rank's part of the current epoch."""
        part = (self.rank + self.epoch) % self.world_size
        if not self.excluded:  # without building all N positions: a checkpoint of YFCC15M asks for this too
            return np.arange(*rank_part(self.num_records, self.world_size, part))
        positions = self.positions()
        begin, end = rank_part(len(positions), self.world_size, part)
        return positions[begin:end]

    def epoch_items(self) -> tuple[np.ndarray, np.ndarray]:
        """(record indices, augmentation seeds) of this rank's whole current epoch, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_records)
        else:
            order = np.arange(self.num_records)
        mine = order[self._part()]
        per_rank = self.epoch_steps() * self.batch_size
        if self.mode == "pad" and len(mine):
            mine = np.concatenate([mine, np.full(per_rank - len(mine), mine[-1])])
        elif self.mode == "fill":
            # The part's first records, in this epoch's order: at least one batch before the last
            # (every part holds a whole batch), so no batch holds one twice; parts are disjoint.
            mine = np.concatenate([mine, mine[: per_rank - len(mine)]])
        elif self.mode == "drop":
            mine = mine[:per_rank]
        if self.augment:
            # One seed per position of every rank's stream: independent of the worker count, and the
            # same after a resume. A continued epoch (positions excluded) draws another stream.
            key = [self.seed, self.epoch, 1] if not self.excluded else [self.seed, self.epoch, 2, per_rank]
            rng = np.random.default_rng(key)
            seeds = rng.integers(0, 2**62, size=per_rank * self.world_size)[self.rank * per_rank :][: len(mine)]
        else:
            seeds = np.full(len(mine), -1, dtype=np.int64)
        return mine, seeds

    def seen(self, step: int) -> position.Intervals:
        """Positions of the epoch order this rank has read after `step` batches of the current partition
        (a part's padding or fill rows repeat records already counted; "drop" leaves the part's tail
        unread)."""
        part = self._part()  # sorted positions
        return position.to_intervals(part[: min(step * self.batch_size, len(part))])

    def __len__(self) -> int:
        total = len(self._part()) if self.mode == "trim" else self.epoch_steps() * self.batch_size
        return max(0, total - self.start_step * self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices, seeds = self.epoch_items()
        for i in range(self.start_step * self.batch_size, len(indices)):
            yield int(indices[i]), int(seeds[i])


class TorchLoader(RecordLoader):
    """The RecordLoader (alip.data.loaders.base) that reads with a PyTorch DataLoader (see module docstring)."""

    NAME = "torch"
    STATE_KIND = STATE_KIND
    STATE_VERSION = STATE_VERSION

    def _reading(self) -> str:
        return f"{self.config.num_workers} workers"

    def _open(self) -> None:
        config, train = self.config, self.train
        self.dataset = RecordDataset(self.shards, config, train, self.slots)
        self.sampler = EpochSampler(
            self.num_records,
            config.batch_size,
            self.rank,
            self.world_size,
            shuffle=train and config.shuffle,
            seed=config.seed,
            augment=train,
            mode=self.mode,
        )
        self.steps_per_epoch = self.sampler.steps
        self.excluded: position.Intervals = []  # positions of `epoch` read before this partition (a reshard)
        workers = config.num_workers
        self._loader = DataLoader(
            self.dataset,
            batch_sampler=BatchSampler(self.sampler, config.batch_size, drop_last=False),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            # Workers live across epochs; the sampler runs in this process, so its epoch still applies.
            persistent_workers=workers > 0,
            prefetch_factor=config.prefetch if workers > 0 else None,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch (all of it unless restored mid-epoch), then epoch += 1."""
        self.sampler.set_position(self.epoch, self.step, self.excluded)
        steps = self.sampler.epoch_steps()  # steps_per_epoch, fewer where the epoch continues a reshard
        with worker_errors():
            for batch in self._loader:
                self.step += 1
                yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        # "trim" (eval): a rank whose part ran out still takes every step, with empty batches.
        while self.step < steps:
            self.step += 1
            yield self._empty_batch()
        self.epoch += 1
        self.step = 0
        self.excluded = []

    def _empty_batch(self) -> dict[str, torch.Tensor]:
        size, tokens, k = self.config.image_size, schema.CONTEXT_LENGTH, self.slots.num_captions
        return {
            "image": torch.zeros(0, 3, size, size, device=self.device),  # [0, 3, H, W]
            "text": torch.zeros(0, tokens, dtype=torch.int64, device=self.device),  # [0, 77]
            # [0, 77], or [0, K, 77] with K caption slots
            "caption": torch.zeros(0, *((k,) if k > 1 else ()), tokens, dtype=torch.int64, device=self.device),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain int/str state (safe for `torch.load(weights_only=True)`).

        `epoch` and `step` place this rank exactly (same world size); `excluded` and `seen` say, in
        positions of the epoch's global order, what was read before this partition and what this rank
        has read since: the union over the ranks is the epoch's progress on any world size."""
        probe = copy.copy(self.sampler)  # the sampler may be mid-iteration: leave it as it is
        probe.set_position(self.epoch, self.step, self.excluded)
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.world_size,
            "batch_size": self.config.batch_size,
            "num_records": self.num_records,
            "seed": self.config.seed,
            "last_batch": self.mode,
            "excluded": [list(span) for span in self.excluded],
            "seen": probe.seen(self.step),
            "shards_digest": self.shards_digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at `state`'s epoch and step (the batches before it are skipped, not read)."""
        expected = {
            "world_size": self.world_size,
            "batch_size": self.config.batch_size,
            "num_records": self.num_records,
            "seed": self.config.seed,
            "last_batch": self.mode,
        }
        state = self.check_state(state, expected)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.excluded = [[int(a), int(b)] for a, b in state.get("excluded", [])]

    def epoch_progress(self, states: list[dict[str, Any]]) -> tuple[int, position.Intervals]:
        """(epoch, positions of its order read) of the run whose ranks wrote `states`, on any world size."""
        first = states[0]
        if first.get("kind") != STATE_KIND or first.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_KIND} state v{STATE_VERSION} (kind={first.get('kind')!r})")
        epoch = int(first["epoch"])
        if any(int(s["epoch"]) != epoch or s["step"] != first["step"] for s in states):
            raise ValueError("the ranks' loader states are at different positions")
        seen: list[position.Intervals] = []
        for rank, s in enumerate(states):
            if "seen" in s:
                seen.append(s["seen"])
            else:  # written before `seen` existed: the same sampler on the old world size says it
                old = EpochSampler(
                    self.num_records,
                    s["batch_size"],
                    rank,
                    len(states),
                    self.sampler.shuffle,
                    self.sampler.seed,
                    self.sampler.augment,
                    s.get("last_batch", "pad"),
                )
                old.set_position(epoch, 0, s.get("excluded"))
                seen.append(old.seen(int(s["step"])))
        return epoch, position.union(first.get("excluded", []), *seen)

    def continue_epoch(self, states: list[dict[str, Any]]) -> str:
        """Continue the epoch where the ranks that wrote `states` (another world size) stood, over the
        positions of its order none of them had read, in a new partition over this loader's ranks.
        Where those do not fill one more step, the next epoch starts. Returns what happened, in words."""
        if not all(self.same_data(s) for s in states):
            raise ValueError("the loader states were written for other shards")
        epoch, seen = self.epoch_progress(states)
        self.epoch, self.step, self.excluded = epoch, 0, seen
        self.sampler.set_position(epoch, 0, seen)
        read, left = position.covered(seen), self.num_records - position.covered(seen)
        steps = self.sampler.epoch_steps()
        if steps == 0:
            self.epoch, self.excluded = epoch + 1, []
            return f"epoch {epoch}: {read} of {self.num_records} records read, the {left} left fill no step: next epoch"
        said = f"epoch {epoch} continues over the {left} of {self.num_records} records not yet read: {steps} steps"
        if self.mode == "drop":
            said += f", {left - steps * self.world_size * self.config.batch_size} records left out (last_batch=drop)"
        return said

    def restart_epoch(self, epoch: int) -> None:
        """Start `epoch` afresh, in its own order (a resume onto changed shards)."""
        self.epoch, self.step, self.excluded = epoch, 0, []

    def close(self) -> None:
        """Stop the worker processes and close this process's file handles."""
        self._loader = None  # type: ignore[assignment]
        self.dataset.close()
