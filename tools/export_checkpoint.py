#!/usr/bin/env python
"""Convert a checkpoint into a plain open_clip state dict (.pt) or safetensors.

Accepts whatever alip.load_checkpoint accepts: the original ALIP release (DDP `module.` keys),
open_clip checkpoints, our training checkpoints. The output loads unchanged with
`open_clip.create_model(NAME, pretrained=OUTPUT)` and CLIP_benchmark
(`--model NAME --pretrained OUTPUT`).

Example:
    python tools/export_checkpoint.py --model ViT-B-32 ALIP_YFCC15M_B32.pt alip_b32.safetensors

A user error (a missing or unreadable checkpoint, one that does not fit --model) is one
"error: ..." line and exit status 2; --debug or ALIP_DEBUG=1 shows the traceback.
"""

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import alip
from alip.cli import add_debug_flag, guarded
from alip.files import refuse_overlap

OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # what alip.export_model writes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="input checkpoint (.pt/.pth/.bin/.safetensors)")
    parser.add_argument("output", type=Path, help="output file: .safetensors, or .pt/.pth/.bin for torch.save")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture name (default: ViT-B-32)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.output.suffix not in OUTPUT_SUFFIXES:  # before a model is built for nothing
        parser.error(f"the output must end in {', '.join(OUTPUT_SUFFIXES)}, got {args.output.name}")
    refuse_overlap(("the output", args.output), [("checkpoint", args.checkpoint)])  # it is written over
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    model, _, _ = alip.create_model(args.model)
    fmt = alip.load_checkpoint(model, args.checkpoint)
    out = alip.export_model(model, args.output, metadata={"architecture": args.model})
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"read {args.checkpoint} ({fmt} format) -> wrote {out} (sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main)())
