#!/usr/bin/env python
"""Caption every image of data2rec's inputs with an image-to-text model: ALIP's synthetic captions.

Inputs are those of tools/data2rec.py: manifests (.tsv/.csv/.jsonl/.parquet) with an image-path
column (relative to --image-root, default the manifest's folder), or img2dataset webdataset .tar
shards. Only the images are read; sample keys are data2rec's (the --key-col column, else the row
number; the img2dataset key for tars), so data2rec joins the result with --captions unchanged.

The output is a caption sidecar, JSONL (or parquet if --out ends in .parquet): a header line
{"meta": {...}} with the model and decoding settings, then one entry per sample in input order,
{"key": ..., "path": ..., "caption": ...}. An image that cannot be read or decoded gets
"caption": null and a "reason", and the run goes on.

The model is any Hugging Face image-to-text model (a local save_pretrained folder, or a hub name;
default BLIP base). A hub name is downloaded only when the hub is reachable and HF_HUB_OFFLINE is
unset; otherwise it must be in the Hugging Face cache. Reachability is probed in a few seconds
(ALIP_HUB_PROBE=0 skips the probe). GPUs run in bf16 (fp16 where bf16 is not supported), CPUs in fp32.

A user error (a missing input, a model that cannot be loaded, a sidecar from other settings) is
one "error: ..." line and exit status 2; --debug or ALIP_DEBUG=1 shows the traceback.

Resumable: every batch is appended to {out}.part{rank}.jsonl and fsynced; rerun the same command
after an interruption and only the missing samples are captioned. Under torchrun every rank takes
its own slice; after all ranks finish, rank 0 checks that every sample has exactly one entry and
writes the sidecar. --merge does only that last step, without a model (e.g. when rank 0 was
killed after the other ranks had finished).

Examples:
  python tools/caption.py yfcc15m.tsv --image-root /data/yfcc/images --out yfcc15m_captions.jsonl
  torchrun --nproc-per-node 8 tools/caption.py /data/img2dataset/*.tar --out caps.jsonl --batch-size 128
  python tools/caption.py m.jsonl --out caps.jsonl --model ./blip-large --num-beams 5 --prompt "a picture of"
  python tools/caption.py m.jsonl --out caps.jsonl --merge
  python tools/data2rec.py m.jsonl --captions caps.jsonl --out-dir shards/
"""

import argparse
import logging
import sys
from pathlib import Path

from alip.caption import DEFAULT_MODEL
from alip.cli import add_debug_flag, guarded


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "inputs", nargs="+", type=Path, help="manifest file(s) or img2dataset .tar shard(s), as for data2rec"
    )
    p.add_argument("--out", type=Path, required=True, help="the caption sidecar to write (.jsonl or .parquet)")
    p.add_argument("--image-root", type=Path, help="folder the manifest's image paths are relative to")
    p.add_argument("--image-col", default="image", help="manifest column with the image path (default: image)")
    p.add_argument("--key-col", help="manifest column with a unique sample key (default: the row number)")
    g = p.add_argument_group("model and decoding (recorded in the sidecar header)")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"local folder or hub name (default: {DEFAULT_MODEL})")
    g.add_argument("--prompt", default="", help="text the caption starts from, e.g. 'a picture of' (default: none)")
    g.add_argument("--keep-prompt", action="store_true", help="keep the prompt at the front of the caption")
    g.add_argument("--num-beams", type=int, default=3, help="beam size; 1 = greedy (default: 3)")
    g.add_argument("--max-length", type=int, default=30, help="max generated tokens, prompt excluded (default: 30)")
    g.add_argument("--min-length", type=int, default=5, help="min generated tokens, prompt excluded (default: 5)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1.0)")
    g.add_argument("--no-repeat-ngram", type=int, default=3, help="forbid repeated n-grams of this size; 0 = off")
    g.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16/fp16 GPU, fp32 CPU"
    )
    g.add_argument("--device", help="cuda, cuda:1 or cpu (default: this rank's GPU if there is one, else cpu)")
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=64, help="images per generate call (default: 64)")
    r.add_argument("--workers", type=int, default=8, help="DataLoader workers decoding images (default: 8)")
    r.add_argument("--max-pixels", type=int, default=89_478_485, help="reject images with more pixels (bombs)")
    r.add_argument("--overwrite", action="store_true", help="delete earlier captions in --out instead of resuming")
    r.add_argument("--merge", action="store_true", help="only merge the part files of a finished run (no model)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(r)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("alip").setLevel(logging.INFO)
    import torch  # after argument parsing: --help stays fast

    from alip.caption.captioner import Captioner, DecodeSettings
    from alip.caption.run import CaptionOptions, caption_inputs, merge_parts, refuse_inputs
    from alip.distributed import init_distributed

    opts = CaptionOptions(
        output=args.out,
        image_root=args.image_root,
        image_col=args.image_col,
        key_col=args.key_col,
        batch_size=args.batch_size,
        workers=args.workers,
        max_pixels=args.max_pixels,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    refuse_inputs(args.inputs, opts)  # before a captioner is loaded for nothing
    if args.merge:
        report = merge_parts(args.inputs, opts)
        print(f"{report.path}: {report.num_samples} samples, {report.num_failed} failed {report.failures or ''}")
        return 0
    settings = DecodeSettings(
        prompt=args.prompt,
        num_beams=args.num_beams,
        max_length=args.max_length,
        min_length=args.min_length,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram,
        strip_prompt=not args.keep_prompt,
    )
    # a long timeout: the last barrier waits for the slowest rank's slice
    env = init_distributed(timeout_s=3 * 3600)
    device = args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    captioner = Captioner.from_pretrained(args.model, settings, device=device, dtype=args.dtype)
    report = caption_inputs(args.inputs, captioner, opts)
    if report.merged is not None:
        m = report.merged
        print(
            f"{m.path}: {m.num_samples} samples ({report.already_done} from earlier runs), {m.num_captioned} "
            f"captioned, {m.num_failed} failed {m.failures or ''}; rank 0 captioned "
            f"{report.captioned + report.failed} at {report.images_per_second:.1f} images/s"
        )
    if env.is_distributed:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main)())
