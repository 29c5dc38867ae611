#!/usr/bin/env python
"""Export a checkpoint: an open_clip state dict file, a transformers CLIPModel folder, or open_clip's hub folder.

Accepts whatever alip.load_checkpoint accepts: the original ALIP release (DDP `module.` keys), open_clip
checkpoints, our training checkpoints. The formats:
  state_dict    (default) OUTPUT.safetensors or .pt: loads with `open_clip.create_model(NAME, pretrained=OUTPUT)`
                and CLIP_benchmark (`--model NAME --pretrained OUTPUT`).
  transformers  folder OUTPUT: `transformers.CLIPModel.from_pretrained(OUTPUT)`, `CLIPProcessor.from_pretrained`,
                and `pipeline("zero-shot-image-classification", model=OUTPUT)`. ViT towers only: a model
                CLIPModel cannot express (a ResNet image tower, SigLIP's logit bias) is refused, naming why.
  open_clip     folder OUTPUT, open_clip's hub format (save_for_hf):
                `open_clip.create_model_and_transforms("local-dir:OUTPUT")`; upload it as is for `hf-hub:`.
Both folders get a model card (README.md) from the run folder: architecture, objective and gates, data,
training config, and the evaluations measured on these weights; nothing that was not measured. Before a
folder is moved into place, it is loaded in its library and its features are compared with the checkpoint's.

Examples:
    python tools/export_checkpoint.py --model ViT-B-32 ALIP_YFCC15M_B32.pt alip_b32.safetensors
    python tools/export_checkpoint.py runs/b32/final.pt hf/alip-b32 --format transformers
    python tools/export_checkpoint.py runs/b32/final.pt hub/alip-b32 --format open_clip

A user error (a missing or unreadable checkpoint, one that does not fit --model, a model the format cannot
express, a non-empty output folder) is one "error: ..." line and exit status 2; --debug or ALIP_DEBUG=1
shows the traceback.
"""

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import alip
from alip.cli import add_debug_flag, guarded
from alip.files import refuse_overlap
from alip.model import check_model_name, model_from_checkpoint, read_checkpoint

OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # what alip.export_model writes
FOLDER_FORMATS = ("transformers", "open_clip")
DEFAULT_MODEL = "ViT-B-32"


def model_name_of(content: object, checkpoint: Path, run_dir: Path | None) -> str:
    """The architecture a training checkpoint's config names (`content`: the checkpoint, read), else its run
    folder's config.yaml (beside a `final.*` export), else the default."""
    import yaml

    from alip.publish.card import find_run_dir

    config = content.get("config") if isinstance(content, dict) else None
    run_dir = run_dir or find_run_dir(checkpoint)
    if not isinstance(config, dict) and run_dir is not None and (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    name = ((config or {}).get("model") or {}).get("name") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else DEFAULT_MODEL


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="input checkpoint (.pt/.pth/.bin/.safetensors)")
    parser.add_argument("output", type=Path, help="a .safetensors/.pt file (state_dict), or a folder (the others)")
    parser.add_argument(
        "--format",
        choices=("state_dict", *FOLDER_FORMATS),
        default="state_dict",
        help="see above (default: state_dict)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"open_clip architecture name (default: the one its training run names, else {DEFAULT_MODEL})",
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="the run folder for the model card (default: found)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export's folder at OUTPUT")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    folder = args.format in FOLDER_FORMATS
    if not folder and args.output.suffix not in OUTPUT_SUFFIXES:  # before a model is built for nothing
        parser.error(
            f"the output must end in {', '.join(OUTPUT_SUFFIXES)}, got {args.output.name} "
            f"(a folder needs --format {' or '.join(FOLDER_FORMATS)})"
        )
    if folder and args.output.suffix in OUTPUT_SUFFIXES:
        parser.error(f"--format {args.format} writes a folder, not a {args.output.suffix} file: name a folder")
    refuse_overlap(("the output", args.output), [("checkpoint", args.checkpoint)])  # it is written over
    # warnings only: open_clip's INFO lines on building a model say nothing about this export
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if args.model is not None:
        check_model_name(args.model)  # before a checkpoint of gigabytes is read
    content = read_checkpoint(args.checkpoint)  # once: for the name, the weights and the model card
    name = args.model or model_name_of(content, args.checkpoint, args.run_dir)
    # built in the checkpoint's shape (a sigmoid-trained model's logit_bias included)
    model, _, _, fmt = model_from_checkpoint(name, args.checkpoint, content=content)
    if not folder:
        out = alip.export_model(model, args.output, metadata={"architecture": name})
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        print(f"read {args.checkpoint} ({fmt} format) -> wrote {out} (sha256 {digest})")
        return 0
    from alip.publish import export_folder

    done = export_folder(
        model,
        name,
        args.output,
        args.format,
        checkpoint=args.checkpoint,
        run_dir=args.run_dir,
        overwrite=args.overwrite,
        content=content,
    )
    card = done["card"]
    print(
        f"read {args.checkpoint} ({fmt} format, {name}) -> wrote {args.output}/ ({args.format}: "
        f"{len(done['files'])} files; loaded back, features within {done['difference']:.1e} of the checkpoint's)"
    )
    found = f"run folder {card.run_dir}" if card.run_dir else "no run folder"
    print(
        f"model card: {found}; {len(card.results)} evaluation(s) of these weights"
        + (f", in-training evaluation at step {card.step}" if card.in_training else "")
        + (f"; {card.other_weights} of other weights left out" if card.other_weights else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main)())
