"""ALIP's two gates (DESIGN.md section 4): pure weight math plus a module holding the EMA state.

Language Consistency Gate (LCG): compares raw text with the synthetic caption and gives each
sample a weight. Description Consistency Gate (DCG): compares the image with each text and gives
each image-text pair a weight. Both measure a similarity against its running mean, so "noisy"
means "less consistent than this dataset usually is", not an absolute threshold.

No logging and no I/O here: the trainer logs what the loss returns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

PAIR_GATES = ("official", "paper")


class GateWeights(NamedTuple):
    sample: torch.Tensor  # [N] LCG weight w_s, in (0, 1]
    raw: torch.Tensor  # [N] DCG image-raw-text weight w_t
    caption: torch.Tensor  # [N] DCG image-caption weight w_c


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
    every sample, as the paper's equations read.
    """
    if pair_gate not in PAIR_GATES:
        raise ValueError(f"pair_gate must be one of {PAIR_GATES}, got {pair_gate!r}")
    r = torch.exp(s_tc - mu_tc) ** power
    w_sample = r.clamp(max=1.0)
    w_raw = torch.exp(s_it - mu_it) ** power
    w_caption = torch.exp(s_ic - mu_ic) ** power
    if pair_gate == "official":
        consistent = r >= 1.0
        w_raw = torch.where(consistent, torch.ones_like(w_raw), w_raw)
        w_caption = torch.where(consistent, torch.ones_like(w_caption), w_caption)
    else:
        w_raw = w_raw.clamp(max=1.0)
        w_caption = w_caption.clamp(max=1.0)
    return GateWeights(w_sample, w_raw, w_caption)


class ConsistencyGates(nn.Module):
    """LCG + DCG with their three similarity EMAs kept as buffers, so `state_dict()` resumes them.

    The EMAs start at 1.0 (the largest cosine similarity), which makes early weights small: the
    gates trust little until the running means have settled (~1/(1-momentum) steps).
    """

    ema_tc: torch.Tensor
    ema_it: torch.Tensor
    ema_ic: torch.Tensor

    def __init__(self, momentum: float = 0.99, power: float = 2.0, pair_gate: str = "official") -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not power > 0.0:
            raise ValueError(f"power must be > 0, got {power}")
        if pair_gate not in PAIR_GATES:
            raise ValueError(f"pair_gate must be one of {PAIR_GATES}, got {pair_gate!r}")
        self.momentum = momentum
        self.power = power
        self.pair_gate = pair_gate
        # float32 whatever the model's precision: these accumulate over the whole run.
        for name in ("ema_tc", "ema_it", "ema_ic"):
            self.register_buffer(name, torch.tensor(1.0, dtype=torch.float32))

    @torch.no_grad()
    def forward(self, s_tc: torch.Tensor, s_it: torch.Tensor, s_ic: torch.Tensor, update: bool = True) -> GateWeights:
        """Weights for similarities [N] over the global batch.

        With `update`, the EMAs take this batch's means first and the weights use the updated
        values, as the released code does. `update=False` scores data under frozen state.
        """
        # At least float32: exp(.)**power of half-precision similarities loses the small differences
        # the gates are about.
        s_tc, s_it, s_ic = (s.to(torch.promote_types(s.dtype, torch.float32)) for s in (s_tc, s_it, s_ic))
        if update:
            m = self.momentum
            for ema, s in ((self.ema_tc, s_tc), (self.ema_it, s_it), (self.ema_ic, s_ic)):
                ema.copy_(m * ema + (1.0 - m) * s.mean())
        return gate_weights(
            s_tc,
            s_it,
            s_ic,
            self.ema_tc,
            self.ema_it,
            self.ema_ic,
            power=self.power,
            pair_gate=self.pair_gate,
        )

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, power={self.power}, pair_gate={self.pair_gate!r}"
