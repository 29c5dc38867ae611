"""The loader contract: what every training and eval loader is, does and keeps, written once.

`DaliLoader` and `TorchLoader` are both a `RecordLoader`. Built over shards with a `LoaderConfig`,
one iterates it per epoch and gets batches of the one batch contract (DESIGN.md section 6),

    {"image": float32 [B, 3, H, W], "text": int64 [B, 77], "caption": int64 [B, 77]}

the caption [B, K, 77] for records with K > 1 caption slots (`schema.TextSlots`, from the meta JSON),
on the loader's device. Iterating runs the rest of the current epoch (all of it unless restored
mid-epoch); `len(loader)` is the number of steps per epoch, equal on every rank (alip.data.loaders.config
says how an epoch is cut). Its state (`state_dict`) is plain ints and strings, per rank.

What both settle first lives here: rank and world size, the device, the preflighted shards and their
texts, the epoch mode, the counters and the fingerprint of the records a state belongs to.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alip.data.format import position
from alip.data.loaders.config import LoaderConfig, dropped_per_epoch
from alip.data.loaders.preflight import prepare_dataset
from alip.distributed import get_rank, get_world_size, read_env

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


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


class RecordLoader(abc.ABC):
    """A loader over ALIP shards: one epoch per iteration, equal steps on every rank, resumable.

    shards: meta JSON, directory with one meta JSON, .rec glob, single .rec, or a list of these
        (see `alip.data.format.schema.resolve_shards`). Every shard is preflighted
        (alip.data.loaders.preflight) unless `config.preflight` is False.
    train: random crop + flip + shuffling (per `config`); False: resize shorter side + centre crop,
        in file order.
    rank, world_size: default to the torch.distributed process group (0 and 1 without one).
    device: where batches are yielded; default `cuda:<local rank>` when CUDA is available, else the CPU.
    """

    NAME: str  # for the log: "DALI", "torch"
    STATE_KIND: str  # names the loader in its state: a state is only restored by its own kind
    STATE_VERSION: int
    steps_per_epoch: int  # set by each loader: it knows how its reader delivers the epoch

    def __init__(
        self,
        shards: str | Path | list[str | Path],
        config: LoaderConfig,
        train: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.train = train
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        self.shards, self.slots = prepare_dataset(
            shards, preflight=config.preflight, deep=config.deep_check, full=config.full_check
        )
        self.device = resolve_device(device)
        self.num_records = sum(s.num_records for s in self.shards)
        self.mode = config.epoch_mode(train)
        self.dropped_per_epoch = dropped_per_epoch(self.num_records, config.batch_size, self.world_size, self.mode)
        self.epoch = 0
        self.step = 0  # batches of `epoch` already yielded
        self.shards_digest = position.shards_digest(self.shards)
        self._open()
        logger.info(
            "%s %s loader: %d records in %d shards, rank %d/%d, %d steps of %d per epoch (last batch: %s, "
            "%d records dropped per epoch), %s",
            self.NAME,
            "train" if train else "eval",
            self.num_records,
            len(self.shards),
            self.rank,
            self.world_size,
            self.steps_per_epoch,
            config.batch_size,
            self.mode,
            self.dropped_per_epoch,
            self._reading(),
        )

    def _reading(self) -> str:
        """How this loader reads, for its start-up line ("decoding on GPU", "4 workers")."""
        return ""

    @abc.abstractmethod
    def _open(self) -> None:
        """Build this loader's reader over `self.shards` and set `steps_per_epoch` (the end of __init__)."""

    def __len__(self) -> int:
        return self.steps_per_epoch

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch, then epoch += 1 and step = 0."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Plain int/str state of this rank's loader (safe for `torch.load(weights_only=True)`)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the loader that wrote `state` stood. Raises ValueError on a mismatch."""

    @abc.abstractmethod
    def continue_epoch(self, states: list[dict[str, Any]]) -> str:
        """Continue from the states of a run on another world size; returns what happened, in words."""

    @abc.abstractmethod
    def restart_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (a resume onto other ranks or shards)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release threads, worker processes, file handles and temporary files."""

    def same_data(self, state: dict[str, Any]) -> bool:
        """Whether `state` (any rank's, any world size) was written for these records. A state from before
        the digest existed is judged by its record count."""
        digest = state.get("shards_digest", self.shards_digest)
        return state.get("num_records") == self.num_records and digest == self.shards_digest

    def check_state(self, state: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
        """`state` as this loader can restore it, else ValueError: written by this kind of loader, with
        the values in `expected` (the sharding it was written for), at a step inside the epoch, for these
        records."""
        # A state written before `last_batch` existed is a "pad" one: its steps cut the epoch otherwise.
        state = {"last_batch": "pad", **state}
        kind, version = self.STATE_KIND, self.STATE_VERSION
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
        if not 0 <= state.get("step", -1) <= self.steps_per_epoch:
            raise ValueError(f"state step {state.get('step')} outside 0..{self.steps_per_epoch}")
        if not self.same_data(state):
            raise ValueError(f"{kind} state was written for other shards (file names or record counts differ)")
        return state
