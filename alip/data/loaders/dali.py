"""NVIDIA DALI training and eval loaders over ALIP RecordIO shards.

`DaliLoader`, a RecordLoader (alip.data.loaders.base: the batch contract, the epoch semantics, the
state), reads the shards with `fn.readers.mxnet`, decodes on the GPU (`device="mixed"`) when its
device is a CUDA one and on the CPU otherwise, and augments.

Sharding. Rank r of W reads DALI shard r of the concatenated records, and DALI moves each rank on
to the next shard after every epoch (no `stick_to_shard`), so over W epochs every rank sees every
record. The reader always runs with `pad_last_batch=True`: each rank's share is padded to whole
batches by repeating its last sample, equal on every rank, and an epoch never reads into the next.
`config.last_batch` (alip.data.loaders.config says what each mode yields) then decides what this
loader does with them: "pad" yields the padded batches as they are; "fill" replaces the padded rows
of each rank's last batch with other records of its part (below); "drop" reads the rest of the
epoch without yielding it (at most one batch); eval mode without "pad" cuts the padding off.

"fill". DALI shuffles within a buffer, so the loader cannot ask for particular records; it keeps
what it needs from what it has read. The number of padded rows of this rank's last batch is known
from its part's size (`alip.data.loaders.config.fill_rows`, 0 to B), so the loader keeps that many rows of
the first batch it yields in an epoch (images, labels and source names, cloned, on the device they
came on: fill x 3 x H x W float32, at most 308 MB at B = 512, 224 px) and puts them in place of the
padded rows of the last batch. The first batch and the last are different batches (every part
holds at least one batch, which `steps_per_epoch` asks of "fill"), and parts are disjoint across
ranks, so no batch and no global batch holds a record twice. After a mid-epoch resume the kept
rows come from the first batch read after the resume, not the epoch's first: the uninterrupted
run's last batch and the resumed run's differ in those rows (every other batch is exact), and
still hold no copies. Where the resume lands on the last batch itself, nothing earlier of the
epoch is left to keep: the loader reads the first batch of this rank's part from a fresh,
throwaway pipeline (same seed, so the same on every such resume) and takes the rows whose records
(compared by .rec path and byte offset) are not among the last batch's own, which are always
enough: that batch has B distinct records of the part and the last batch B - fill of them.

Damaged records. The start-up check reads sizes, counts, the .idx and the framing of three records
per shard (`full_check`: of every record). Every batch's labels are checked on the host
(`schema.decode_label`: finite, integral token ids) before they become int64 tokens; a
bad one raises RecordIOError naming the shard and the record, found from the source DALI reports
for each sample. A record whose image DALI cannot decode fails inside the pipeline with a message
that names no file: it is re-raised naming the shards this rank was reading, with the hint to run
the deep check (`tools/inspect_rec.py --check --deep`).

Resuming. `state_dict()` holds DALI's pipeline checkpoint (reader position, shuffle buffer and the
random state of every augmentation) plus the epoch and step: a loader restored from it yields
exactly the batches the original would have (with "fill", but for the fill rows of the epoch's last
batch: see above; the kept rows are not in the state). The state is per rank: every rank must save and
restore its own. On another world size (`--reshard`) the reader's position means nothing:
`continue_epoch` starts the epoch the ranks were in again from its beginning (the next one where
they had finished it), in a fresh pipeline whose first part keeps part = (rank + epoch) % W.

This is the only module that imports DALI.
"""

from __future__ import annotations

import base64
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from alip.data.format import schema
from alip.data.format.recordio import RecordIOError, ShardCheck, read_idx, read_idx_arrays
from alip.data.loaders.base import RecordLoader
from alip.data.loaders.config import LoaderConfig, batch_rows, fill_rows, steps_per_epoch

logger = logging.getLogger(__name__)

READER_NAME = "shards"
STATE_KIND = "alip-dali-loader"
STATE_VERSION = 1
# DALI operators that read or decode the shards' bytes: their failures are the data's, not ours.
_DATA_OPERATORS = ("fn.readers.mxnet", "fn.decoders.")
_NAMED_SHARDS = 5  # a longer list of candidate shards is cut to this many and a count


