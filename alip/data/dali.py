"""NVIDIA DALI training and eval loaders over ALIP RecordIO shards.

`DaliLoader` reads the shards with `fn.readers.mxnet`, decodes on the GPU (`device="mixed"`) when
CUDA is available and on the CPU otherwise, augments, and yields

    {"image": float32 [B, 3, H, W], "text": int64 [B, 77], "caption": int64 [B, 77]}

on the training device. Iterating the loader runs ONE epoch, starting where the loader stands (so
a loader restored mid-epoch finishes that epoch first); `len(loader)` is the number of steps per
epoch, equal on every rank.

Sharding. Rank r of W reads DALI shard r of the concatenated records; with `pad_last_batch` each
rank's share is padded to ceil(N / W) samples and then to whole batches by repeating its last
sample, so every rank takes the same number of steps. DALI moves each rank on to the next shard
after every epoch (no `stick_to_shard`), so over W epochs every rank sees every record.

Resuming. `state_dict()` holds DALI's pipeline checkpoint (reader position, shuffle buffer and the
random state of every augmentation) plus the epoch and step: a loader restored from it yields
exactly the batches the original would have. The state is per rank: every rank must save and
restore its own.

This is the only module that imports DALI.
"""

from __future__ import annotations

import base64
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from alip.data import schema
from alip.data.loader_config import LoaderConfig, check_loader_state, place_loader, steps_per_epoch
from alip.data.recordio import ShardCheck, read_idx

logger = logging.getLogger(__name__)

READER_NAME = "shards"
STATE_KIND = "alip-dali-loader"
STATE_VERSION = 1


def combined_index(shards: list[ShardCheck], out_path: Path) -> Path:
    """Write one .idx for several .rec files, as DALI's RecordIO reader needs.

    DALI accepts a single index for all files and reads its offsets as positions in the
    concatenation of the .rec files (in `path` order), so each shard's offsets are shifted by the
    sizes of the shards before it. DALI ignores the key column; a running count keeps it unique.
    """
    base, count = 0, 0
    with open(out_path, "w", encoding="ascii") as f:
        for shard in shards:
            for _, offset in read_idx(shard.idx_path):
                f.write(f"{count}\t{base + offset}\n")
                count += 1
            base += shard.num_bytes
    return out_path


@pipeline_def(enable_checkpointing=True)
def _alip_pipeline(
    paths: list[str],
    index_path: str,
    config: LoaderConfig,
    train: bool,
    shard_id: int,
    num_shards: int,
    decode_device: str,
):
    """Reader -> decode (+ random crop) -> resize -> flip + normalise. Returns (image CHW float, label[154])."""
    jpegs, labels = fn.readers.mxnet(
        path=paths,
        index_path=[index_path],
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,
        random_shuffle=train and config.shuffle,
        initial_fill=config.shuffle_buffer,
        name=READER_NAME,
    )
    size = config.image_size
    if train:
        # Crop inside the decoder: only the region of interest is decoded, which is much cheaper
        # than decoding the whole JPEG and cropping afterwards.
        images = fn.decoders.image_random_crop(
            jpegs,
            device=decode_device,
            output_type=types.RGB,
            random_area=list(config.random_area),
            random_aspect_ratio=list(config.random_aspect_ratio),
        )
        images = fn.resize(images, resize_x=size, resize_y=size)  # [H, W, 3] uint8, H = W = size
        mirror = fn.random.coin_flip(probability=config.flip_prob)
        crop = None
    else:
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=size)  # shorter side = size
        mirror = 0
        crop = (size, size)  # crop_pos defaults to the centre
    images = fn.crop_mirror_normalize(
        images,
        crop=crop,
        mirror=mirror,
        mean=config.mean_255,
        std=config.std_255,
        dtype=types.FLOAT,
        output_layout="CHW",
    )  # [3, size, size] float32
    if decode_device == "mixed":
        labels = labels.gpu()  # so the iterator hands every output over on the training device
    return images, labels


