"""Zero-shot image-text retrieval: R@1/5/10 in both directions.

The protocol options (alip.eval.protocol) enter here: `caption_prefix` goes before every caption
before tokenizing (the release's 'a photo of '), and `ties` picks the metric's tie rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from alip.eval.datasets import Transform
from alip.eval.features import TensorRows, extract_features, image_encoder, text_encoder
from alip.eval.metrics import retrieval_metrics
from alip.eval.retrieval_formats import RetrievalData


def retrieval_features(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data: RetrievalData,
    transform: Transform | None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    num_workers: int = 4,
    precision: str = "fp32",
    caption_prefix: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features [N_img, D] and features of `caption_prefix + caption` [N_txt, D], in data order."""
    model.eval()
    kw = dict(device=device, batch_size=batch_size, precision=precision)
    images, _ = extract_features(
        data.image_dataset(transform), image_encoder(model), num_workers=num_workers, desc=f"{data.name} images", **kw
    )
    texts, _ = extract_features(
        TensorRows(tokenizer([caption_prefix + c for c in data.captions])),
        text_encoder(model),
        num_workers=0,
        desc=f"{data.name} captions",
        **kw,
    )
    return images, texts


def evaluate_retrieval(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data: RetrievalData,
    transform: Transform | None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    num_workers: int = 4,
    precision: str = "fp32",
    caption_prefix: str = "",
    ties: str = "clip_benchmark",
) -> dict[str, Any]:
    """`i2t_R@{1,5,10}`, `t2i_R@{1,5,10}`, `mean_recall` (percent), `num_images`, `num_texts`.

    Defaults: CLIP_benchmark's protocol (no prefix, its ties); the release's is
    `caption_prefix="a photo of "`, `ties="release"`.
    """
    images, texts = retrieval_features(
        model,
        tokenizer,
        data,
        transform,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        caption_prefix=caption_prefix,
    )
    # The similarity matrix (25k x 5k for COCO) is cheap on the accelerator when there is one.
    metric_device = torch.device(device)
    similarity = images.to(metric_device) @ texts.to(metric_device).T  # [N_img, N_txt]
    metrics: dict[str, Any] = retrieval_metrics(similarity, torch.as_tensor(data.text_to_image), ties=ties)
    metrics.update(num_images=len(data.images), num_texts=len(data.captions))
    return metrics
