"""Zero-shot classification: a classifier built from prompt templates, scored on image features."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alip.eval.datasets import ClassificationData
from alip.eval.features import TensorRows, extract_features, image_encoder, text_encoder
from alip.eval.metrics import classification_metrics, paper_metric

logger = logging.getLogger(__name__)


@torch.no_grad()
def build_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    precision: str = "fp32",
) -> torch.Tensor:
    """CLIP's zero-shot head: per class, the renormalised mean of its normalised prompt embeddings.

    Templates hold `{c}` where the class name goes. Returns [C, D] float32 (rows unit norm).
    The prompts are encoded sharded over the ranks like the images.
    """
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]  # class-major: [C * T]
    tokens = tokenizer(prompts)  # [C * T, L]
    feats, _ = extract_features(
        TensorRows(tokens),
        text_encoder(model),
        device=device,
        batch_size=batch_size,
        num_workers=0,
        precision=precision,
        desc="class prompts",
    )
    per_class = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(per_class, dim=-1)


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data: ClassificationData,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    num_workers: int = 4,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Zero-shot top-1/top-5/mean-per-class recall on `data`, with the paper's metric marked.

    Returns the metrics plus `paper_metric` (its name) and `paper_value`, and `num_samples`.
    `data.dataset` must already carry the model's eval transform.
    """
    model.eval()
    classifier = build_classifier(
        model, tokenizer, data.classnames, data.templates, device=device, batch_size=batch_size, precision=precision
    )
    feats, labels = extract_features(
        data.dataset,
        image_encoder(model),
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        with_labels=True,
        desc=f"{data.name} images",
    )
    logits = feats @ classifier.T  # [N, C] float32 cosine similarities (scale does not change ranks)
    metrics: dict[str, Any] = classification_metrics(logits, labels)
    metrics["paper_metric"] = paper_metric(data.name)
    metrics["paper_value"] = metrics[metrics["paper_metric"]]
    return metrics
