"""One optimizer step of ALIP: exact gradient accumulation for the contrastive loss, skip on non-finite.

Why not the usual "backward each micro-batch's loss": a contrastive loss over a micro-batch sees
only B/k negatives, and the gates' EMAs would move k times per step. Both change the objective.
Here (the GradCache scheme) the loss runs ONCE per step, on the features of the whole per-rank
batch:

1. forward every micro-batch (no grad when k > 1, so activations are not kept);
2. make the concatenated features leaf tensors, run `AlipLoss` on them and backward: this gives
   d loss / d features (and moves the gate EMAs once);
3. re-forward each micro-batch with grad and backward the cached feature gradients into the
   towers (DDP `no_sync` on all but the last, so gradients are all-reduced once).

With k = 1 step 1 keeps its graph and step 3 only backwards it: no second forward. The result is
the gradient of the loss on the whole batch, whatever k is (up to float summation order).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from alip.distributed import get_world_size
from alip.loss import AlipLoss, NonFiniteLossInputError

FEATURES = ("image_features", "raw_features", "caption_features")
SCALARS = ("logit_scale", "logit_bias")  # the bias only with the sigmoid objective


@dataclass
class StepOutcome:
    """What one step did. `losses` holds rank-averaged loss terms (NaN where the loss was skipped)."""

    applied: bool  # False: non-finite loss inputs or gradients; optimizer not stepped (schedule: see step_on_skip)
    losses: dict[str, float]
    gates: dict[str, torch.Tensor]  # weight_* over the global batch [N] (empty when skipped)
    grad_norm: float
    # "gate/sim_tc_mean", ..., "gate/ema_ic": the release's per-step log (AlipLoss.stat_names), NaN when
    # the loss inputs were non-finite
    stats: dict[str, float] = field(default_factory=dict)


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Split every tensor of the batch along dim 0 into `parts` equal micro-batches."""
    size = batch["image"].shape[0]
    if size % parts:
        raise ValueError(f"batch of {size} does not split into {parts} equal micro-batches")
    chunks = {k: v.split(size // parts) for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(parts)]


def _forward(net: nn.Module, micro: dict[str, torch.Tensor], use_caption: bool) -> dict[str, torch.Tensor]:
    # captions [B, 77], or [B, K, 77] for K caption sources (loss.captions=all; "sample" has picked one each)
    out = net(micro["image"], micro["text"], micro["caption"] if use_caption else None)
    return {k: v for k, v in out.items() if v is not None}


def forward_backward(
    net: nn.Module,
    loss_fn: AlipLoss,
    batch: dict[str, torch.Tensor],
    accum_steps: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scale_loss: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor] | None:
    """Accumulate the gradient of the loss over the whole per-rank `batch` into the parameters.

    Returns the loss dict, or None when the loss inputs were non-finite. That verdict is the same
    on every rank (AlipLoss checks after its gather), and the backward still runs with zero
    feature gradients so that DDP's all-reduce stays in step on every rank.
    """
    micros = split_batch(batch, accum_steps)
    keep_graph = accum_steps == 1
    with torch.set_grad_enabled(keep_graph), autocast():
        outs = [_forward(net, m, loss_fn.use_caption) for m in micros]
    names = [n for n in FEATURES if n in outs[0]]
    # Leaves: the loss's backward stops here and leaves d loss / d feature in .grad.
    leaves = {n: torch.cat([o[n].detach() for o in outs]).float().requires_grad_() for n in names}
    # The model's scalars the loss takes: the scale, and the sigmoid objective's bias. Leaves too: their
    # gradients enter the graph once, in the last (synced) pass.
    scalars = SCALARS if loss_fn.objective == "sigmoid" else SCALARS[:1]
    scalar_leaves = {n: outs[0][n].detach().float().requires_grad_() for n in scalars}
    try:
        features = (leaves[n] for n in FEATURES[:2])
        res = loss_fn(
            *features,
            leaves.get("caption_features"),
            scalar_leaves["logit_scale"],
            # caption_source [B]: each sample's drawn caption source (loss.captions=sample), for the whole batch
            caption_source=batch.get("caption_source"),
            logit_bias=scalar_leaves.get("logit_bias"),
        )
        scale_loss(res["loss"]).backward()
        grads = {n: leaves[n].grad.split(micros[0]["image"].shape[0]) for n in names}
        scalar_grads = {n: leaf.grad for n, leaf in scalar_leaves.items()}
    except NonFiniteLossInputError:
        res = None
        grads = {n: torch.zeros_like(leaves[n]).split(micros[0]["image"].shape[0]) for n in names}
        scalar_grads = {n: torch.zeros_like(leaf) for n, leaf in scalar_leaves.items()}
    for i, micro in enumerate(micros):
        last = i == accum_steps - 1
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            if keep_graph:
                out = outs[0]
            else:
                with autocast():
                    out = _forward(net, micro, loss_fn.use_caption)
            tensors = [out[n] for n in names]
            tensor_grads = [grads[n][i].to(out[n].dtype) for n in names]
            if last:  # logit_scale (and bias) enter once; in the synced pass, so DDP sees every parameter used
                tensors += [out[n] for n in scalars]
                tensor_grads += [scalar_grads[n].to(out[n].dtype) for n in scalars]
            torch.autograd.backward(tensors, tensor_grads)
    return res


def all_ranks_finite(ok: bool, device: torch.device) -> bool:
    """One all-reduce: True only if every rank's gradients (and loss) are finite."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    if get_world_size() > 1:
        dist.all_reduce(flag)
    return bool(flag.item() == 0)


def gate_stats(loss_fn: AlipLoss, res: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """The loss's gate statistics as `gate/<name>` floats, in one host sync. They are computed over the
    global batch, so every rank has the same values: no reduction. NaN where the step had no loss."""
    names = loss_fn.stat_names
    if res is None or not names:
        return {f"gate/{n}": math.nan for n in names}
    values = torch.stack([res[n].detach().float().reshape(()) for n in names]).tolist()
    return {f"gate/{n}": v for n, v in zip(names, values, strict=True)}


def rank_mean(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Average scalar loss terms over ranks (each rank's loss is the mean over its own rows)."""
    keys = sorted(values)
    packed = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(device)
    if get_world_size() > 1:
        dist.all_reduce(packed)
        packed /= get_world_size()
    return dict(zip(keys, packed.tolist(), strict=True))
