"""The ALIP adaptive contrastive loss (DESIGN.md section 4).

Per global batch of N = world_size * B samples, with L2-normalised image (v), raw-text (t) and
caption (c) features:

    loss_raw     = mean_i( w_s,i * w_t,i * l_i(v, t) )
    loss_caption = mean_i( w_s,i * w_c,i * l_i(v, c) )
    loss         = loss_raw + loss_caption

where l_i is the symmetric InfoNCE term of sample i and the weights come from `alip.gates`.

The sigmoid objective (`objective="sigmoid"`, SigLIP's pairwise loss, Zhai et al. 2023). With the
learnable scale t and bias b, z_ij = +1 for i = j and -1 otherwise, the per-sample term of a pair of
feature sets (a, b) is half its row plus half its column of pairwise terms:

    l_i(a, b) = 1/2 * sum_j [ -log sigmoid(z_ij (t a_i.b_j + b)) - log sigmoid(z_ji (t a_j.b_i + b)) ]

Every pair (i, j) is in row i and in column j, so mean_i l_i = (1/N) sum_ij -log sigmoid(z_ij (...)):
with all weights 1 it is exactly open_clip's SigLipLoss (tests/test_loss_sigmoid.py). The gates are the
softmax objective's, unchanged: w_s,i * w_t,i weights l_i(v, t) and w_s,i * w_c,i weights l_i(v, c), so a
weighted pair (i, j) counts with (w_i + w_j) / 2, the mean of the weights of the two samples it involves.

Several caption sources (records with K caption slots, `caption_sources`; issue 14). Each source k has
its own running means mu_tc^k, mu_ic^k (captioners differ in how close their captions sit to the raw
text and the image); mu_it stays one. With relative weights p_k normalised to sum 1 (`caption_weights`):

    r_i^k = exp(s_tc,i^k - mu_tc^k) ** power        w_s,i^k = min(r_i^k, 1)     (LCG of source k)
    w_s,i = sum_k p_k * w_s,i^k                     the raw-text term's sample weight
    w_t,i = the DCG of image-raw text; "official": applied where some source of p_k > 0 has r_i^k < 1
    w_c,i^k = the DCG of image-caption k against mu_ic^k; "official": applied where r_i^k < 1

    captions="all":    loss_caption = sum_k p_k * mean_i( w_s,i^k * w_c,i^k * l_i(v, c^k) )
    captions="sample": sample i brings one caption c_i of source k_i drawn with probabilities p
                       (alip.train.captions); loss_caption = mean_i( w_s,i * w_c,i * l_i(v, c) ) with
                       r_i, w_c,i against mu^{k_i} and w_s,i = min(r_i, 1); source k's EMAs move by
                       the mean over the samples that drew it (not at all when none did).
    loss_raw = mean_i( w_s,i * w_t,i * l_i(v, t) ), as with one caption.

Why the weighted mean for the raw text: the raw text is noisy to the degree it disagrees with the
captions the objective trusts, in proportion to that trust; one odd captioner does not silence a raw
text the others agree with. With K = 1 (p = (1.0,)) every formula is ALIP's, and the code computes
the same floating-point operations: results are bitwise those of the one-caption loss.

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

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alip.distributed import all_gather_cat, get_rank, get_world_size
from alip.gates import ConsistencyGates, GateWeights, SourceGateWeights

CAPTION_MODES = ("all", "sample")
OBJECTIVES = ("softmax", "sigmoid")


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


def _symmetric_sigmoid(
    a_local: torch.Tensor,
    b_local: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    row_offset: int,
    local_loss: bool,
) -> torch.Tensor:
    """Per-sample sigmoid term l_i(a, b) (module docstring); shape [B] with local loss, else [N].

    Row i of a against every b, and b_i against every a (column i), each [B, N] with local loss: the same
    memory as the softmax's two [B, N] logit blocks, and the same gather."""
    if local_loss:
        logits_ab = logit_scale * a_local @ b_all.T + logit_bias  # [B, N]: row i
        logits_ba = logit_scale * b_local @ a_all.T + logit_bias  # [B, N]: column i
    else:
        logits_ab = logit_scale * a_all @ b_all.T + logit_bias  # [N, N]
        logits_ba = logits_ab.T
    rows = torch.arange(logits_ab.shape[0], device=logits_ab.device)
    positives = rows + (row_offset if local_loss else 0)  # the column of each row's own pair
    # -log sigmoid(z x) is softplus(x) for a negative (z = -1) and softplus(x) - x for the positive: one
    # softplus over the block and the diagonal subtracted, with no [B, N] tensor of signs
    row = F.softplus(logits_ab).sum(1) - logits_ab[rows, positives]
    column = F.softplus(logits_ba).sum(1) - logits_ba[rows, positives]
    return (row + column) / 2