def combined_index(shards: list[ShardCheck], out_path: Path) -> Path:
    """Write one .idx for several .rec files, as DALI's RecordIO reader needs.

    DALI accepts a single index for all files and reads its offsets as positions in the
    concatenation of the .rec files (in `path` order), so each shard's offsets are shifted by the
    sizes of the shards before it. DALI ignores the key column; a running count keeps it unique.
    """
    base, count = 0, 0
    with open(out_path, "w", encoding="ascii") as f:
        for shard in shards:
            offsets = (read_idx_arrays(shard.idx_path)[1] + base).tolist()  # NumPy-parsed, one write per shard
            f.write("".join(f"{count + i}\t{offset}\n" for i, offset in enumerate(offsets)))
            count += len(offsets)
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
    """Reader -> decode (+ random crop) -> resize -> flip + normalise.

    Returns (image CHW float, label [154], source): `source` is each record's "<.rec path> at index
    <byte offset>" as uint8, zero padded to the batch's longest, to name a damaged record.
    """
    jpegs, labels = fn.readers.mxnet(
        path=paths,
        index_path=[index_path],
        shard_id=shard_id,
        num_shards=num_shards,
        # In every `last_batch` mode: the padding keeps epochs apart and the step count equal on
        # every rank; DaliLoader decides what of the padded tail it yields.
        pad_last_batch=True,
        random_shuffle=train and config.shuffle,
        initial_fill=config.shuffle_buffer,
        name=READER_NAME,
    )
    sources = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)
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
            num_attempts=config.crop_attempts,  # DALI's default 10 falls back for ~40% of 3:2 photos
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
    # The labels stay on the host: they are checked there (no device sync), then copied as tokens.
    return images, labels, sources


