#!/usr/bin/env python
"""data2rec throughput in images/s per worker process, on real-size photos.

Makes N distinct ~500x375 JPEGs (random crops of the scikit-image sample photos, quality 90,
the size of a Flickr "medium" image as in YFCC15M). Then it times the shard-writing phase of
alip.data.ingest.convert: full decode and validation, tokenising both texts, and writing the records.
Per-worker figures count only the time inside the workers; the wall figure adds their start-up.
Indexing is not counted. Three cases:
  - passthrough: input JPEGs go into the shards unchanged (the common case), 1 worker;
  - re-encode: --max-side 256 forces decode + resize + JPEG encode, 1 worker;
  - passthrough with one worker per core.

    python benchmarks/data2rec_throughput.py            # figures in RESULTS.md
    python benchmarks/data2rec_throughput.py --images 2000 --json out.json
"""

import argparse
import io
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from skimage import data as skdata

from alip.data.ingest.convert import ConvertOptions, convert
from alip.data.ingest.sources import Columns

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "camera"]


def make_photos(root: Path, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    sources = []
    for name in PHOTOS:
        img = getattr(skdata, name)()
        sources.append(Image.fromarray(img).convert("RGB"))
    rows = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (root / f"{i}.jpg").write_bytes(buf.getvalue())
        rows.append({"image": f"{i}.jpg", "text": f"flickr photo {i} #travel", "caption": f"a photo number {i}"})
    return rows


def run_case(manifest: Path, images: Path, out: Path, workers: int, max_side: int | None) -> dict:
    opts = ConvertOptions(
        out_dir=out,
        image_root=images,
        columns=Columns(caption="caption"),
        shard_records=500,
        workers=workers,
        max_side=max_side,
        progress=False,
    )
    report = convert([manifest], opts)
    return {
        "workers": workers,
        "max_side": max_side,
        "images": report.images_written,
        "wall_seconds": report.write_seconds,
        "worker_seconds": report.worker_seconds,
        # wall rate includes the workers' start-up (importing torch/open_clip); per-worker does not
        "images_per_s_wall": report.images_written / report.write_seconds,
        "images_per_s_per_worker": report.images_written / report.worker_seconds,
        "passthrough": report.stats.get("passthrough", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="number of photos (default 1000)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        rows = make_photos(tmp / "img", args.images)
        manifest = tmp / "m.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        mean_kb = sum(p.stat().st_size for p in (tmp / "img").iterdir()) / len(rows) / 1024
        cases = [("passthrough", 1, None), ("re-encode max-side 256", 1, 256), ("passthrough", cores, None)]
        results = []
        for i, (name, workers, max_side) in enumerate(cases):
            r = run_case(manifest, tmp / "img", tmp / f"out{i}", workers, max_side)
            results.append({"case": name, **r})
    print(f"{args.images} JPEGs of 500x375, mean {mean_kb:.0f} KiB; {platform.processor() or 'cpu'}, {cores} cores")
    print(f"Pillow {PIL.__version__}, numpy {np.__version__}")
    print("| case | workers | images/s per worker | images/s wall (incl. worker start-up) |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['workers']} | {r['images_per_s_per_worker']:.0f} | {r['images_per_s_wall']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"mean_kib": mean_kb, "results": results}, indent=1))


if __name__ == "__main__":
    main()