def caption_probabilities(weights: Sequence[float] | None, num_sources: int) -> tuple[float, ...]:
    """Relative per-source weights (uniform when None) normalised to sum 1, so the caption terms
    together weigh as much as the raw-text term, as ALIP's one caption does; K = 1 gives (1.0,)."""
    values = [1.0] * num_sources if weights is None else [float(w) for w in weights]
    if len(values) != num_sources or not all(math.isfinite(w) and w >= 0 for w in values) or not sum(values) > 0:
        raise ValueError(
            f"caption_weights must be {num_sources} non-negative numbers with a positive sum, got {list(values)}"
        )
    total = sum(values)
    return tuple(w / total for w in values)


class AlipLoss(nn.Module):
    """Adaptive contrastive loss over raw text and synthetic caption(s) with LCG/DCG gates.

    Args:
        use_caption: False gives plain CLIP on the raw text (caption features are ignored, no gates).
        use_gates: False keeps both terms with all weights 1 (the paper's "w/o adaptive weights").
        pair_gate: "official" (released code) or "paper" (clamped pair weights); see `alip.gates`.
        momentum, power: EMA momentum and exponent of the gates.
        local_loss: score only this rank's rows against the global batch (memory B x N, not N x N).
        gather_with_grad: backpropagate through the feature gather (needed for world-size invariance).
        caption_sources: the names of the K caption sources (the meta JSON's caption slots), for the
            per-source log keys; K = 1 (the default) is ALIP.
        captions: with K > 1, "all": every sample's K captions each have a contrastive term, summed
            with `caption_weights`; "sample": each sample comes with ONE caption, drawn by the caller
            with `caption_weights` as probabilities, and its source index (`caption_source`).
        caption_weights: K relative weights (default uniform), normalised to sum 1.
        objective: "softmax" (the release's InfoNCE) or "sigmoid" (SigLIP's pairwise loss, which needs the
            model's learnable `logit_bias`); the gates are the same for both (module docstring).

    Call with the L2-normalised features of this rank's samples, [B, D] each, and the *exponentiated*
    logit scale (what open_clip's CLIP.forward returns as "logit_scale"); with the sigmoid objective also
    `logit_bias=` (open_clip's "logit_bias", not exponentiated). Returns a dict with "loss"
    (scalar to backward), the terms "loss_raw"/"loss_caption", and the applied weights
    "weight_sample"/"weight_raw"/"weight_caption" over the global batch [N] (detached). With
    use_caption=False there is no caption term and no caption weight. With a caption it also returns
    the release's per-step log values, 0-dim and detached (`stat_names`): the global batch means of the
    similarities, "sim_tc_mean" (raw text-caption), "sim_it_mean" (image-raw text) and "sim_ic_mean"
    (image-caption), and with gates the EMAs the weights used, "ema_tc", "ema_it", "ema_ic".

    K > 1 sources ("all": caption features [B, K, D]; "sample": [B, D] and `caption_source` [B]): each
    source is gated against its own EMAs (see `alip.gates.source_gate_weights`), loss_caption is the
    weighted sum of the K terms ("all") or the term of the drawn captions ("sample"), weight_sample is
    the raw-text term's LCG weight, weight_caption the weighted mean (or drawn) pair weight, and every
    source has its `<name>/...` weights and statistics (`weight_names`, `stat_names`), in "all" also its
    term `loss_caption/<name>` (`loss_names`). With K = 1 every value is the one-caption loss's, bitwise.

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
        caption_sources: Sequence[str] = ("caption",),
        captions: str = "all",
        caption_weights: Sequence[float] | None = None,
        objective: str = "softmax",
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.objective = objective
        if captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
        self.caption_sources = tuple(caption_sources)
        if not self.caption_sources or len(set(self.caption_sources)) != len(self.caption_sources):
            raise ValueError(f"caption_sources must be distinct names, at least one, got {list(self.caption_sources)}")
        self.captions = captions
        self.caption_weights = caption_probabilities(caption_weights, len(self.caption_sources))
        self.use_caption = use_caption
        # The LCG compares raw text with the caption: without a caption there is nothing to gate on.
        self.use_gates = use_gates and use_caption
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        # Always built so a checkpoint's keys do not depend on the ablation.
        self.gates = ConsistencyGates(
            momentum=momentum, power=power, pair_gate=pair_gate, num_sources=len(self.caption_sources)
        )

    @property
    def num_sources(self) -> int:
        return len(self.caption_sources)

    @property
    def draws_captions(self) -> bool:
        """captions="sample" with K > 1: each sample brings one drawn caption and its source index."""
        return self.captions == "sample" and self.num_sources > 1

    def forward(
        self,
        image_features: torch.Tensor,
        raw_features: torch.Tensor,
        caption_features: torch.Tensor | None,
        logit_scale: torch.Tensor | float,
        caption_source: torch.Tensor | None = None,
        logit_bias: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        if (logit_bias is None) == (self.objective == "sigmoid"):
            need = "needs logit_bias (the model's init_logit_bias)" if logit_bias is None else "takes no logit_bias"
            raise ValueError(f"AlipLoss(objective={self.objective!r}) {need}")
        local, names = self._check_local(image_features, raw_features, caption_features, caption_source)
        rank, world_size = get_rank(), get_world_size()
        batch = image_features.shape[0]
        gathered = all_gather_cat(local, with_grad=self.gather_with_grad)  # the source index travels along
        if world_size > 1 and not self.gather_with_grad and not self.local_loss:
            # open_clip's trick: put the local tensors (which carry grad) back into the gathered copy.
            gathered = [
                torch.cat([g[: rank * batch], x, g[(rank + 1) * batch :]]) for g, x in zip(gathered, local, strict=True)
            ]
        logit_scale = torch.as_tensor(logit_scale, device=image_features.device)
        scalars = [logit_scale]
        if logit_bias is not None:
            logit_bias = torch.as_tensor(logit_bias, device=image_features.device)
            scalars.append(logit_bias)
        self._check_finite(gathered, scalars, names)

        # Loss math in at least float32: under autocast the towers emit fp16/bf16 features, and the gates'
        # exp(.)**2 and the softmax over N columns are where half precision hurts.
        dtype = torch.promote_types(local[0].dtype, torch.float32)  # float64 stays float64 (tests)
        local = [x.to(dtype) for x in local]
        gathered = [g.to(dtype) for g in gathered]
        logit_scale = logit_scale.to(dtype)
        v_all, t_all = gathered[0], gathered[1]
        use_local_rows = self.local_loss and world_size > 1
        rows = slice(rank * batch, (rank + 1) * batch) if use_local_rows else slice(None)  # this rank's weights
        # l_i(a, b) of this rank's rows, of either objective: everything below is the same for both
        ce = functools.partial(
            _symmetric_ce, logit_scale=logit_scale, row_offset=rank * batch, local_loss=use_local_rows
        )
        if self.objective == "sigmoid":
            ce = functools.partial(_symmetric_sigmoid, logit_bias=logit_bias.to(dtype), **ce.keywords)
        ce_raw = ce(local[0], local[1], v_all, t_all)

        if not self.use_caption:
            w_raw = torch.ones(v_all.shape[0], device=v_all.device)
            loss_raw = ce_raw.mean()
            return {"loss": loss_raw, "loss_raw": loss_raw, "weight_sample": w_raw, "weight_raw": w_raw}
        if self.draws_captions:
            source = gathered[3][:, 0].round().long()  # [N]; small integers, exact in any float dtype
            return self._drawn_captions(local, gathered, source, ce, ce_raw, rows)
        return self._every_caption(local, gathered, ce, ce_raw, rows)

    def _every_caption(
        self, local: list[torch.Tensor], gathered: list[torch.Tensor], ce: Callable, ce_raw: torch.Tensor, rows: slice
    ) -> dict[str, torch.Tensor]:
        """Every source's caption has its term (captions="all", and K = 1)."""
        v_all, t_all, caps = gathered[0], gathered[1], gathered[2:]
        with torch.no_grad():  # similarities are detached: the gates weight, they are not trained
            s_it = (v_all * t_all).sum(-1)  # [N] each
            s_tc, s_ic = [(t_all * c).sum(-1) for c in caps], [(v_all * c).sum(-1) for c in caps]
            if self.use_gates:
                w = self.gates.all_sources(s_tc, s_it, s_ic, self.caption_weights, update=self.training)
            else:
                one = torch.ones(v_all.shape[0], device=v_all.device)
                w = SourceGateWeights(one, one, (one,) * len(caps), (one,) * len(caps))
        terms = [
            (w_s[rows] * w_c[rows] * ce(local[0], c_local, v_all, c_all)).mean()
            for w_s, w_c, c_local, c_all in zip(w.sample_k, w.caption_k, local[2:], caps, strict=True)
        ]
        p = self.caption_weights
        loss_raw = (w.sample[rows] * w.raw[rows] * ce_raw).mean()
        loss_caption = sum(pk * term for pk, term in zip(p, terms, strict=True))  # K = 1: 1.0 * term, exact
        out = _terms(
            loss_raw, loss_caption, w.sample, w.raw, sum(pk * w_c for pk, w_c in zip(p, w.caption_k, strict=True))
        )
        if self.num_sources > 1:
            for name, w_s, w_c, term in zip(self.caption_sources, w.sample_k, w.caption_k, terms, strict=True):
                out.update({f"{name}/weight_sample": w_s, f"{name}/weight_caption": w_c, f"loss_caption/{name}": term})
        with torch.no_grad():
            out.update(self._gate_stats(s_it.mean(), [s.mean() for s in s_tc], [s.mean() for s in s_ic]))
        return out

    def _drawn_captions(
        self,
        local: list[torch.Tensor],
        gathered: list[torch.Tensor],
        source: torch.Tensor,
        ce: Callable,
        ce_raw: torch.Tensor,
        rows: slice,
    ) -> dict[str, torch.Tensor]:
        """One drawn caption per sample, of source `source` [N] (captions="sample", K > 1): ALIP's two
        terms, each sample gated against the EMAs of its caption's source."""
        v_all, t_all, c_all = gathered[:3]
        with torch.no_grad():
            s_tc, s_it, s_ic = (t_all * c_all).sum(-1), (v_all * t_all).sum(-1), (v_all * c_all).sum(-1)  # [N]
            if self.use_gates:
                w = self.gates.drawn_source(s_tc, s_it, s_ic, source, update=self.training)
            else:
                one = torch.ones(v_all.shape[0], device=v_all.device)
                w = GateWeights(one, one, one)
        ce_caption = ce(local[0], local[2], v_all, c_all)
        loss_raw = (w.sample[rows] * w.raw[rows] * ce_raw).mean()
        loss_caption = (w.sample[rows] * w.caption[rows] * ce_caption).mean()
        out = _terms(loss_raw, loss_caption, w.sample, w.raw, w.caption)
        with torch.no_grad():
            drew = [source == k for k in range(self.num_sources)]
            for name, d in zip(self.caption_sources, drew, strict=True):  # the samples that drew each source
                out.update({f"{name}/weight_sample": w.sample[d], f"{name}/weight_caption": w.caption[d]})
            out.update(
                self._gate_stats(
                    s_it.mean(), [_masked_mean(s_tc, d) for d in drew], [_masked_mean(s_ic, d) for d in drew]
                )
            )
        return out

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The loss terms `forward` returns (scalars, this rank's rows)."""
        if not self.use_caption:
            return ("loss", "loss_raw")
        per_source = self.num_sources > 1 and not self.draws_captions
        return ("loss", "loss_raw", "loss_caption", *(f"loss_caption/{n}" for n in self.caption_sources if per_source))

    @property
    def weight_names(self) -> tuple[str, ...]:
        """The gate weights `forward` returns: [N] each, a source's over the samples that drew it ("sample")."""
        if not self.use_caption:
            return ("weight_sample", "weight_raw")
        names = ["weight_sample", "weight_raw", "weight_caption"]
        if self.num_sources > 1:
            names += [f"{n}/{w}" for n in self.caption_sources for w in ("weight_sample", "weight_caption")]
        return tuple(names)

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The keys of the gate statistics `forward` returns (see `_gate_stats`)."""
        if not self.use_caption:
            return ()
        if self.num_sources == 1:
            emas = ("ema_tc", "ema_it", "ema_ic") if self.use_gates else ()
            return ("sim_tc_mean", "sim_it_mean", "sim_ic_mean", *emas)
        names = ["sim_it_mean"] + [f"{n}/sim_{x}_mean" for n in self.caption_sources for x in ("tc", "ic")]
        if self.use_gates:
            names += ["ema_it"] + [f"{n}/ema_{x}" for n in self.caption_sources for x in ("tc", "ic")]
        return tuple(names)

    def _gate_stats(
        self, sim_it: torch.Tensor, sim_tc: list[torch.Tensor], sim_ic: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """What the release logs every step: the global batch's mean similarities (per source: over its
        samples) and, with gates, the EMAs the weights of this step used (after this step's update).
        0-dim, equal on every rank. Keyed as `stat_names`."""
        g = self.gates
        if self.num_sources == 1:
            stats = {"sim_tc_mean": sim_tc[0], "sim_it_mean": sim_it, "sim_ic_mean": sim_ic[0]}
            if self.use_gates:
                stats.update(ema_tc=g.ema_tc.clone(), ema_it=g.ema_it.clone(), ema_ic=g.ema_ic.clone())
            return stats
        stats = {"sim_it_mean": sim_it}
        for k, name in enumerate(self.caption_sources):
            stats.update({f"{name}/sim_tc_mean": sim_tc[k], f"{name}/sim_ic_mean": sim_ic[k]})
        if self.use_gates:
            stats["ema_it"] = g.ema_it.clone()
            for k, name in enumerate(self.caption_sources):
                stats.update({f"{name}/ema_tc": g.ema("tc", k).clone(), f"{name}/ema_ic": g.ema("ic", k).clone()})
        return stats

    def _check_local(
        self,
        image: torch.Tensor,
        raw: torch.Tensor,
        caption: torch.Tensor | None,
        caption_source: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], list[str]]:
        """The tensors to gather, in one dtype (the gather packs them into one buffer), and their names:
        image, raw text, then the K captions ("all"), or the drawn caption and its source index ("sample")."""
        if self.use_caption and caption is None:
            raise ValueError("AlipLoss(use_caption=True) needs caption_features; pass use_caption=False for CLIP")
        feats, names = [image, raw], ["image_features", "raw_features"]
        if self.use_caption:
            captions = self._caption_list(caption, caption_source)
            feats += captions
            names += ["caption_features"] * len(captions)
        for name, x in zip(names, feats, strict=True):
            if x.ndim != 2 or x.shape != image.shape:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)}; expected [B, D] = {tuple(image.shape)} like image_features"
                )
        dtype = feats[0].dtype
        for x in feats[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
        feats = [x.to(dtype) for x in feats]
        if self.use_caption and self.draws_captions:
            feats.append(caption_source.to(dtype)[:, None])  # [B, 1]: gathered with the features, one collective
            names.append("caption_source")
        return feats, names

    def _caption_list(self, caption: torch.Tensor, caption_source: torch.Tensor | None) -> list[torch.Tensor]:
        """Caption features as [B, D] tensors: K of them ("all"; [B, K, D], or [B, D] when K = 1), or the drawn one."""
        k = self.num_sources
        if self.draws_captions:
            if caption_source is None or caption_source.shape != caption.shape[:1]:
                got = None if caption_source is None else tuple(caption_source.shape)
                raise ValueError(f"captions='sample' needs caption_source [B] (each sample's drawn source), got {got}")
            return [caption]
        if caption_source is not None:
            raise ValueError("caption_source is for captions='sample' with K > 1 caption sources")
        if caption.ndim == 3:
            if caption.shape[1] != k:
                raise ValueError(
                    f"caption_features has {caption.shape[1]} sources ([B, K, D] = {tuple(caption.shape)}); "
                    f"this loss has {k}: {list(self.caption_sources)}"
                )
            return list(caption.unbind(1))
        if k > 1:
            raise ValueError(
                f"caption_features has shape {tuple(caption.shape)}; expected [B, {k}, D] for {k} caption sources"
            )
        return [caption]

    @staticmethod
    def _check_finite(gathered: list[torch.Tensor], scalars: list[torch.Tensor], names: list[str]) -> None:
        # One host sync for all checks. Runs after the gather, so all ranks see the same tensors.
        # A sum is non-finite iff some element is NaN/inf (or the sum overflows, which L2-normalised
        # features cannot): one reduction pass instead of isfinite's full-size temporaries.
        flags = torch.stack([g.detach().sum().isfinite() for g in gathered] + [x.isfinite().all() for x in scalars])
        if not bool(flags.all()):
            flagged = zip([*names, "logit_scale", "logit_bias"][: len(flags)], flags.tolist(), strict=True)
            bad = list(dict.fromkeys(n for n, ok in flagged if not ok))  # K captions: named once
            raise NonFiniteLossInputError(f"non-finite values in {', '.join(bad)} (global batch); step skipped")


def _masked_mean(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `s` [N] where `mask`; NaN where nothing is (no host sync)."""
    return torch.where(mask, s, torch.zeros_like(s)).sum() / mask.sum()


def _terms(
    loss_raw: torch.Tensor,
    loss_caption: torch.Tensor,
    w_sample: torch.Tensor,
    w_raw: torch.Tensor,
    w_caption: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The output every K-source mode shares: the loss, its two terms and the weights they used."""
    return {
        "loss": loss_raw + loss_caption,
        "loss_raw": loss_raw,
        "loss_caption": loss_caption,
        "weight_sample": w_sample,
        "weight_raw": w_raw,
        "weight_caption": w_caption,
    }
