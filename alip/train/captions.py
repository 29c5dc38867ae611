"""Which caption of K sources each sample trains on (records with K caption slots; loss.captions).

With loss.captions=sample every sample takes one caption per step, drawn with the configured
probabilities. The draw is counter-based: Philox keyed by (train.seed, step) and read at the sample's
place in the global batch (rank * per-rank batch + i). So a draw depends on nothing but these three:
- not on the world size: the global batch's places are the same for W ranks x B and 1 rank x W*B;
- not on accumulation: the whole per-rank batch is drawn before it splits into micro-batches;
- not on what ran before: a resume needs only the step, which the checkpoint's TrainState holds
  (no generator state to save), and every epoch's steps get new draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from alip.config import ConfigError, LossConfig
from alip.data.format.schema import TextSlots


def slot_weights(cfg: LossConfig, slots: TextSlots, spec: str) -> tuple[float, ...] | None:
    """loss.caption_weights in slot order (None: uniform); ConfigError naming the data's slots where the
    names differ from them."""
    given = cfg.caption_weights
    if given is None:
        return None
    if set(given) != set(slots.captions):
        raise ConfigError(
            f"loss.caption_weights names {sorted(given)}, but data.train {spec} has the caption slots "
            f"{list(slots.captions)}: give each slot a weight (0 leaves it out)"
        )
    return tuple(given[name] for name in slots.captions)


def draw_sources(seed: int, step: int, start: int, count: int, probs: Sequence[float]) -> torch.Tensor:
    """The caption source [count] (int64) of the samples at places start .. start + count - 1 of the
    global batch of step `step` (0-based), drawn with `probs` (summing to 1)."""
    gen = np.random.Generator(np.random.Philox(key=np.array([seed, step], dtype=np.uint64)))
    u = gen.random(start + count)[start:]  # the i-th value is the same however many are drawn
    cumulative = np.cumsum(np.asarray(probs, dtype=np.float64))
    source = np.searchsorted(cumulative, u * cumulative[-1], side="right")  # a 0-probability source: never
    last = max(k for k, p in enumerate(probs) if p > 0)  # u * total may round up to the total
    return torch.from_numpy(np.minimum(source, last)).long()


def pick_captions(captions: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Each sample's caption of source `source` [B]: [B, K, L] -> [B, L]."""
    return captions[torch.arange(captions.shape[0], device=captions.device), source.to(captions.device)]


def with_drawn_captions(
    batch: dict[str, torch.Tensor], seed: int, step: int, start: int, probs: Sequence[float]
) -> dict[str, torch.Tensor]:
    """A batch whose samples sit at global places start, start + 1, ... with its [B, K, 77] captions
    replaced by each sample's drawn one [B, 77], and the drawn sources as "caption_source" [B]."""
    captions = batch["caption"]
    source = draw_sources(seed, step, start, captions.shape[0], probs).to(captions.device)
    return {**batch, "caption": pick_captions(captions, source), "caption_source": source}
