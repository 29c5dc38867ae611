#!/usr/bin/env python
"""Training-step time with length-aware text encoding (`model.text_trim`), ALIP next to CLIP.

For each text-length distribution, times the trainer's step (`forward_backward`, AdamW, clamp) of
ALIP (image + raw text + caption) and CLIP (image + raw text) with trimming off / batch / buckets,
and counts the FLOPs per sample of one step (forward + backward) with `torch.utils.flop_counter`.

Length distributions (tokens per text, start and end tokens included):
  a  every text 77 tokens (the padded worst case: what every step costs without trimming);
  b  captions uniform in 8..20 (OFA/BLIP captions); raw texts heavy-tailed: 77 with
     probability 0.15 (long YFCC descriptions), else round(lognormal(ln 14, 0.6)) clipped to
     3..76, which puts the median of all raw texts at 16 (printed by the script);
  c  the lengths of the demo's training texts (`alip.demo.data`, make demo's dataset).

Each configuration sees the same sequence of batches (fixed seed). Configurations alternate
within each repeat and the best of the repeats is kept, so drift in machine load hits all alike.

    python benchmarks/text_trim.py --model ViT-B-32 --batch 16 --steps 2 --repeats 2
    python benchmarks/text_trim.py --model ALIP-Tiny --batch 64        # quick check
    python benchmarks/text_trim.py --model ViT-B-32 --batch 256 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import alip
from alip.config import OptimConfig
from alip.model import quiet_random_init
from alip.train.optim import build_optimizer
from alip.train.step import forward_backward

SOT, EOT, CONTEXT = 49406, 49407, 77
MODES = ("off", "batch", "buckets")


def lengths_a(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    full = np.full(n, CONTEXT)
    return full, full.copy()


def lengths_b(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    body = np.clip(np.round(rng.lognormal(math.log(14), 0.6, n)), 3, 76)
    raw = np.where(rng.random(n) < 0.15, CONTEXT, body).astype(int)
    caption = rng.integers(8, 21, n)
    return raw, caption


def demo_lengths() -> tuple[np.ndarray, np.ndarray]:
    from alip.demo.data import DemoSpec, make_train_samples

    samples = make_train_samples(DemoSpec())
    tokenizer = alip.get_tokenizer("ViT-B-32")

    def lengths(texts: list[str]) -> np.ndarray:
        return (tokenizer(texts).argmax(dim=-1) + 1).numpy()

    return lengths([s.raw_text for s in samples]), lengths([s.caption for s in samples])


def make_lengths_c():
    raw_pool, cap_pool = demo_lengths()

    def lengths_c(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(raw_pool), n)
        return raw_pool[idx], cap_pool[idx]

    return lengths_c


def tokens_of(lengths: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    t = torch.zeros(len(lengths), CONTEXT, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        t[i, 0], t[i, n - 1] = SOT, EOT
        t[i, 1 : n - 1] = torch.randint(1, SOT, (n - 2,), generator=gen)
    return t


def batches(dist, args, image_size: int, count: int) -> list[dict]:
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        raw, cap = dist(args.batch, rng)
        image = torch.randn(args.batch, 3, image_size, image_size, generator=gen)
        out.append({"image": image, "text": tokens_of(raw, gen), "caption": tokens_of(cap, gen)})
    return out


class Step:
    """One training configuration: model, objective and trimming mode."""

    def __init__(
        self, args: argparse.Namespace, use_caption: bool, mode: str, device: torch.device, objective: str = "softmax"
    ) -> None:
        torch.manual_seed(0)
        # the sigmoid objective needs the model's learnable bias: SigLIP's start
        init = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if objective == "sigmoid" else {}
        with quiet_random_init():  # random weights are the point: timing, not accuracy
            self.clip, _, _ = alip.create_model(args.model, **init)
        self.clip.set_grad_checkpointing(args.grad_checkpointing)
        self.clip.to(device)
        self.net = alip.BiPathCLIP(self.clip, text_trim=mode, text_buckets=args.buckets)
        self.loss_fn = alip.AlipLoss(use_caption=use_caption, use_gates=use_caption, objective=objective).to(device)
        self.optimizer = build_optimizer(self.clip, OptimConfig())
        self.use_caption, self.device = use_caption, device
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def __call__(self, batch: dict) -> None:
        batch = {k: v.to(self.device) for k, v in batch.items() if self.use_caption or k != "caption"}
        forward_backward(self.net, self.loss_fn, batch, 1, self.autocast, lambda loss: loss)
        torch.nn.utils.clip_grad_norm_(self.clip.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def measure(step: Step, data: list[dict], warmup: int) -> tuple[float, float]:
    """(seconds per step, median over the timed batches; FLOPs per sample of the first batch)."""
    # The math attention backend while counting: the flop counter has no formula for the fused
    # CPU attention kernel and would miss every attention product.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step(data[0])  # also the first warm-up step
    flops = counter.get_total_flops() / data[0]["image"].shape[0]
    for batch in data[1:warmup]:
        step(batch)
    times = []
    for batch in data[warmup:]:
        step.sync()
        t0 = time.perf_counter()
        step(batch)
        step.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), flops


def run_distribution(name: str, dist, args, device: torch.device) -> list[dict]:
    with quiet_random_init():
        probe = alip.create_model(args.model)[0].visual.image_size
    image_size = probe[0] if isinstance(probe, tuple) else probe
    data = batches(dist, args, image_size, args.warmup + args.steps)
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for _ in range(args.repeats):
        for objective in ("alip", "clip"):
            for mode in MODES:
                seconds, flops = measure(Step(args, objective == "alip", mode, device), data, args.warmup)
                key = (objective, mode)
                best[key] = (min(seconds, best.get(key, (math.inf,))[0]), flops)
    rows = []
    clip_off = best[("clip", "off")][0]
    for (objective, mode), (seconds, flops) in best.items():
        rows.append(
            {
                "dist": name,
                "objective": objective,
                "text_trim": mode,
                "ms_per_step": round(1e3 * seconds, 1),
                "gflop_per_sample": round(flops / 1e9, 2),
                "time_over_clip_off": round(seconds / clip_off, 3),
                "alip_over_clip_same_mode": round(seconds / best[("clip", mode)][0], 3)
                if objective == "alip"
                else None,
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ALIP-Tiny", help="open_clip architecture (default ALIP-Tiny)")
    p.add_argument("--batch", type=int, default=32, help="samples per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first counts FLOPs)")
    p.add_argument("--repeats", type=int, default=2, help="passes over all configurations; the best is kept")
    p.add_argument("--buckets", type=int, default=4, help="model.text_buckets for the buckets mode")
    p.add_argument("--dists", default="abc", help="which length distributions to run (default: abc)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be >= 1: the first step counts FLOPs")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dists = {"a": lengths_a, "b": lengths_b, "c": make_lengths_c() if "c" in args.dists else None}
    raw_b, _ = lengths_b(100_000, np.random.default_rng(1))
    print(
        json.dumps({"dist_b_raw_median": float(np.median(raw_b)), "dist_b_raw_share_77": float(np.mean(raw_b == 77))})
    )
    for name in args.dists:
        for row in run_distribution(name, dists[name], args, device):
            print(json.dumps({"model": args.model, "batch": args.batch, "precision": args.precision, **row}))


if __name__ == "__main__":
    main()
