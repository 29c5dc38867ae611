"""Model FLOPs of a training step, counted analytically, and the MFU they give on a known GPU.

Counting from the architecture costs nothing per step, and it can follow the text lengths that
the trimmed text tower actually computed (alip.text_trim). tests/test_flops.py checks the count
against `torch.utils.flop_counter` on real forwards.

Conventions, as in PaLM's MFU and torchtitan: a multiply-add is 2 FLOPs; the backward costs twice
the forward, so a training step is 3x the forward; the recomputation of gradient checkpointing is
*not* counted (it is hardware work, not model work). Only matrix products count (linear layers,
attention, the patch convolution); norms, softmax and the loss are a fraction of a percent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Dense bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
# V100 has no bf16: its fp16 peak is the one a mixed-precision run can reach. Order matters:
# the first match wins ("H100 PCIe" and "H100 NVL" before "H100", the SXM part). H100 NVL: NVIDIA's
# H100 datasheet gives 1,671 TFLOPS bf16 with sparsity per GPU, so 835.5 dense.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("V100", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of a GPU named like torch.cuda.get_device_name(), or None if not in the table."""
    for key, peak in PEAK_TFLOPS_BF16:
        if key in device_name:
            return peak
    return None


def transformer_flops(tokens: int, width: int, layers: int, mlp_width: int) -> float:
    """Forward FLOPs of `layers` pre-norm blocks over one sequence of `tokens`."""
    projections = 2 * tokens * width * (4 * width)  # q, k, v and out: 4 width x width matrices
    attention = 2 * 2 * tokens * tokens * width  # scores q k^T and the weighted sum over v
    mlp = 2 * 2 * tokens * width * mlp_width
    return layers * (projections + attention + mlp)


def _blocks(transformer: nn.Module) -> tuple[int, int, int]:
    block = transformer.resblocks[0]
    return transformer.width, len(transformer.resblocks), block.mlp.c_fc.out_features


def image_flops(clip: nn.Module) -> float:
    """Forward FLOPs of the image tower for one image (open_clip VisionTransformer)."""
    visual = clip.visual
    width, layers, mlp = _blocks(visual.transformer)
    conv = visual.conv1
    patches = visual.positional_embedding.shape[0] - 1  # minus the class token
    patch_embed = 2 * patches * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    proj = visual.proj
    head = 2 * proj.shape[0] * proj.shape[1] if proj is not None else 0
    return patch_embed + transformer_flops(patches + 1, width, layers, mlp) + head


def text_flops(clip: nn.Module, length: int) -> float:
    """Forward FLOPs of the text tower for one text computed over `length` tokens."""
    width, layers, mlp = _blocks(clip.transformer)
    proj = clip.text_projection
    shape = proj.weight.shape if isinstance(proj, nn.Linear) else proj.shape
    return transformer_flops(length, width, layers, mlp) + 2 * shape[0] * shape[1]


def supports_count(clip: nn.Module) -> bool:
    """True for open_clip CLIP models with a ViT image tower and the built-in text transformer."""
    try:
        image_flops(clip)
        text_flops(clip, 1)
    except (AttributeError, IndexError, TypeError):
        return False
    return True


def step_flops(clip: nn.Module, images: int, text_calls: Sequence[tuple[int, int]]) -> float:
    """Model FLOPs of one training step (forward + backward): `images` images and the text tower
    calls `text_calls`, each (number of texts, tokens computed per text)."""
    forward = images * image_flops(clip) + sum(n * text_flops(clip, length) for n, length in text_calls)
    return 3.0 * forward


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device))
