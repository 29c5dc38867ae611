#!/usr/bin/env python
"""Cost of AlipLoss (gates + both terms, forward + backward) next to open_clip's ClipLoss, per rank; and of
the sigmoid objective (AlipLoss(objective="sigmoid")) next to open_clip's SigLipLoss.

What one rank of a W-rank job computes with local loss: B = 512 local rows (the released recipe's
per-GPU batch) against N = W * B gathered columns, 512-d features. Global batch 4096 = 8 GPUs,
32768 = 64 GPUs. The gather is emulated in memory (other ranks' features are fixed random
tensors, the local slice keeps its autograd path as with gather_with_grad), so this measures the
math, not the interconnect: ALIP gathers three feature sets where CLIP gathers two, in one
collective either way. open_clip's SigLipLoss passes text features round the ring instead (neighbour
exchange); its math, emulated here, is the local block plus one negatives-only block per other rank's
texts, B x N in all as ours. The ratio to a ViT-B/32 training step uses the bi-path forward + backward
of the towers (one image, two texts per sample, gradient checkpointing on as in the recipe),
timed at a smaller micro-batch and scaled linearly to B (the towers' cost is linear in B).

    python benchmarks/loss_cost.py                       # CPU, as recorded in RESULTS.md
    python benchmarks/loss_cost.py --device cuda --amp   # on a GPU
"""

import argparse
import json
import platform
import statistics
import time
from unittest import mock

import open_clip
import open_clip.loss
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

import alip
import alip.loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class EmulatedGather:
    """Stands in for the all_gather of rank `rank`: fixed features for the other ranks."""

    def __init__(self, rank, world, batch, dim, streams, device):
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.rank, self.batch = rank, batch
        self.others = [
            F.normalize(torch.randn(world * batch, dim, generator=gen), dim=-1).to(device) for _ in range(streams)
        ]

    def __call__(self, tensors, with_grad=False):
        lo, hi = self.rank * self.batch, (self.rank + 1) * self.batch
        return [torch.cat([o[:lo], t, o[hi:]]) for o, t in zip(self.others, tensors, strict=False)]


def loss_costs(global_batch, batch, dim, device, warmup, reps):
    world, rank = global_batch // batch, 1  # rank 1: a middle slice, like most ranks
    gather = EmulatedGather(rank, world, batch, dim, 3, device)
    feats = [F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_() for _ in range(3)]
    scale = torch.tensor(100.0, device=device, requires_grad=True)

    alip_loss = alip.AlipLoss(local_loss=True, gather_with_grad=True).to(device)

    def run_alip():
        with (
            mock.patch.object(alip.loss, "all_gather_cat", gather),
            mock.patch.object(alip.loss, "get_rank", lambda: rank),
            mock.patch.object(alip.loss, "get_world_size", lambda: world),
        ):
            alip_loss(*feats, scale)["loss"].backward()

    clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)

    def run_clip():
        fake = lambda img, txt, **kw: tuple(gather([img, txt]))  # noqa: E731
        with mock.patch.object(open_clip.loss, "gather_features", fake):
            clip_loss(feats[0], feats[1], scale).backward()

    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    sigmoid_loss = alip.AlipLoss(local_loss=True, gather_with_grad=True, objective="sigmoid").to(device)

    def run_alip_sigmoid():
        with (
            mock.patch.object(alip.loss, "all_gather_cat", gather),
            mock.patch.object(alip.loss, "get_rank", lambda: rank),
            mock.patch.object(alip.loss, "get_world_size", lambda: world),
        ):
            sigmoid_loss(*feats, scale, logit_bias=bias)["loss"].backward()

    siglip = SigLipLoss()
    texts = gather([feats[0], feats[1]])[1]  # [N, D]: this rank's texts in place, the others fixed

    def run_siglip():  # what each rank computes under the neighbour exchange, without the exchange
        loss = siglip._loss(feats[0], feats[1], scale, bias)
        for r in range(world):
            if r != rank:
                block = texts[r * batch : (r + 1) * batch]
                loss = loss + siglip._loss(feats[0], block, scale, bias, negative_only=True)
        loss.backward()

    return {
        "alip_ms": timed(run_alip, device, warmup, reps) * 1e3,
        "clip_ms": timed(run_clip, device, warmup, reps) * 1e3,
        "alip_sigmoid_ms": timed(run_alip_sigmoid, device, warmup, reps) * 1e3,
        "siglip_ms": timed(run_siglip, device, warmup, reps) * 1e3,
    }


def model_step_per_sample(model_name, micro_batch, device, amp, reps):
    torch.manual_seed(0)
    model, _, _ = alip.create_model(model_name, device=device)
    model.set_grad_checkpointing(True)
    net = alip.BiPathCLIP(model).train()
    size = model.visual.image_size[0]
    image = torch.randn(micro_batch, 3, size, size, device=device)
    text = torch.randint(1, 49406, (micro_batch, 77), device=device)
    loss_fn = alip.AlipLoss(local_loss=True).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(image, text, text.flip(0))
        loss_fn(out["image_features"], out["raw_features"], out["caption_features"], out["logit_scale"])[
            "loss"
        ].backward()

    return timed(step, device, 1, reps) / micro_batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--global-batches", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--batch", type=int, default=512, help="per-rank batch (default 512, the recipe's)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--model-micro-batch", type=int, default=16, help="micro-batch timed for the towers")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the towers")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows = []
    for n in args.global_batches:
        rows.append({"global_batch": n, **loss_costs(n, args.batch, args.dim, device, warmup=2, reps=args.reps)})
    per_sample = model_step_per_sample(args.model, args.model_micro_batch, device, args.amp, reps=3)
    step_s = per_sample * args.batch
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "model_step_s_at_batch": step_s,
        "rows": rows,
    }
    print(f"device {info['device']}, {info['threads']} threads, torch {torch.__version__}")
    print(
        f"{args.model} bi-path fwd+bwd: {per_sample * 1e3:.1f} ms/sample"
        f" (micro-batch {args.model_micro_batch})"
        f" -> {step_s:.2f} s per rank step at B={args.batch}"
    )
    print("| global batch | AlipLoss ms | ClipLoss ms | Alip/Clip | AlipLoss / model step |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['global_batch']} | {r['alip_ms']:.1f} | {r['clip_ms']:.1f}"
            f" | {r['alip_ms'] / r['clip_ms']:.2f} |"
            f" {r['alip_ms'] / 1e3 / step_s:.2%} |"
        )
    print()
    print("| global batch | AlipLoss sigmoid ms | SigLipLoss ms | Alip/SigLip | sigmoid / softmax AlipLoss |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['global_batch']} | {r['alip_sigmoid_ms']:.1f} | {r['siglip_ms']:.1f}"
            f" | {r['alip_sigmoid_ms'] / r['siglip_ms']:.2f} | {r['alip_sigmoid_ms'] / r['alip_ms']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
