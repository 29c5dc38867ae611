#!/usr/bin/env python
"""The sigmoid objective's communication: our one all-gather vs open_clip's neighbour exchange, per step.

AlipLoss(objective="sigmoid") gathers the image, raw-text and caption features of the global batch in one
collective (alip.distributed.all_gather_cat, the softmax objective's gather): the gates need every sample's
similarities, and each rank then scores its B rows and B columns against all N. open_clip's SigLipLoss
instead passes the text features round the ring (W - 1 exchanges; "bidir" halves the rounds), the image
features staying home. For ALIP's two sigmoid terms an exchange would carry the raw text and the caption
(2 x D per sample), and the gates' EMAs would still need an all-reduce of the batch means.

Analytically, per rank and step, forward (the backward sends as much again):
    all-gather:          (W - 1) x B x 3D floats received, one collective
    neighbour exchange:  (W - 1) x B x 2D floats received, W - 1 (bidir: ceil((W - 1) / 2)) rounds
Measured: both on gloo, W processes on this machine, the features fp32, forward and backward.

    python benchmarks/sigmoid_comm.py                    # W = 8, B = 512, D = 512 (the recipe's per-GPU batch)
    python benchmarks/sigmoid_comm.py --world 2 4 8 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.loss import neighbour_exchange_bidir_with_grad, neighbour_exchange_with_grad

from alip.distributed import all_gather_cat


def analytic(world: int, batch: int, dim: int) -> dict:
    mib = 4 / 2**20  # fp32
    return {
        "world": world,
        "all_gather_mib": (world - 1) * batch * 3 * dim * mib,
        "exchange_mib": (world - 1) * batch * 2 * dim * mib,
        "all_gather_calls": 1,
        "exchange_rounds_bidir": (world - 1 + 1) // 2,
    }


def _exchange(texts: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """open_clip SigLipLoss's "bidir" ring for each text feature set: every other rank's block arrives once."""
    left, right = (rank - 1) % world, (rank + 1) % world
    received = []
    for t in texts:
        to_left = to_right = t
        bidir, remainder = divmod(world - 1, 2)
        for _ in range(bidir):
            got = neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
            received += got
            to_left, to_right = got
        if remainder:
            received.append(neighbour_exchange_with_grad(left, right, to_right))
    return received


def _worker(rank: int, world: int, port: int, batch: int, dim: int, reps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    feats = [torch.randn(batch, dim, requires_grad=True) for _ in range(3)]
    # a dense upstream gradient, as a loss gives (a plain sum's is a broadcast view, which the P2P sends refuse)
    weight = torch.randn(batch, dim)

    def gather() -> None:
        sum((g * weight.repeat(world, 1)).sum() for g in all_gather_cat(feats, with_grad=True)).backward()

    def exchange() -> None:
        sum((g * weight).sum() for g in _exchange(feats[1:], rank, world)).backward()

    times = {}
    for name, fn in (("all_gather", gather), ("exchange", exchange)):
        fn()  # warm-up
        runs = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def measure(world: int, batch: int, dim: int, reps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(world, port, batch, dim, reps, queue), nprocs=world, join=True, start_method="spawn"
    )
    times = queue.get()
    return {f"{k}_ms": v * 1e3 for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[8])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    rows = [{**analytic(w, args.batch, args.dim), **measure(w, args.batch, args.dim, args.reps)} for w in args.world]
    print(f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, gloo, torch {torch.__version__}")
    print(f"B = {args.batch} per rank, D = {args.dim}, fp32, forward + backward, median of {args.reps}")
    print("| ranks | all-gather MiB in | exchange MiB in | exchange rounds | all-gather ms | exchange ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['world']} | {r['all_gather_mib']:.1f} | {r['exchange_mib']:.1f} | {r['exchange_rounds_bidir']}"
            f" | {r['all_gather_ms']:.1f} | {r['exchange_ms']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
