#!/usr/bin/env python
"""Training-loader throughput: DALI (alip.data.loaders.dali) next to the PyTorch fallback
(alip.data.loaders.torch_loader).

Writes shards of real photos (scikit-image's sample images, 300x451 to 872x1000 pixels, JPEG
quality 95, cycled to --records records) into a temporary folder, then times each loader on the
same shards in train mode: decode, random crop 0.7-1.0 of the area, resize to --image-size, flip,
normalise, batches of --batch-size. After --warmup batches (pipeline start, worker start, first
prefetch) it times --repeats windows of --batches batches and reports the median images per
second. The loaders run one after the other, each with the whole machine.

    python benchmarks/loader_throughput.py                  # DALI CPU, 2 threads vs torch, 2 workers
    python benchmarks/loader_throughput.py --json out.json  # also write the figures as JSON

Without a GPU DALI decodes on the CPU (libjpeg-turbo); on a GPU machine it decodes with nvJPEG
(`device="mixed"`), which is a different comparison.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from skimage import data as skdata

from alip.data.format import schema
from alip.data.format.recordio import RecordIOWriter
from alip.data.loaders.config import LoaderConfig

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "camera"]


def write_shards(out_dir: Path, num_records: int, per_shard: int) -> Path:
    """`num_records` records of real photos in shards of `per_shard`, plus the meta JSON; returns its path."""
    jpegs = []
    for name in PHOTOS:
        img = getattr(skdata, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img[..., :3])).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    tokens = np.zeros(schema.CONTEXT_LENGTH, np.int64)
    tokens[:3] = [49406, 320, 49407]
    infos = []
    for first in range(0, num_records, per_shard):
        stem = schema.shard_stem("bench", len(infos))
        rec, idx = out_dir / f"{stem}.rec", out_dir / f"{stem}.idx"
        with RecordIOWriter(rec, idx) as w:
            for key in range(first, min(first + per_shard, num_records)):
                w.write(key, schema.make_record(key, jpegs[key % len(jpegs)], tokens, tokens))
            count = w.count
        infos.append(schema.ShardInfo(rec.name, idx.name, count, rec.stat().st_size))
    meta = schema.meta_path(out_dir, "bench")
    schema.write_meta(meta, schema.DatasetMeta(shards=infos, tokenizer={}, source={"kind": "benchmark"}))
    return meta


def endless(loader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def measure(loader, warmup: int, batches: int, repeats: int) -> dict[str, float]:
    """Images/s over `repeats` windows of `batches` batches each, after `warmup` untimed batches."""
    stream = endless(loader)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(stream)
    warmup_s = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        t1, images = time.perf_counter(), 0
        for _ in range(batches):
            images += len(next(stream)["image"])
        rates.append(images / (time.perf_counter() - t1))
    return {
        "warmup_s": warmup_s,
        "images_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "windows": rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=448, help="records written (448)")
    parser.add_argument("--per-shard", type=int, default=128, help="records per shard (128)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (3)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per window (20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported (3)")
    parser.add_argument("--threads", type=int, default=2, help="DALI num_threads (2)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader num_workers (2)")
    parser.add_argument(
        "--prefetch", type=int, default=2, help="DALI prefetch_queue_depth / DataLoader prefetch_factor"
    )
    parser.add_argument("--loaders", nargs="+", choices=["dali", "torch"], default=["dali", "torch"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    config = LoaderConfig(
        batch_size=args.batch_size,
        image_size=args.image_size,
        num_threads=args.threads,
        num_workers=args.workers,
        prefetch=args.prefetch,
        shuffle_buffer=256,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="alip-loader-bench-") as tmp:
        meta = write_shards(Path(tmp), args.records, args.per_shard)
        for kind in args.loaders:
            if kind == "dali":
                from alip.data.loaders.dali import DaliLoader

                loader, setting = DaliLoader(meta, config, train=True), f"CPU decode, num_threads={args.threads}"
            else:
                from alip.data.loaders.torch_loader import TorchLoader

                loader, setting = TorchLoader(meta, config, train=True), f"PIL, num_workers={args.workers}"
            results.append(
                {"loader": kind, "setting": setting, **measure(loader, args.warmup, args.batches, args.repeats)}
            )
            loader.close()

    print(f"{args.records} records, batch {args.batch_size}, {args.image_size} px, train mode, {os.cpu_count()} CPUs")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}")
    print()
    print(
        f"images/s: median (min-max) of {args.repeats} windows of {args.batches} batches, after {args.warmup} batches"
    )
    print()
    print("| loader | setting | images/s | min-max | warm-up s |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        rate, low, high = r["images_per_s"], r["min"], r["max"]
        print(f"| {r['loader']} | {r['setting']} | {rate:.0f} | {low:.0f}-{high:.0f} | {r['warmup_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