class DaliLoader(RecordLoader):
    """The RecordLoader (alip.data.loaders.base) that reads with DALI; JPEGs decode on the GPU when
    the device is a CUDA one, else on the CPU."""

    NAME = "DALI"
    STATE_KIND = STATE_KIND
    STATE_VERSION = STATE_VERSION

    def _reading(self) -> str:
        return "decoding on " + ("GPU" if self.device.type == "cuda" else "CPU")

    def _open(self) -> None:
        config = self.config
        self.steps_per_epoch = steps_per_epoch(self.num_records, config.batch_size, self.world_size, self.mode)
        # What the padded reader delivers per epoch; with "drop" the last of these are read, not yielded.
        self._reader_steps = steps_per_epoch(self.num_records, config.batch_size, self.world_size, "pad")
        # DALI's shard (part) for the pipeline's first epoch; it moves on by one per epoch. `rank` unless
        # the pipeline was built for a later epoch (restart_epoch), so that part = (rank + epoch) % W.
        self._first_part = self.rank
        # "fill": rows kept from the epoch's first batch read, for the last batch's padded rows (module docstring)
        self._fill_cache: dict[str, torch.Tensor] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if len(self.shards) == 1:
            self._index_path = str(self.shards[0].idx_path)
        else:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="alip-dali-")
            self._index_path = str(combined_index(self.shards, Path(self._tmpdir.name) / "combined.idx"))
        self._iterator: DALIGenericIterator | None = self._build()

    def _build(self, checkpoint: bytes | None = None, first_part: int | None = None) -> DALIGenericIterator:
        """The pipeline and its iterator, its first epoch on `first_part` (default: the loader's)."""
        cuda = self.device.type == "cuda"
        pipe = _alip_pipeline(
            paths=[str(s.rec_path) for s in self.shards],
            index_path=self._index_path,
            config=self.config,
            train=self.train,
            shard_id=self._first_part if first_part is None else first_part,
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
            ["image", "label", "source"],
            reader_name=READER_NAME,
            last_batch_policy=LastBatchPolicy.FILL,  # full batches; the reader pads with real samples
            auto_reset=False,
        )
        meta = pipe.reader_meta(READER_NAME)
        if meta["epoch_size"] != self.num_records or len(iterator) != self._reader_steps:
            # The index handed to DALI and the preflight disagree: a bug here, not bad input.
            raise RuntimeError(
                f"DALI reader sees {meta['epoch_size']} records / {len(iterator)} steps, expected "
                f"{self.num_records} / {self._reader_steps}"
            )
        return iterator

    def _live_iterator(self) -> DALIGenericIterator:
        if self._iterator is None:
            raise RuntimeError("DaliLoader is closed")
        return self._iterator

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch (all of it unless restored mid-epoch), then epoch += 1."""
        iterator = self._live_iterator()
        part = (self.rank + self.epoch) % self.world_size
        fill = fill_rows(self.num_records, self.config.batch_size, self.world_size, part) if self.mode == "fill" else 0
        last = self.steps_per_epoch - 1
        while self.step < self.steps_per_epoch:
            out = self._next(iterator)
            if fill and self.step < last and self._fill_cache is None:
                self._fill_cache = {k: out[k][:fill].clone() for k in ("image", "label", "source")}
            if fill and self.step == last:
                out = self._filled(out, fill, part)
            rows = batch_rows(self.num_records, self.config.batch_size, self.world_size, part, self.step, self.mode)
            self.step += 1
            yield self._to_batch(out["image"][:rows], out["label"][:rows], out["source"][:rows])
        # "drop": the reader still holds the padded tail of this rank's part (at most one batch);
        # read it so that the next epoch starts at the next part, as in the other modes.
        for _ in range(self._reader_steps - self.steps_per_epoch):
            self._next(iterator)
        # The iterator has handed out its whole epoch: this starts the next one without reading data.
        iterator.reset()
        self.epoch += 1
        self.step = 0
        self._fill_cache = None

    def _filled(self, out: dict[str, torch.Tensor], fill: int, part: int) -> dict[str, torch.Tensor]:
        """The last batch of an epoch with its `fill` padded rows (the tail) replaced by kept rows."""
        cache = self._fill_cache
        if cache is None:  # the resume landed on the last batch: nothing of the epoch was kept
            cache = self._fallback_fill(out["source"][: len(out["source"]) - fill], fill, part)
        self._fill_cache = None
        real = len(out["image"]) - fill
        width = max(out["source"].shape[-1], cache["source"].shape[-1])
        sources = [F.pad(t, (0, width - t.shape[-1])) for t in (out["source"][:real], cache["source"])]
        return {
            "image": torch.cat([out["image"][:real], cache["image"]]),
            "label": torch.cat([out["label"][:real], cache["label"]]),
            "source": torch.cat(sources),
        }

    def _fallback_fill(self, sources: torch.Tensor, fill: int, part: int) -> dict[str, torch.Tensor]:
        """`fill` rows of records of `part` not named in `sources` (the last batch's real rows), from the
        first batch of a fresh, throwaway pipeline on that part (module docstring)."""
        logger.warning(
            "last_batch=fill: resumed at the last batch of epoch %d, no earlier batch of it kept: reading %d "
            "fill rows from a fresh pipeline on this rank's part",
            self.epoch,
            fill,
        )
        taken = {_source_name(s) for s in sources}
        out = self._next(self._build(first_part=part))
        keep = [i for i, s in enumerate(out["source"]) if _source_name(s) not in taken][:fill]
        if len(keep) < fill:  # cannot happen: B distinct records of the part, at most B - fill of them taken
            raise RuntimeError(f"last_batch=fill: {len(keep)} fill rows found, {fill} needed")
        index = torch.tensor(keep)
        return {k: out[k][index.to(out[k].device)].clone() for k in ("image", "label", "source")}

    def _next(self, iterator: DALIGenericIterator) -> dict[str, torch.Tensor]:
        try:
            return next(iterator)[0]
        except RuntimeError as e:
            if not any(op in str(e) for op in _DATA_OPERATORS):
                raise
            # DALI's message ("nvImageCodec failure: '#4'") names no file; the pipeline is dead now,
            # so the shards this rank reads in this epoch are as close as we can get.
            shards = self._epoch_shards()
            named = ", ".join(str(s.rec_path) for s in shards[:_NAMED_SHARDS])
            more = f" and {len(shards) - _NAMED_SHARDS} more" if len(shards) > _NAMED_SHARDS else ""
            raise RecordIOError(
                f"DALI could not read or decode a record in epoch {self.epoch}, step {self.step} of rank "
                f"{self.rank}, from one of {named}{more}: {_dali_error(e)}; {schema.DEEP_CHECK_HINT}"
            ) from e

    def _epoch_shards(self) -> list[ShardCheck]:
        """The shard files holding the records this rank reads in the current epoch.

        DALI splits the concatenated records into `world_size` contiguous parts, [N*p/W, N*(p+1)/W),
        and moves each rank on by one part per epoch (no stick_to_shard).
        """
        part = (self.rank + self.epoch) % self.world_size
        begin = self.num_records * part // self.world_size
        end = self.num_records * (part + 1) // self.world_size
        out, first = [], 0
        for shard in self.shards:
            if first < end and first + shard.num_records > begin:
                out.append(shard)
            first += shard.num_records
        return out

    def _to_batch(self, images: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor) -> dict[str, torch.Tensor]:
        # DALI reuses its output buffers for later batches, but the iterator copies into fresh
        # torch tensors, so these are safe to keep.
        slots = self.slots
        if labels.shape[-1] != slots.label_length:
            where = self._record_at(sources[0]) if len(sources) else "a record"
            raise RecordIOError(
                f"{where}: labels of {labels.shape[-1]} floats, expected {slots.label_length} ({slots.describe()})"
            )
        if len(labels) == 0:  # eval: a rank whose part ran out takes the step with an empty batch
            text = np.zeros((0, schema.CONTEXT_LENGTH), dtype=np.int64)
            k = slots.num_captions
            caption = np.zeros((0, *((k,) if k > 1 else ()), schema.CONTEXT_LENGTH), dtype=np.int64)
        else:
            try:
                text, caption = schema.decode_label(labels.numpy(), slots)
            except schema.TokenError as e:
                raise RecordIOError(f"{self._record_at(sources[e.row])}: {e}; {schema.DEEP_CHECK_HINT}") from None
        return {
            "image": images.to(self.device, non_blocking=True),  # [B, 3, H, W] float32
            "text": torch.from_numpy(text).to(self.device, non_blocking=True),  # [B, 77]
            # [B, 77], or [B, K, 77] with K caption slots
            "caption": torch.from_numpy(caption).to(self.device, non_blocking=True),
        }

    def _record_at(self, source: torch.Tensor) -> str:
        """The record named from DALI's source info ("<.rec path> at index <byte offset>"): path, key, byte."""
        text = bytes(source.numpy()).rstrip(b"\0").decode("utf-8", "replace")
        path, sep, offset = text.rpartition(" at index ")
        shard = next((s for s in self.shards if str(s.rec_path) == path), None)
        if not sep or shard is None or not offset.isdigit():
            return text
        key = next((k for k, o in read_idx(shard.idx_path) if o == int(offset)), "?")
        return f"{path}: record key {key} at byte {offset}"

    def state_dict(self) -> dict[str, Any]:
        """Plain str/int state (safe for `torch.load(weights_only=True)`) of this rank's loader."""
        checkpoint = self._live_iterator().checkpoints()[0]  # bytes: serialized protobuf
        return {
            "kind": STATE_KIND,
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "step": self.step,
            **self._sharding(),
            "first_part": self._first_part,
            "shards_digest": self.shards_digest,
            "dali_checkpoint": base64.b64encode(checkpoint).decode("ascii"),
        }

    def _sharding(self) -> dict[str, int | str]:
        """What a state must have been written under to be restored here: its pipeline checkpoint is per
        rank, world size, batch size, records, mode and epoch cut."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.config.batch_size,
            "num_records": self.num_records,
            "train": int(self.train),
            "last_batch": self.mode,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that wrote `state` stood. Raises ValueError on a mismatch."""
        state = self.check_state(state, self._sharding())  # the DALI checkpoint is per rank and per sharding
        checkpoint = base64.b64decode(state["dali_checkpoint"])
        # A pipeline can only be restored when it is built: replace the running one, built as that one was.
        self._first_part = int(state.get("first_part", self.rank))
        self._iterator = self._build(checkpoint)
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self._fill_cache = None  # "fill": kept again from the first batch read now (module docstring)

    def continue_epoch(self, states: list[dict[str, Any]]) -> str:
        """Continue from the states of a run on another world size, as well as DALI allows: its reader's
        position (a shuffle buffer within each rank's part) has no meaning on other parts, so the epoch
        the ranks were in starts again from its beginning; where they had finished it, the next one
        starts. Returns what happened, in words."""
        first = states[0]
        if first.get("kind") != STATE_KIND or not all(self.same_data(s) for s in states):
            raise ValueError(f"not {STATE_KIND} states of these shards")
        epoch, step = int(first["epoch"]), int(first["step"])
        old_steps = steps_per_epoch(self.num_records, first["batch_size"], len(states), first.get("last_batch", "pad"))
        if step >= old_steps:
            self.restart_epoch(epoch + 1)
            return f"epoch {epoch} was complete: epoch {epoch + 1} starts"
        self.restart_epoch(epoch)
        return (
            f"the DALI reader cannot continue an epoch on other parts: epoch {epoch} starts again from its "
            f"beginning, so the {step * first['batch_size'] * len(states)} samples of its first {step} steps "
            "are read a second time"
        )

    def restart_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning with a fresh pipeline (a resume onto other ranks or shards)."""
        self._first_part = (self.rank + epoch) % self.world_size
        self._iterator = self._build()
        self.epoch, self.step = epoch, 0
        self._fill_cache = None

    def close(self) -> None:
        """Release the pipeline's threads and memory and the temporary index."""
        self._iterator = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def _source_name(source: torch.Tensor) -> bytes:
    """A record's DALI source info ("<.rec path> at index <byte offset>") without its zero padding."""
    return bytes(source.numpy()).rstrip(b"\0")


def _dali_error(error: RuntimeError) -> str:
    """The line of DALI's message that says what went wrong (it follows "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    after = lines[lines.index("encountered:") + 1 :] if "encountered:" in lines else lines
    return next((line for line in after if "pipeline" not in line.lower()), lines[-1] if lines else "")