class DaliLoader:
    """DALI loader over ALIP shards: one epoch per iteration, equal steps on every rank, resumable.

    shards: meta JSON, directory with one meta JSON, .rec glob, single .rec, or a list of these
        (see `alip.data.schema.resolve_shards`). Every shard is preflighted unless
        `config.preflight` is False.
    train: random crop + flip + shuffling (per `config`); False: resize shorter side + centre crop,
        in file order.
    rank, world_size: default to the torch.distributed process group (0 and 1 without one).
    device: where batches are yielded; default `cuda:<local rank>` when CUDA is available (JPEGs
        then decode on the GPU), else the CPU.
    """

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
        self.rank, self.world_size, self.device, self.shards = place_loader(shards, config, rank, world_size, device)
        self.num_records = sum(s.num_records for s in self.shards)
        self.steps_per_epoch = steps_per_epoch(self.num_records, config.batch_size, self.world_size)
        self.epoch = 0
        self.step = 0  # batches of `epoch` already yielded
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if len(self.shards) == 1:
            self._index_path = str(self.shards[0].idx_path)
        else:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="alip-dali-")
            self._index_path = str(combined_index(self.shards, Path(self._tmpdir.name) / "combined.idx"))
        self._iterator: DALIGenericIterator | None = self._build()
        logger.info(
            "DALI %s loader: %d records in %d shards, rank %d/%d, %d steps of %d per epoch, decoding on %s",
            "train" if train else "eval",
            self.num_records,
            len(self.shards),
            self.rank,
            self.world_size,
            self.steps_per_epoch,
            config.batch_size,
            "GPU" if self.device.type == "cuda" else "CPU",
        )

    def _build(self, checkpoint: bytes | None = None) -> DALIGenericIterator:
        cuda = self.device.type == "cuda"
        pipe = _alip_pipeline(
            paths=[str(s.rec_path) for s in self.shards],
            index_path=self._index_path,
            config=self.config,
            train=self.train,
            shard_id=self.rank,
            num_shards=self.world_size,
            decode_device="mixed" if cuda else "cpu",
            batch_size=self.config.batch_size,
            num_threads=self.config.num_threads,
            device_id=self.device.index if cuda else None,
            # Different augmentations on every rank, reproducible from the one configured seed.
            seed=self.config.seed + self.rank,
            prefetch_queue_depth=self.config.prefetch,
            checkpoint=checkpoint,
        )
        iterator = DALIGenericIterator(
            [pipe],
            ["image", "label"],
            reader_name=READER_NAME,
            last_batch_policy=LastBatchPolicy.FILL,  # full batches; the reader pads with real samples
            auto_reset=False,
        )
        meta = pipe.reader_meta(READER_NAME)
        if meta["epoch_size"] != self.num_records or len(iterator) != self.steps_per_epoch:
            # The index handed to DALI and the preflight disagree: a bug here, not bad input.
            raise RuntimeError(
                f"DALI reader sees {meta['epoch_size']} records / {len(iterator)} steps, expected "
                f"{self.num_records} / {self.steps_per_epoch}"
            )
        return iterator

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _live_iterator(self) -> DALIGenericIterator:
        if self._iterator is None:
            raise RuntimeError("DaliLoader is closed")
        return self._iterator

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch (all of it unless restored mid-epoch), then epoch += 1."""
        iterator = self._live_iterator()
        while self.step < self.steps_per_epoch:
            out = next(iterator)[0]
            self.step += 1
            yield self._to_batch(out["image"], out["label"])
        # The iterator has handed out its whole epoch: this starts the next one without reading data.
        iterator.reset()
        self.epoch += 1
        self.step = 0

    def _to_batch(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # DALI reuses its output buffers for later batches, but the iterator copies into fresh
        # torch tensors, so these are safe to keep.
        if labels.shape[-1] != schema.LABEL_LENGTH:
            raise ValueError(f"record labels have {labels.shape[-1]} floats, expected {schema.LABEL_LENGTH}")
        tokens = labels.round().to(torch.int64)  # [B, 154]; ids < 2**24 are exact in float32
        return {
            "image": images.to(self.device, non_blocking=True),  # [B, 3, H, W] float32
            "text": tokens[:, : schema.CONTEXT_LENGTH].to(self.device, non_blocking=True),  # [B, 77]
            "caption": tokens[:, schema.CONTEXT_LENGTH :].to(self.device, non_blocking=True),  # [B, 77]
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain str/int state (safe for `torch.load(weights_only=True)`) of this rank's loader."""
        checkpoint = self._live_iterator().checkpoints()[0]  # bytes: serialized protobuf
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.config.batch_size,
            "num_records": self.num_records,
            "train": int(self.train),
            "dali_checkpoint": base64.b64encode(checkpoint).decode("ascii"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that wrote `state` stood. Raises ValueError on a mismatch."""
        expected = {
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.config.batch_size,
            "num_records": self.num_records,
            "train": int(self.train),
        }
        # The DALI checkpoint is per rank and per sharding.
        check_loader_state(state, STATE_KIND, STATE_VERSION, expected, self.steps_per_epoch)
        checkpoint = base64.b64decode(state["dali_checkpoint"])
        # A pipeline can only be restored when it is built: replace the running one.
        self._iterator = self._build(checkpoint)
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])

    def close(self) -> None:
        """Release the pipeline's threads and memory and the temporary index."""
        self._iterator = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
