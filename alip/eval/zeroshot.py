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


def score_logits(
    scores: torch.Tensor, labels: torch.Tensor, *, ties: str, logits: str, padded_rows: int = 0
) -> dict[str, Any]:
    """Classification metrics of `scores` [N, C] under a protocol's logit rule.

    `logits="int64-truncated"`: the release copies each batch's float logits into an int64 buffer,
    which truncates them toward zero (50.7 and 50.2 both become 50: a tie). `padded_rows` > 0 appends
    that many all-zero rows of class 0, the buffer rows the release's ImageNet run leaves unfilled
    and still counts (protocol.imagenet_padded_rows). Under its tie rule (topk(1) of 1000 equal
    zeros is class 0) they are hits.
    Adds `logits` and, when used, `padded_rows` to the metrics.
    """
    if logits not in ("float", "int64-truncated"):
        raise ValueError(f"logits must be 'float' or 'int64-truncated', got {logits!r}")
    truncated = logits == "int64-truncated"
    if truncated:
        scores = scores.long()  # toward zero, as a copy into an int64 tensor
    if padded_rows:
        scores = torch.cat([scores, scores.new_zeros(padded_rows, scores.shape[1])])
        labels = torch.cat([labels, labels.new_zeros(padded_rows)])
    metrics: dict[str, Any] = classification_metrics(scores, labels, ties=ties, allow_integer=truncated)
    metrics["logits"] = logits
    if padded_rows:
        metrics["padded_rows"] = padded_rows
    return metrics


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data: ClassificationData,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    num_workers: int = 4,
    precision: str = "fp32",
    ties: str = "clip_benchmark",
    logits: str = "float",
    padded_rows: int = 0,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5/mean-per-class recall on `data`, with the paper's metric marked.

    Returns the metrics plus `paper_metric` (its name) and `paper_value`, and `num_samples`.
    `data.dataset` must already carry the eval transform. Defaults: CLIP_benchmark's protocol;
    the release's is `ties="release"`, `logits="int64-truncated"` and, on ImageNet, its
    `padded_rows` (see `score_logits`).
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
    # [N, C] float32: 100 x image features @ classifier, in that order, as CLIP_benchmark and the release
    scores = (100.0 * feats) @ classifier.T
    metrics = score_logits(scores, labels, ties=ties, logits=logits, padded_rows=padded_rows)
    metrics["paper_metric"] = paper_metric(data.name)
    metrics["paper_value"] = metrics[metrics["paper_metric"]]
    return metrics
