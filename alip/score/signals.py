"""What `alip score` measures per record: the checkpoint's gate settings, the model pass and the gates.

`read_checkpoint` finds the model name and the gates' EMA state, power and pair_gate in a
training checkpoint; `similarities` runs the model over the shards (through `ScoredRecords`);
`gate_weights_of` turns the similarities into the gates' weights; `shard_texts` reads each shard's
texts sidecar for the original strings, in columns (`ShardTexts`).
"""

from __future__ import annotations

import json
import logging
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alip.cli import UserError
from alip.columns import CHUNK, StringColumn, StringColumnBuilder
from alip.data.format import schema
from alip.data.loaders.torch_loader import RecordDataset, worker_errors
from alip.model import model_from_checkpoint

# One logger for the whole package, named as the module was before the split, so log lines and
# logging filters still say `alip.score`.
logger = logging.getLogger("alip.score")


class ScoreInputError(UserError, ValueError):
    """A problem with what alip-score was given (a truth or texts file, an option); the message says which."""


class Warnings(list):
    """Warnings logged once each and kept for the summary."""

    def add(self, message: str) -> None:
        if message not in self:
            logger.warning(message)
            self.append(message)


EMA_NAMES = {"tc": "ema_tc", "it": "ema_it", "ic": "ema_ic"}  # buffer names in alip.gates.ConsistencyGates


@dataclass
class CheckpointInfo:
    path: Path
    kind: str  # "alip-train" or "weights"
    model_name: str | None
    ema: dict[str, float] | None  # tc/it/ic, None when the checkpoint has no usable EMA state
    power: float | None
    pair_gate: str | None


TEXT_FIELDS = ("sample_key", "raw_text", "caption")


