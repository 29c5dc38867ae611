#!/usr/bin/env python
"""Training-step throughput, ALIP next to the CLIP baseline: same model, batch, precision and machine.

Times the trainer's own step code (`alip.train.step.forward_backward`, then AdamW and the
logit-scale clamp) on synthetic batches already in memory, so the number is the model's, not the
loader's. ALIP encodes image + raw text + caption (one image pass, two text passes); CLIP encodes
image + raw text. Counting FLOPs, the ALIP/CLIP time ratio has a floor of about 1.40 for ViT-B/32
((I + 2T) / (I + T) with the text tower T at about two thirds of the image tower I); the gates are negligible.

    python benchmarks/train_throughput.py --model ALIP-Tiny --batch 64
    python benchmarks/train_throughput.py --model ViT-B-32 --batch 8 --steps 5
    python benchmarks/train_throughput.py --model ViT-B-32 --batch 256 --precision bf16 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch

import alip
from alip.config import OptimConfig
from alip.train.optim import build_optimizer
from alip.train.step import forward_backward


def synthetic_batch(batch: int, image_size: int, device: torch.device, gen: torch.Generator) -> dict:
    def tokens() -> torch.Tensor:
        t = torch.randint(1, 49000, (batch, 77), generator=gen)
        t[:, 0], t[:, 20], t[:, 21:] = 49406, 49407, 0  # start, 19 words, end, padding
        return t

    image = torch.randn(batch, 3, image_size, image_size, generator=gen)
    return {"image": image.to(device), "text": tokens().to(device), "caption": tokens().to(device)}


def time_objective(args: argparse.Namespace, use_caption: bool, device: torch.device) -> float:
    """Samples per second of `args.steps` timed training steps (after `args.warmup` untimed ones)."""
    torch.manual_seed(0)
    clip, _, _ = alip.create_model(args.model)
    clip.set_grad_checkpointing(args.grad_checkpointing)
    clip.to(device)
    net = alip.BiPathCLIP(clip)
    loss_fn = alip.AlipLoss(use_caption=use_caption, use_gates=use_caption).to(device)
    optimizer = build_optimizer(clip, OptimConfig())
    image_size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) else clip.visual.image_size
    batch = synthetic_batch(args.batch, image_size, device, torch.Generator().manual_seed(0))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def step() -> None:
        forward_backward(net, loss_fn, batch, 1, autocast, lambda loss: loss)
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch * args.steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ALIP-Tiny", help="open_clip architecture (default ALIP-Tiny)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per objective")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="alternate ALIP/CLIP this many times, keep the best")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    best = {"alip": 0.0, "clip": 0.0}
    for _ in range(args.repeats):  # alternating, so drift in machine load hits both objectives alike
        best["alip"] = max(best["alip"], time_objective(args, True, device))
        best["clip"] = max(best["clip"], time_objective(args, False, device))
    result = {
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "alip_samples_per_s": round(best["alip"], 2),
        "clip_samples_per_s": round(best["clip"], 2),
        "time_ratio_alip_over_clip": round(best["clip"] / best["alip"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
