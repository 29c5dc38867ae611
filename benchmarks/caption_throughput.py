#!/usr/bin/env python
"""tools/caption.py throughput in images/s, with a randomly initialised BLIP (no download needed).

Speed does not depend on the weights, only on the shapes and the number of generated tokens, so
the model is built from a BlipConfig with random weights:
  - tiny: the test model (1-layer ViT on 32x32 inputs, 1-layer text decoder, 40-word vocabulary);
  - base: the shapes of Salesforce/blip-image-captioning-base (ViT-B/16 at 384x384, 12-layer
    BERT-base decoder with cross-attention, 30524-token vocabulary), about 247M parameters.
A random model stops at arbitrary lengths, so every caption is forced to --gen-tokens tokens
(min = max length); 20 tokens is a little above a typical OFA/BLIP caption.

Two figures:
  - end to end: `alip.caption.run.caption_inputs` over N ~500x375 JPEGs (decode in DataLoader
    workers, preprocess, generate, append to the part file, merge), model loading excluded;
  - generate only: `Captioner.caption` on already preprocessed batches (the model's ceiling).

    python benchmarks/caption_throughput.py                                     # tiny, CPU
    python benchmarks/caption_throughput.py --model-size base --images 16 --batch-size 8
    python benchmarks/caption_throughput.py --model-size base --device cuda --dtype bf16 --batch-size 128 \\
        --images 2048 --workers 8                                               # on a GPU
"""

import argparse
import io
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from alip.caption.captioner import Captioner, DecodeSettings, resolve_dtype
from alip.caption.run import CaptionOptions, caption_inputs
from alip.data.format.images import decode_image

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "camera"]
TINY_WORDS = (
    "a an the photo picture of dog cat man woman child on in with at near beach street table room "
    "red blue green white black and sitting standing running holding two some small large"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IMAGES_15M = 15_000_000


def build_model(size: str, folder: Path):
    """(model, processor) with random weights in the shapes of `size`."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    if size == "tiny":
        words = SPECIAL + TINY_WORDS
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        vision = dict(**small, image_size=32, patch_size=8)
        text = dict(**small, max_position_embeddings=64, encoder_hidden_size=32)
        image_size = 32
    else:  # BlipConfig's defaults are the base captioning model's shapes
        words = SPECIAL + [f"tok{i}" for i in range(30524 - len(SPECIAL))]
        vision, text, image_size = {}, {}, 384
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"))
    special = dict(bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id)
    config = BlipConfig(
        vision_config=vision, text_config=dict(**text, **special, vocab_size=len(tok), eos_token_id=tok.sep_token_id)
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tok
    )
    return model, processor


def make_photos(root: Path, n: int) -> list[dict]:
    """n distinct ~500x375 JPEGs (random crops of the scikit-image photos), the size of a Flickr medium image."""
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in PHOTOS]
    rows = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        src.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        (root / f"{i}.jpg").write_bytes(buf.getvalue())
        rows.append({"image": f"{i}.jpg"})
    return rows


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", choices=["tiny", "base"], default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--images", type=int, default=256, help="images captioned end to end (default: 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=3, help="tools/caption.py's default: 3")
    p.add_argument("--gen-tokens", type=int, default=20, help="tokens generated per caption (forced)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches before timing (default: 3)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    settings = DecodeSettings(num_beams=args.num_beams, min_length=args.gen_tokens, max_length=args.gen_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, processor = build_model(args.model_size, tmp)
        params = sum(p.numel() for p in model.parameters())
        captioner = Captioner(model.to(device, dtype).eval(), processor, settings, f"random-blip-{args.model_size}")
        (tmp / "img").mkdir()
        rows = make_photos(tmp / "img", args.images)
        (tmp / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

        # generate only: preprocessed batches, after warm-up batches (the first calls are several
        # times slower: allocator, kernel selection, lazy initialisation inside generate)
        images = [decode_image((tmp / "img" / r["image"]).read_bytes(), 10**9) for r in rows[: args.batch_size]]
        pixels = captioner.image_processor(images=images, return_tensors="pt")["pixel_values"]
        for _ in range(args.warmup):
            captioner.caption(pixels)
        repeats = max(2, min(10, args.images // args.batch_size))
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            captioner.caption(pixels)
        _sync(device)
        generate_rate = repeats * len(images) / (time.perf_counter() - start)

        opts = CaptionOptions(tmp / "caps.jsonl", tmp / "img", batch_size=args.batch_size, workers=args.workers)
        report = caption_inputs([tmp / "m.jsonl"], captioner, opts)
        assert report.merged.num_captioned == args.images, report
        end_to_end = report.images_per_second

    figures = {
        "model_size": args.model_size,
        "parameters": params,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "num_beams": args.num_beams,
        "gen_tokens": args.gen_tokens,
        "workers": args.workers,
        "images": args.images,
        "threads": torch.get_num_threads(),
        "generate_only_images_per_s": round(generate_rate, 2),
        "end_to_end_images_per_s": round(end_to_end, 2),
        # one device at the end-to-end rate; N devices take 1/N of the wall time, the same device-hours
        "device_hours_for_15M": round(IMAGES_15M / end_to_end / 3600, 1),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
