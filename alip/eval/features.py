"""Batched, distributed feature extraction with exact gathering, and an optional disk cache.

Sharding: rank r encodes samples r, r + W, r + 2W, ... (W = world size). Every rank pads its
shard to ceil(N / W) rows, the shards are gathered in one collective, and the padded rows are
dropped by their global index (row i of rank r is sample r + i * W, padding is >= N). So every
sample is counted exactly once and the result is in dataset order on every rank, whatever W is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from alip.distributed import all_gather_cat, get_rank, get_world_size
from alip.model import unwrap_model

logger = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Labels travel through the float32 gather next to the features; float32 holds integers exactly up to 2**24.
_MAX_EXACT_LABEL = 2**24
FEATURE_STAGES = ("projected", "pre-projection")

Encoder = Callable[[torch.Tensor], torch.Tensor]


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The samples rank `rank` encodes: rank, rank + W, ... (shard sizes differ by at most one)."""
    return list(range(rank, n, world_size))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16, nothing for fp32 (the default: the numbers a reviewer can trust)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def image_encoder(model: nn.Module, stage: str = "projected", normalize: bool = True) -> Encoder:
    """images [B, 3, H, W] -> features [B, D]: after the projection (the embedding space) or before it
    (the pooled transformer output, open_clip VisionTransformer only)."""
    if stage not in FEATURE_STAGES:
        raise ValueError(f"feature stage must be one of {FEATURE_STAGES}, got {stage!r}")
    if stage == "projected":

        def encode(x: torch.Tensor) -> torch.Tensor:
            f = model.encode_image(x)
            return F.normalize(f, dim=-1) if normalize else f

        return encode
    visual = getattr(unwrap_model(model), "visual", None)
    if not all(hasattr(visual, a) for a in ("_embeds", "transformer", "_pool")):
        raise ValueError(
            f"pre-projection features need an open_clip VisionTransformer tower, got {type(visual).__name__}"
        )

    def encode_pre(x: torch.Tensor) -> torch.Tensor:
        # open_clip's VisionTransformer.forward minus the final `pooled @ proj`
        pooled, _ = visual._pool(visual.transformer(visual._embeds(x)))
        return F.normalize(pooled, dim=-1) if normalize else pooled

    return encode_pre


def text_encoder(model: nn.Module, normalize: bool = True) -> Encoder:
    """token ids [B, L] -> text features [B, D]."""

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        f = model.encode_text(tokens)
        return F.normalize(f, dim=-1) if normalize else f

    return encode


class TensorRows(Dataset):
    """Rows of a tensor as a dataset (token ids for the text encoder)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def _batches(loader: DataLoader, with_labels: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for batch in loader:
        if with_labels:
            x, y = batch
            yield x, torch.as_tensor(y)
        else:
            yield batch, None


@torch.no_grad()
def extract_features(
    dataset: Dataset,
    encode: Encoder,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    num_workers: int = 4,
    precision: str = "fp32",
    with_labels: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode every sample of `dataset`, sharded over the ranks; returns ([N, D] float32, [N] labels or None)
    on the CPU, in dataset order, identical on every rank.

    `dataset` yields inputs (or `(input, label)` with `with_labels=True`). Features are computed
    under `precision` autocast and returned as float32.
    """
    device = torch.device(device)
    rank, world = get_rank(), get_world_size()
    n = len(dataset)
    if n < world:
        raise ValueError(f"{desc}: {n} samples cannot be sharded over {world} ranks (every rank needs one)")
    mine = shard_indices(n, rank, world)
    loader = DataLoader(
        Subset(dataset, mine),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    feats, labels = [], []
    progress = tqdm(total=math.ceil(n / world) * world, desc=desc, unit="sample", disable=rank != 0, leave=False)
    for x, y in _batches(loader, with_labels):
        with autocast(device, precision):
            f = encode(x.to(device, non_blocking=True))
        feats.append(f.float())  # [b, D]
        if y is not None:
            labels.append(y.to(device=device, dtype=torch.float32))
        progress.update(x.shape[0] * world)  # rank 0 speaks for all ranks (shards differ by <= 1)
    progress.close()
    local = torch.cat(feats)  # [n_r, D]
    per_rank = math.ceil(n / world)
    pad = per_rank - local.shape[0]  # 0 or 1
    parts = [F.pad(local, (0, 0, 0, pad))]  # [P, D]
    if with_labels:
        local_labels = torch.cat(labels)
        if local_labels.numel() and local_labels.max() >= _MAX_EXACT_LABEL:
            raise ValueError(f"labels >= {_MAX_EXACT_LABEL} cannot be gathered exactly in float32")
        parts.append(F.pad(local_labels, (0, pad), value=-1.0)[:, None])  # [P, 1]
    gathered = all_gather_cat(parts)  # rank-major: row r * P + i is sample r + i * W
    global_index = (
        torch.arange(world, device=local.device)[:, None] + torch.arange(per_rank, device=local.device)[None, :] * world
    ).flatten()  # [W * P]
    valid = global_index < n  # padded rows point past the end
    order = torch.empty(n, dtype=torch.long, device=local.device)
    order[global_index[valid]] = torch.nonzero(valid).squeeze(1)
    out = gathered[0][order].cpu()  # [N, D]
    out_labels = gathered[1][order, 0].long().cpu() if with_labels else None  # [N]
    return out, out_labels


def cached(
    cache_dir: str | Path | None, key: dict[str, Any], compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Load `compute()`'s tensors from `cache_dir` when an entry for `key` exists, else compute and store.

    The file name is a hash of `key` (model, checkpoint hash, dataset, split, size, feature stage,
    precision...), so a changed checkpoint or setting never reads stale features. Rank 0 writes;
    every rank computes (the extraction is collective).
    """
    if cache_dir is None:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"features-{digest}.pt"
    if path.is_file():
        logger.info("features from cache %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)
    value = compute()
    if get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(value, tmp)
        tmp.replace(path)  # atomic: a killed run never leaves half a cache entry
        (path.with_suffix(".json")).write_text(json.dumps(key, indent=1, sort_keys=True))
    return value
