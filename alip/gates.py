"""ALIP's two gates (DESIGN.md section 4): pure weight math plus a module holding the EMA state.

Language Consistency Gate (LCG): compares raw text with the synthetic caption and gives each
sample a weight. Description Consistency Gate (DCG): compares the image with each text and gives
each image-text pair a weight. Both measure a similarity against its running mean, so "noisy"
means "less consistent than this dataset usually is", not an absolute threshold.

No logging and no I/O here: the trainer logs what the loss returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

PAIR_GATES = ("official", "paper")


class GateWeights(NamedTuple):
    sample: torch.Tensor  # [N] LCG weight w_s, in (0, 1]
    raw: torch.Tensor  # [N] DCG image-raw-text weight w_t
    caption: torch.Tensor  # [N] DCG image-caption weight w_c


def _pair_weight(
    s: torch.Tensor, mu: torch.Tensor | float, power: float, consistent: torch.Tensor, pair_gate: str
) -> torch.Tensor:
    """DCG weight of one image-text pair [N]: exp(s - mu) ** power, applied where the LCG flags the sample
    ("official": 1 where `consistent`, unclamped elsewhere) or clamped at 1 everywhere ("paper")."""
    w = torch.exp(s - mu) ** power
    if pair_gate == "official":
        return torch.where(consistent, torch.ones_like(w), w)
    return w.clamp(max=1.0)


def gate_weights(
    s_tc: torch.Tensor,
    s_it: torch.Tensor,
    s_ic: torch.Tensor,
    mu_tc: torch.Tensor | float,
    mu_it: torch.Tensor | float,
    mu_ic: torch.Tensor | float,
    power: float = 2.0,
    pair_gate: str = "official",
) -> GateWeights:
    """Gate weights from per-sample cosine similarities [N] and their running means.

    pair_gate="official" reproduces the released code: a pair weight is applied only to samples the
    LCG flags (r < 1) and is not clamped, so it can exceed 1. pair_gate="paper" clamps it at 1 for
    every sample, as the paper's equations read. The means may also be per-sample tensors [N] (the
    running mean of each sample's caption source, see `ConsistencyGates.drawn_source`).
    """
    if pair_gate not in PAIR_GATES:
        raise ValueError(f"pair_gate must be one of {PAIR_GATES}, got {pair_gate!r}")
    r = torch.exp(s_tc - mu_tc) ** power
    consistent = r >= 1.0
    w_raw = _pair_weight(s_it, mu_it, power, consistent, pair_gate)
    w_caption = _pair_weight(s_ic, mu_ic, power, consistent, pair_gate)
    return GateWeights(r.clamp(max=1.0), w_raw, w_caption)


class SourceGateWeights(NamedTuple):
    """Gate weights over K caption sources (`source_gate_weights`)."""

    sample: torch.Tensor  # [N] the raw-text term's LCG weight: the sources' LCG weights, weighted mean
    raw: torch.Tensor  # [N] DCG image-raw-text weight
    sample_k: tuple[torch.Tensor, ...]  # K x [N] LCG weight of each source: its caption term's sample weight
    caption_k: tuple[torch.Tensor, ...]  # K x [N] DCG image-caption weight of each source


def source_gate_weights(
    s_tc: Sequence[torch.Tensor],
    s_it: torch.Tensor,
    s_ic: Sequence[torch.Tensor],
    mu_tc: Sequence[torch.Tensor | float],
    mu_it: torch.Tensor | float,
    mu_ic: Sequence[torch.Tensor | float],
    probs: Sequence[float],
    power: float = 2.0,
    pair_gate: str = "official",
) -> SourceGateWeights:
    """Gate weights with K caption sources: K similarities [N] and running means each for tc and ic.

    Source k is gated as ALIP gates its one caption, against its own means (captioners differ in how
    similar their captions are to the raw text and the image): w_s^k = min(r^k, 1), w_c^k. The raw text
    has one term, whose sample weight is the mean of the w_s^k weighted by `probs` (summing to 1):
    a raw text that disagrees with the captions the objective trusts most loses the most weight. The
    raw-text pair gate ("official") applies where some source of positive weight flags the sample
    (r^k < 1). With K = 1 (probs (1.0,)) every value equals `gate_weights` bitwise.
    """
    per = [
        gate_weights(tc, s_it, ic, m_tc, mu_it, m_ic, power, pair_gate)
        for tc, ic, m_tc, m_ic in zip(s_tc, s_ic, mu_tc, mu_ic, strict=True)
    ]
    sample = sum(p * g.sample for p, g in zip(probs, per, strict=True))
    # min(r, 1) >= 1 exactly where r >= 1; a zero-weight source does not flag anything
    consistent = torch.stack([g.sample >= 1.0 for p, g in zip(probs, per, strict=True) if p > 0]).all(0)
    raw = _pair_weight(s_it, mu_it, power, consistent, pair_gate)
    return SourceGateWeights(sample, raw, tuple(g.sample for g in per), tuple(g.caption for g in per))


class ConsistencyGates(nn.Module):
    """LCG + DCG with their similarity EMAs kept as buffers, so `state_dict()` resumes them.

    The EMAs start at 1.0 (the largest cosine similarity), which makes early weights small: the
    gates trust little until the running means have settled (~1/(1-momentum) steps).

    With K = `num_sources` caption sources, each source keeps its own mu_tc and mu_ic; mu_it (image
    and raw text) stays one. Source 0's are the release's buffers `ema_tc` and `ema_ic`, so K = 1
    state dicts are unchanged and tools reading those keys (alip score scores the first caption
    slot) see the first source's; source k >= 1 has `ema_tc_{k}` and `ema_ic_{k}`.
    """

    ema_tc: torch.Tensor
    ema_it: torch.Tensor
    ema_ic: torch.Tensor

    def __init__(
        self, momentum: float = 0.99, power: float = 2.0, pair_gate: str = "official", num_sources: int = 1
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not power > 0.0:
            raise ValueError(f"power must be > 0, got {power}")
        if pair_gate not in PAIR_GATES:
            raise ValueError(f"pair_gate must be one of {PAIR_GATES}, got {pair_gate!r}")
        if num_sources < 1:
            raise ValueError(f"num_sources must be >= 1, got {num_sources}")
        self.momentum = momentum
        self.power = power
        self.pair_gate = pair_gate
        self.num_sources = num_sources
        # float32 whatever the model's precision: these accumulate over the whole run.
        names = ["ema_tc", "ema_it", "ema_ic"] + [f"ema_{x}_{k}" for k in range(1, num_sources) for x in ("tc", "ic")]
        for name in names:
            self.register_buffer(name, torch.tensor(1.0, dtype=torch.float32))

    def ema(self, kind: str, source: int = 0) -> torch.Tensor:
        """The running mean of "tc" or "ic" similarities of caption source `source` (0-dim buffer)."""
        return getattr(self, f"ema_{kind}" if source == 0 else f"ema_{kind}_{source}")

    @torch.no_grad()
    def forward(self, s_tc: torch.Tensor, s_it: torch.Tensor, s_ic: torch.Tensor, update: bool = True) -> GateWeights:
        """Weights for similarities [N] over the global batch (one caption source).

        With `update`, the EMAs take this batch's means first and the weights use the updated
        values, as the released code does. `update=False` scores data under frozen state.
        """
        if self.num_sources != 1:
            raise ValueError(f"these gates have {self.num_sources} caption sources: use all_sources or drawn_source")
        w = self.all_sources([s_tc], s_it, [s_ic], (1.0,), update)
        return GateWeights(w.sample, w.raw, w.caption_k[0])

    @torch.no_grad()
    def all_sources(
        self,
        s_tc: Sequence[torch.Tensor],
        s_it: torch.Tensor,
        s_ic: Sequence[torch.Tensor],
        probs: Sequence[float],
        update: bool = True,
    ) -> SourceGateWeights:
        """Every sample with every source's caption: K similarities [N] each for tc and ic (`source_gate_weights`)."""
        # At least float32: exp(.)**power of half-precision similarities loses the small differences
        # the gates are about.
        s_tc, s_ic = [_at_least_float32(s) for s in s_tc], [_at_least_float32(s) for s in s_ic]
        s_it = _at_least_float32(s_it)
        if update:
            moves = [(self.ema_it, s_it)]
            for k, (tc, ic) in enumerate(zip(s_tc, s_ic, strict=True)):
                moves += [(self.ema("tc", k), tc), (self.ema("ic", k), ic)]
            m = self.momentum
            for ema, s in moves:
                ema.copy_(m * ema + (1.0 - m) * s.mean())
        k = range(len(s_tc))
        mu_tc, mu_ic = [self.ema("tc", i) for i in k], [self.ema("ic", i) for i in k]
        return source_gate_weights(s_tc, s_it, s_ic, mu_tc, self.ema_it, mu_ic, probs, self.power, self.pair_gate)

    @torch.no_grad()
    def drawn_source(
        self, s_tc: torch.Tensor, s_it: torch.Tensor, s_ic: torch.Tensor, source: torch.Tensor, update: bool = True
    ) -> GateWeights:
        """One caption per sample, of source `source[i]` [N] (loss.captions=sample): each sample is gated
        against its source's means. Source k's EMAs move by the mean over the samples that drew it; a source
        no sample drew keeps its EMAs (a masked mean, so no host sync)."""
        s_tc, s_it, s_ic = (_at_least_float32(s) for s in (s_tc, s_it, s_ic))
        if update:
            m = self.momentum
            self.ema_it.copy_(m * self.ema_it + (1.0 - m) * s_it.mean())
            for k in range(self.num_sources):
                drew = source == k
                count = drew.sum()
                for ema, s in ((self.ema("tc", k), s_tc), (self.ema("ic", k), s_ic)):
                    mean = torch.where(drew, s, torch.zeros_like(s)).sum() / count.clamp(min=1)
                    ema.copy_(torch.where(count > 0, m * ema + (1.0 - m) * mean, ema))
        sources = range(self.num_sources)
        mu_tc = torch.stack([self.ema("tc", k) for k in sources])[source]  # [N] each sample's source's mean
        mu_ic = torch.stack([self.ema("ic", k) for k in sources])[source]
        return gate_weights(s_tc, s_it, s_ic, mu_tc, self.ema_it, mu_ic, self.power, self.pair_gate)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, power={self.power}, pair_gate={self.pair_gate!r}"


def _at_least_float32(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.promote_types(s.dtype, torch.float32))
