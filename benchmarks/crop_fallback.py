#!/usr/bin/env python
"""How often the training crop gives up: the share of images that get the fallback window.

The random crop draws (area, aspect ratio) up to `data.crop_attempts` times and takes the first
window that fits inside the image; when none fits it takes the fallback window (the whole image, its
aspect ratio clamped into the range: no scale augmentation). This counts, for photos of common
shapes, how often the torch loader's loop (`alip.data.loaders.torch_loader.crop_window`, draw for
draw torchvision's RandomResizedCrop at 10 attempts) falls back, with the release's ranges (area
0.7-1.0, ratio 0.8-1.25) at 10 attempts (DALI's and torchvision's default) and at 100 (the release's,
ours). It also prints the per-draw chance a window fits, estimated from the same draws.

    .venv/bin/python benchmarks/crop_fallback.py [--samples 20000]

Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
from unittest import mock

import torch

from alip.data.loaders.config import LoaderSettings
from alip.data.loaders.torch_loader import crop_window

SHAPES = {"3:2": (400, 600), "2:3": (600, 400), "4:3": (450, 600), "1:1": (500, 500)}  # (height, width)


def fallback_share(height: int, width: int, attempts: int, samples: int) -> float:
    area, ratio = LoaderSettings().random_area, LoaderSettings().random_aspect_ratio
    torch.manual_seed(0)
    # A window that fits is placed with two torch.randint draws; the fallback window draws none.
    # Counting them tells the two apart exactly (the fallback window may equal a drawn one).
    with mock.patch.object(torch, "randint", wraps=torch.randint) as placed:
        for _ in range(samples):
            crop_window(height, width, area, ratio, attempts)
    return 1 - placed.call_count / 2 / samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000, help="crops drawn per shape and attempt count")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {args.samples} crops per cell\n")
    print("| photo (h x w) | fits per draw | falls back, 10 attempts | falls back, 100 attempts |")
    print("|---|---|---|---|")
    for name, (h, w) in SHAPES.items():
        at10, at100 = fallback_share(h, w, 10, args.samples), fallback_share(h, w, 100, args.samples)
        # P(fallback at n attempts) = (1 - p)^n, so p follows from the 10-attempt share.
        p = 1 - at10 ** (1 / 10) if at10 > 0 else float("nan")
        fits = f"{p:.3f}" if at10 > 0 else "> 0.5 (no fallback seen)"
        print(f"| {name} ({h} x {w}) | {fits} | {100 * at10:.2f}% | {100 * at100:.3f}% |")


if __name__ == "__main__":
    main()
