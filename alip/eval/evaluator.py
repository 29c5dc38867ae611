"""The evaluator the trainer calls every N steps: a fast subset of retrieval and zero-shot sets."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alip.eval.datasets import ClassificationData, Transform, load_classification
from alip.eval.retrieval import evaluate_retrieval
from alip.eval.retrieval_formats import RetrievalData, load_retrieval
from alip.eval.zeroshot import evaluate_zeroshot
from alip.model import unwrap_model

logger = logging.getLogger(__name__)

# Metrics the trainer logs (counts and names of metrics stay in the results JSON of the CLI).
_RETRIEVAL_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall")
_CLASSIFICATION_KEYS = ("top1", "top5", "mean_per_class_recall")


class Evaluator:
    """`should_run(step)` / `run(model) -> {"eval/<dataset>/<metric>": value}`.

    Every rank must call `run` (feature extraction is collective); every rank gets the same dict.
    The datasets are loaded once, at construction; `max_samples` keeps the first images of the
    retrieval set and a fixed random subset of each classification set.
    """

    def __init__(
        self,
        *,
        every_steps: int | None,
        tokenizer: Callable[[list[str]], torch.Tensor],
        transform: Transform | None,
        retrieval: Sequence[RetrievalData] = (),
        classification: Sequence[ClassificationData] = (),
        max_samples: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        num_workers: int = 2,
        precision: str = "fp32",
    ) -> None:
        if every_steps is not None and every_steps <= 0:
            raise ValueError(f"every_steps must be positive or None, got {every_steps}")
        self.every_steps = every_steps
        self.tokenizer, self.transform = tokenizer, transform
        self.retrieval = [r.head(max_samples) for r in retrieval]
        self.classification = [c.head(max_samples) for c in classification]
        self.options = dict(device=device, batch_size=batch_size, num_workers=num_workers, precision=precision)

    @classmethod
    def from_paths(
        cls,
        *,
        every_steps: int | None,
        tokenizer: Callable[[list[str]], torch.Tensor],
        transform: Transform | None,
        retrieval: str | None = None,
        retrieval_images: str | None = None,
        zeroshot: str | None = None,
        zeroshot_name: str | None = None,
        **kwargs: Any,
    ) -> Evaluator:
        """Build from the config's paths: a retrieval annotation file (images under `retrieval_images`,
        default its folder) and a classification folder (name default: the folder name, which picks
        the torchvision layout for the known datasets)."""
        ret = []
        if retrieval is not None:
            images = retrieval_images if retrieval_images is not None else str(Path(retrieval).parent)
            ret.append(load_retrieval(retrieval, images))
        cls_sets = []
        if zeroshot is not None:
            name = zeroshot_name or Path(zeroshot).name
            cls_sets.append(load_classification(name, zeroshot, "test", transform))
        return cls(
            every_steps=every_steps,
            tokenizer=tokenizer,
            transform=transform,
            retrieval=ret,
            classification=cls_sets,
            **kwargs,
        )

    def should_run(self, step: int) -> bool:
        return self.every_steps is not None and step > 0 and step % self.every_steps == 0

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict[str, float]:
        clip = unwrap_model(model)
        was_training = clip.training
        clip.eval()
        out: dict[str, float] = {}
        try:
            for data in self.retrieval:
                m = evaluate_retrieval(clip, self.tokenizer, data, self.transform, **self.options)
                out.update({f"eval/{data.name}/{k}": float(m[k]) for k in _RETRIEVAL_KEYS})
            for data in self.classification:
                m = evaluate_zeroshot(clip, self.tokenizer, data, **self.options)
                out.update({f"eval/{data.name}/{k}": float(m[k]) for k in _CLASSIFICATION_KEYS})
        finally:
            clip.train(was_training)
        logger.info("eval: %s", ", ".join(f"{k}={v:.2f}" for k, v in out.items()))
        return out
