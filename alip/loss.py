"""The ALIP adaptive contrastive loss (DESIGN.md section 4).

Per global batch of N = world_size * B samples, with L2-normalised image (v), raw-text (t) and
caption (c) features:

    loss_raw     = mean_i( w_s,i * w_t,i * l_i(v, t) )
    loss_caption = mean_i( w_s,i * w_c,i * l_i(v, c) )
    loss         = loss_raw + loss_caption

where l_i is the symmetric InfoNCE term of sample i and the weights come from `alip.gates`.

Distributed semantics. The features of all ranks are gathered in one collective. Gate weights are
computed over the gathered (global) batch, so they are identical on every rank. With
`local_loss=True` each rank scores only its own B rows against all N columns; with
`gather_with_grad=True` the gather's backward sums every rank's gradient into the local slice, and
after DDP's gradient averaging the update equals one process on the whole batch (tested in
tests/test_distributed.py, local loss on and off). `gather_with_grad=False` is open_clip's
cheaper variant and is NOT world-size invariant: without local loss the DDP-averaged gradient of
the towers is the single-process one divided by world_size while logit_scale's is not (Adam barely
notices, grad clipping does): that is the release's mode (its train.py defaults, local_loss=False
and gather_with_grad=False), which configs/yfcc15m_vitb32_alip_release.yaml selects. With local loss
and no gather gradient, the gradient through other ranks' negatives is dropped altogether.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alip.distributed import all_gather_cat, get_rank, get_world_size
from alip.gates import ConsistencyGates


class NonFiniteLossInputError(FloatingPointError):
    """Features or logit scale are NaN/inf. Raised identically on every rank (the check runs on
    gathered tensors), so the trainer can skip the step everywhere without a rank hanging in a
    collective."""


def _symmetric_ce(
    a_local: torch.Tensor,
    b_local: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor,
    row_offset: int,
    local_loss: bool,
) -> torch.Tensor:
    """Per-sample symmetric cross-entropy l_i(a, b); shape [B] with local loss, else [N]."""
    if local_loss:
        logits_ab = logit_scale * a_local @ b_all.T  # [B, N]
        logits_ba = logit_scale * b_local @ a_all.T  # [B, N]
        labels = torch.arange(a_local.shape[0], device=a_local.device) + row_offset
    else:
        logits_ab = logit_scale * a_all @ b_all.T  # [N, N]
        logits_ba = logits_ab.T
        labels = torch.arange(a_all.shape[0], device=a_all.device)
    return (
        F.cross_entropy(logits_ab, labels, reduction="none") + F.cross_entropy(logits_ba, labels, reduction="none")
    ) / 2


class AlipLoss(nn.Module):
    """Adaptive contrastive loss over raw text and synthetic caption with LCG/DCG gates.

    Args:
        use_caption: False gives plain CLIP on the raw text (caption features are ignored, no gates).
        use_gates: False keeps both terms with all weights 1 (the paper's "w/o adaptive weights").
        pair_gate: "official" (released code) or "paper" (clamped pair weights); see `alip.gates`.
        momentum, power: EMA momentum and exponent of the gates.
        local_loss: score only this rank's rows against the global batch (memory B x N, not N x N).
        gather_with_grad: backpropagate through the feature gather (needed for world-size invariance).

    Call with the L2-normalised features of this rank's samples, [B, D] each, and the *exponentiated*
    logit scale (what open_clip's CLIP.forward returns as "logit_scale"). Returns a dict with "loss"
    (scalar to backward), the terms "loss_raw"/"loss_caption", and the applied weights
    "weight_sample"/"weight_raw"/"weight_caption" over the global batch [N] (detached). With
    use_caption=False there is no caption term and no caption weight. With a caption it also returns
    the release's per-step log values, 0-dim and detached (`stat_names`): the global batch means of the
    similarities, "sim_tc_mean" (raw text-caption), "sim_it_mean" (image-raw text) and "sim_ic_mean"
    (image-caption), and with gates the EMAs the weights used, "ema_tc", "ema_it", "ema_ic".

    In train mode each call moves the gate EMAs (once per optimizer step: with gradient
    accumulation, call it once on the whole batch's features). In eval mode they stay frozen,
    which is how a trained model's gates score data. Every rank must pass the same B.
    """

    def __init__(
        self,
        use_caption: bool = True,
        use_gates: bool = True,
        pair_gate: str = "official",
        momentum: float = 0.99,
        power: float = 2.0,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        self.use_caption = use_caption
        # The LCG compares raw text with the caption: without a caption there is nothing to gate on.
        self.use_gates = use_gates and use_caption
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        # Always built so a checkpoint's keys do not depend on the ablation.
        self.gates = ConsistencyGates(momentum=momentum, power=power, pair_gate=pair_gate)

    def forward(
        self,
        image_features: torch.Tensor,
        raw_features: torch.Tensor,
        caption_features: torch.Tensor | None,
        logit_scale: torch.Tensor | float,
    ) -> dict[str, torch.Tensor]:
        local = self._check_local(image_features, raw_features, caption_features)
        rank, world_size = get_rank(), get_world_size()
        batch = image_features.shape[0]
        gathered = all_gather_cat(local, with_grad=self.gather_with_grad)
        if world_size > 1 and not self.gather_with_grad and not self.local_loss:
            # open_clip's trick: put the local tensors (which carry grad) back into the gathered copy.
            gathered = [
                torch.cat([g[: rank * batch], x, g[(rank + 1) * batch :]]) for g, x in zip(gathered, local, strict=True)
            ]
        logit_scale = torch.as_tensor(logit_scale, device=image_features.device)
        self._check_finite(gathered, logit_scale)

        # Loss math in at least float32: under autocast the towers emit fp16/bf16 features, and the gates'
        # exp(.)**2 and the softmax over N columns are where half precision hurts.
        dtype = torch.promote_types(local[0].dtype, torch.float32)  # float64 stays float64 (tests)
        local = [x.to(dtype) for x in local]
        gathered = [g.to(dtype) for g in gathered]
        logit_scale = logit_scale.to(dtype)
        v_all, t_all = gathered[0], gathered[1]
        use_local_rows = self.local_loss and world_size > 1
        rows = slice(rank * batch, (rank + 1) * batch) if use_local_rows else slice(None)  # this rank's weights
        ce_raw = _symmetric_ce(local[0], local[1], v_all, t_all, logit_scale, rank * batch, use_local_rows)

        if not self.use_caption:
            w_raw = torch.ones(v_all.shape[0], device=v_all.device)
            loss_raw = ce_raw.mean()
            return {"loss": loss_raw, "loss_raw": loss_raw, "weight_sample": w_raw, "weight_raw": w_raw}

        c_all = gathered[2]
        with torch.no_grad():  # similarities are detached: the gates weight, they are not trained
            sims = ((t_all * c_all).sum(-1), (v_all * t_all).sum(-1), (v_all * c_all).sum(-1))  # s_tc, s_it, s_ic [N]
            if self.use_gates:
                w_sample, w_raw, w_caption = self.gates(*sims, update=self.training)
            else:
                w_sample = w_raw = w_caption = torch.ones(v_all.shape[0], device=v_all.device)
        ce_caption = _symmetric_ce(local[0], local[2], v_all, c_all, logit_scale, rank * batch, use_local_rows)
        loss_raw = (w_sample[rows] * w_raw[rows] * ce_raw).mean()
        loss_caption = (w_sample[rows] * w_caption[rows] * ce_caption).mean()
        return {
            "loss": loss_raw + loss_caption,
            "loss_raw": loss_raw,
            "loss_caption": loss_caption,
            "weight_sample": w_sample,
            "weight_raw": w_raw,
            "weight_caption": w_caption,
            **self._gate_stats(sims),
        }

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The keys of the gate statistics `forward` returns (see `_gate_stats`)."""
        if not self.use_caption:
            return ()
        emas = ("ema_tc", "ema_it", "ema_ic") if self.use_gates else ()
        return ("sim_tc_mean", "sim_it_mean", "sim_ic_mean", *emas)

    @torch.no_grad()
    def _gate_stats(self, sims: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """What the release logs every step: the global batch's mean similarities and, with gates, the
        EMAs the weights of this step used (after this step's update). 0-dim, equal on every rank."""
        stats = dict(zip(("sim_tc_mean", "sim_it_mean", "sim_ic_mean"), (s.mean() for s in sims), strict=True))
        if self.use_gates:
            g = self.gates
            stats.update(ema_tc=g.ema_tc.clone(), ema_it=g.ema_it.clone(), ema_ic=g.ema_ic.clone())
        return stats

    def _check_local(self, image: torch.Tensor, raw: torch.Tensor, caption: torch.Tensor | None) -> list[torch.Tensor]:
        if self.use_caption and caption is None:
            raise ValueError("AlipLoss(use_caption=True) needs caption_features; pass use_caption=False for CLIP")
        feats = [image, raw] + ([caption] if self.use_caption else [])
        names = ["image_features", "raw_features", "caption_features"]
        for name, x in zip(names, feats, strict=False):  # no caption with use_caption=False
            if x.ndim != 2 or x.shape != image.shape:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}; expected [B, D] = {tuple(image.shape)} like image_features"
                )
        dtype = feats[0].dtype
        for x in feats[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
        return [x.to(dtype) for x in feats]  # one dtype, so the gather can pack them into one buffer

    @staticmethod
    def _check_finite(gathered: list[torch.Tensor], logit_scale: torch.Tensor) -> None:
        # One host sync for all checks. Runs after the gather, so all ranks see the same tensors.
        # A sum is non-finite iff some element is NaN/inf (or the sum overflows, which L2-normalised
        # features cannot): one reduction pass instead of isfinite's full-size temporaries.
        flags = torch.stack([g.detach().sum().isfinite() for g in gathered] + [logit_scale.isfinite().all()])
        if not bool(flags.all()):
            names = ["image_features", "raw_features", "caption_features"][: len(gathered)] + ["logit_scale"]
            bad = [n for n, ok in zip(names, flags.tolist(), strict=True) if not ok]
            raise NonFiniteLossInputError(f"non-finite values in {', '.join(bad)} (global batch); step skipped")