@dataclass
class ShardTexts:
    """The entries of every shard's texts sidecar, in columns (about 24 bytes a record beside its strings,
    where a dict per record cost some 600): each shard's rows in file order, shard after shard."""

    keys: np.ndarray  # [M] int64 record keys
    sample_key: StringColumn  # [M + 1]: the last row is blank (what a record without an entry gets)
    raw_text: StringColumn
    caption: StringColumn
    bounds: list[tuple[int, int] | None]  # each shard's rows [first, stop); None: the shard has no sidecar

    @property
    def blank(self) -> int:
        return len(self.keys)

    def rows_of(self, shard_ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(each record's row, `blank` without an entry; how many records found an entry; how many did not
        in a shard with a sidecar). A key listed twice in a sidecar: its last entry, as a dict would keep."""
        rows = np.full(len(keys), self.blank, np.int64)
        found = missing = 0
        starts = np.searchsorted(shard_ids, np.arange(len(self.bounds) + 1))  # records are in shard order
        for shard, bound in enumerate(self.bounds):
            if bound is None:
                continue
            lo, hi = int(starts[shard]), int(starts[shard + 1])
            if not np.all(shard_ids[lo:hi] == shard):  # not in shard order: select the shard's records
                where = np.flatnonzero(shard_ids == shard)
            else:
                where = slice(lo, hi)
            wanted = keys[where]
            table = self.keys[bound[0] : bound[1]]
            if len(table):
                by_key = np.argsort(table, kind="stable")
                pos = np.searchsorted(table[by_key], wanted, side="right") - 1  # the last of equal keys
                hit = pos >= 0
                hit[hit] = table[by_key[pos[hit]]] == wanted[hit]
                rows[where] = np.where(hit, bound[0] + by_key[np.maximum(pos, 0)], self.blank)
            else:
                hit = np.zeros(len(wanted), bool)
            found += int(hit.sum())
            missing += int((~hit).sum())
        return rows, found, missing


def _find_ema(loss_state: Any) -> dict[str, float] | None:
    if not isinstance(loss_state, Mapping):
        return None
    ema = {}
    for short, buffer in EMA_NAMES.items():
        # "gates.ema_tc" in AlipLoss.state_dict(); match the suffix so wrapper prefixes do not matter
        found = [v for k, v in loss_state.items() if str(k) == buffer or str(k).endswith("." + buffer)]
        if len(found) != 1:
            return None
        ema[short] = float(torch.as_tensor(found[0]).float().item())
    return ema


def read_checkpoint(path: Path, warnings: Warnings) -> CheckpointInfo:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state: Any = None
    if path.suffix != ".safetensors":
        from alip.train.checkpoint import load_state

        try:
            state = load_state(path)
        except Exception as e:  # unreadable or unsafe: alip.load_checkpoint will say exactly why
            logger.debug("torch.load(%s) failed (%s); treating it as a weights file", path, e)
    if not (isinstance(state, Mapping) and isinstance(state.get("model"), Mapping)):
        return CheckpointInfo(path, "weights", None, None, None, None)
    config = state.get("config") if isinstance(state.get("config"), Mapping) else {}
    model_cfg = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    loss_cfg = config.get("loss") if isinstance(config.get("loss"), Mapping) else {}
    ema = None
    if "loss" not in state:
        warnings.add(f"{path} has no 'loss' state (the gates' EMA values): using the dataset means as mu")
    else:
        ema = _find_ema(state["loss"])
        if ema is None:
            warnings.add(f"{path}: no ema_tc/ema_it/ema_ic in its 'loss' state: using the dataset means as mu")
    if ema is not None and (loss_cfg.get("use_gates") is False or loss_cfg.get("use_caption") is False):
        warnings.add(
            f"{path} was trained without gates (use_gates/use_caption false), so its EMA values were never "
            "updated: using the dataset means as mu"
        )
        ema = None
    if ema is not None and all(v == 1.0 for v in ema.values()):
        warnings.add(f"{path}: the gates' EMA values are still at their initial 1.0 (saved before any step?)")
    power = loss_cfg.get("power")
    pair_gate = loss_cfg.get("pair_gate")
    return CheckpointInfo(
        path,
        "alip-train",
        model_cfg.get("name"),
        ema,
        float(power) if power is not None else None,
        str(pair_gate) if pair_gate is not None else None,
    )


def _texts_path(shard: schema.ShardInfo) -> Path | None:
    if shard.texts:
        return Path(shard.texts)
    beside = Path(shard.rec).with_suffix(".texts.jsonl")  # data2rec's name, for a .rec glob
    return beside if beside.is_file() else None


class _TextsBuilder:
    """The texts sidecars' entries in columns, shard after shard (see `ShardTexts`)."""

    def __init__(self) -> None:
        self.keys = array("q")
        self.columns = {name: StringColumnBuilder() for name in TEXT_FIELDS}
        self.bounds: list[tuple[int, int] | None] = []

    def read(self, path: Path) -> None:
        first = len(self.keys)
        pending = [self.columns[name].pending for name in TEXT_FIELDS]
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    key = int(entry["key"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ScoreInputError(f"{path}:{lineno}: not a texts sidecar entry ({e})") from None
                if not -(1 << 63) <= key < 1 << 63:
                    continue  # no record has this key (record keys are int64)
                self.keys.append(key)
                sample_key = entry.get("sample_key")
                for out, value in zip(
                    pending,
                    ("" if sample_key is None else sample_key, entry.get("raw_text") or "", entry.get("caption") or ""),
                    strict=True,
                ):
                    out.append(value if isinstance(value, str) else str(value))  # as the CSV writes it
                if len(pending[0]) >= CHUNK:
                    self._flush()
        self.bounds.append((first, len(self.keys)))

    def _flush(self) -> None:
        for column in self.columns.values():
            column.flush()

    def finish(self) -> ShardTexts:
        for column in self.columns.values():
            column.pending.append("")  # the blank row of records without an entry
        keys = np.frombuffer(self.keys, np.int64) if self.keys else np.empty(0, np.int64)
        return ShardTexts(keys, *(self.columns[name].finish() for name in TEXT_FIELDS), self.bounds)


class ScoredRecords(Dataset):
    """The records of a `RecordDataset` with the model's eval transform, their key and position."""

    def __init__(self, records: RecordDataset, preprocess: Any) -> None:
        self.records, self.preprocess = records, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key, raw, cap, image = self.records.read(i)
        return {
            "image": self.preprocess(image),
            "raw": torch.from_numpy(raw),
            # records with K caption slots: the first slot, whose gate EMAs are the checkpoint's ema_tc/ema_ic
            "caption": torch.from_numpy(cap[0] if cap.ndim == 2 else cap),
            "key": key,
            "index": i,
        }


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.inference_mode()
def similarities(
    model: torch.nn.Module,
    dataset: ScoredRecords,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(record keys [N], similarities [N, 3] as s_tc, s_it, s_ic in float64), in dataset order."""
    from tqdm import tqdm

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    n = len(dataset)
    keys = np.zeros(n, dtype=np.int64)
    sims = np.full((n, 3), np.nan, dtype=np.float64)
    with tqdm(total=n, unit="rec", desc="alip-score", disable=not progress) as bar, worker_errors():
        for batch in loader:
            b = batch["image"].shape[0]
            image = batch["image"].to(device, non_blocking=True)
            tokens = torch.cat([batch["raw"], batch["caption"]]).to(device, non_blocking=True)
            v = model.encode_image(image, normalize=True).float()
            t, c = model.encode_text(tokens, normalize=True).float().split(b)  # one pass, as BiPathCLIP
            s = torch.stack([(t * c).sum(-1), (v * t).sum(-1), (v * c).sum(-1)], dim=1)
            idx = batch["index"].numpy()
            sims[idx] = s.double().cpu().numpy()
            keys[idx] = batch["key"].numpy()
            bar.update(b)
    return keys, sims


def require_finite(keys: np.ndarray, sims: np.ndarray) -> None:
    """A broken checkpoint gives NaN features: stop here rather than rank NaNs."""
    bad = ~np.isfinite(sims).all(axis=1)
    if bad.any():
        raise ScoreInputError(
            f"the model gave non-finite features for {int(bad.sum())} of {len(sims)} records "
            f"(e.g. record key {int(keys[bad][0])}): is the checkpoint broken?"
        )


def load_model(model_name: str, path: Path, device: torch.device) -> tuple[torch.nn.Module, Any, str]:
    """(model in eval mode on `device`, its eval transform, the checkpoint format `alip.load_checkpoint` read).
    Built in the checkpoint's shape (a sigmoid-trained model's logit_bias included), the file read once."""
    clip, _, preprocess, fmt = model_from_checkpoint(model_name, path)
    clip.to(device).eval()
    return clip, preprocess, fmt


@dataclass
class Gated:
    """The gate weights of every record and the mu they were computed with."""

    weights: np.ndarray  # [N, 3] weight_sample, weight_raw, weight_caption
    mu: dict[str, float]  # tc/it/ic
    ema_source: str  # "checkpoint" or "dataset_mean"
    means: dict[str, float]  # tc/it/ic dataset means of the similarities


def gate_weights_of(sims: np.ndarray, ema: dict[str, float] | None, power: float, pair_gate: str) -> Gated:
    """`alip.gates.gate_weights` over all records, mu = the checkpoint's EMA or, without one, the dataset means."""
    import alip  # lazy, as in load_model

    means = {short: float(sims[:, j].mean()) for j, short in enumerate(EMA_NAMES)}
    mu = ema if ema is not None else means
    s = torch.from_numpy(sims)
    weights = alip.gate_weights(s[:, 0], s[:, 1], s[:, 2], mu["tc"], mu["it"], mu["ic"], power, pair_gate)
    w = torch.stack([weights.sample, weights.raw, weights.caption], dim=1).numpy()
    return Gated(w, mu, "checkpoint" if ema is not None else "dataset_mean", means)


def shard_texts(shards: list[schema.ShardInfo], warnings: Warnings) -> ShardTexts:
    """Every shard's texts sidecar in columns; a shard without one is warned about once."""
    builder = _TextsBuilder()
    for shard in shards:
        path = _texts_path(shard)
        if path is not None and path.is_file():
            builder.read(path)
        else:
            builder.bounds.append(None)
    texts = builder.finish()
    without = [shard.rec for shard, b in zip(shards, texts.bounds, strict=True) if b is None]
    if without:
        warnings.add(
            f"{len(without)} of {len(shards)} shards have no texts sidecar (data2rec writes "
            f"<shard>.texts.jsonl beside the .rec), e.g. {without[0]}: their sample keys, raw texts and "
            "captions are left blank"
        )
    return texts
