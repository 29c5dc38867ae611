"""Publishing a trained model where people use it: a transformers CLIPModel folder, or open_clip's hub folder.

`export_folder` writes either into a folder beside the target, checks that the folder's model computes what
the checkpoint's does (image and text features on seeded inputs), writes the model card, and only then moves
the folder into place. So a refused or failed export leaves nothing under the target name, and a folder
under it always loads into the checkpoint's model.

The formats: `alip.publish.transformers_format` (CLIPModel + CLIPProcessor, mapped key by key) and
`alip.publish.open_clip_hub` (open_clip's `save_for_hf`). The card: `alip.publish.card`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alip.cli import UserError
from alip.publish.card import collect_run, model_card
from alip.publish.transformers_format import ExportRefused, check_expressible

logger = logging.getLogger(__name__)

FORMATS = ("transformers", "open_clip")
STAMP = ".alip-export.json"  # the files an export wrote: what a later --overwrite may replace
TOLERANCE = 1e-4  # fp32 features of unit norm; measured differences are ~1e-6 (tests/test_publish.py)

__all__ = ["FORMATS", "ExportRefused", "ExportFolderError", "export_folder", "verify_folder"]


class ExportFolderError(UserError, ValueError):
    """An output folder the export may not write into."""


def _claim(out: Path, overwrite: bool) -> None:
    """Refuse a target that holds files, unless --overwrite and they are all a previous export's own."""
    if out.exists() and not out.is_dir():
        raise ExportFolderError(f"{out} exists and is not a folder; a folder export writes a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return
    if not overwrite:
        raise ExportFolderError(
            f"{out} is not empty ({len(present)} file(s)); pass --overwrite to replace an earlier export "
            "there, or choose another output folder"
        )
    try:
        own = set(json.loads((out / STAMP).read_text(encoding="utf-8"))["files"]) | {STAMP}
    except (OSError, ValueError, KeyError, TypeError):
        own = set()
    strangers = [name for name in present if name not in own]
    if strangers:
        shown = ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
        raise ExportFolderError(
            f"{out} holds {len(strangers)} file(s) no export wrote ({shown}); --overwrite replaces only an "
            "earlier export's folder: move them away or choose another output folder"
        )


def _probe_inputs(model: nn.Module, model_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    import open_clip

    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    context = int(model.positional_embedding.shape[0]) if hasattr(model, "positional_embedding") else None
    tokens = open_clip.get_tokenizer(model_name, context_length=context)(
        ["a photo of a dog", "", "two cats on a red sofa, seen from above " * 12]
    )
    return pixels, tokens


@torch.no_grad()
def _features(model: nn.Module, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True)


@torch.no_grad()
def verify_folder(model: nn.Module, model_name: str, folder: Path, fmt: str) -> float:
    """Load `folder` in its own library, offline, and return the largest difference of its image and text
    features from `model`'s on seeded inputs (both fp32, unit norm)."""
    pixels, tokens = _probe_inputs(model, model_name)
    expected = _features(model, pixels, tokens)
    if fmt == "transformers":
        from transformers import CLIPModel

        loaded = CLIPModel.from_pretrained(folder).eval()
        got = (
            torch.nn.functional.normalize(loaded.get_image_features(pixel_values=pixels).pooler_output, dim=-1),
            torch.nn.functional.normalize(loaded.get_text_features(input_ids=tokens).pooler_output, dim=-1),
        )
    else:
        import open_clip

        loaded = open_clip.create_model_and_transforms(f"local-dir:{folder}")[0].eval()
        got = _features(loaded, pixels, tokens)
    return max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))


def export_folder(
    model: nn.Module,
    model_name: str,
    out: str | Path,
    fmt: str,
    *,
    checkpoint: str | Path,
    run_dir: str | Path | None = None,
    overwrite: bool = False,
    content: Any = None,
) -> dict[str, Any]:
    """Write `model` (loaded from `checkpoint`) as a `fmt` folder at `out`, with its model card.

    Returns {"files": [...], "difference": float, "card": RunRecord}. Raises ExportRefused for a model the
    format cannot express and ExportFolderError for a target it may not write, both before writing.
    `content`: the checkpoint as `read_checkpoint` gave it, where the caller has read it already.
    """
    from alip.model import unwrap_model

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    model = unwrap_model(model).float().eval()
    out = Path(out)
    if fmt == "transformers":
        check_expressible(model, model_name)
    _claim(out, overwrite)
    record = collect_run(Path(checkpoint), model, Path(run_dir) if run_dir is not None else None, content)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        if fmt == "transformers":
            from alip.publish.transformers_format import save_transformers

            save_transformers(model, model_name, partial)
        else:
            from alip.publish.open_clip_hub import save_open_clip

            save_open_clip(model, model_name, partial)
        difference = verify_folder(model, model_name, partial, fmt)
        if not difference <= TOLERANCE:  # a mapping error of ours: never move such a folder into place
            raise RuntimeError(f"the exported {fmt} model's features differ from the checkpoint's by {difference:.3g}")
        (partial / "README.md").write_text(model_card(model, model_name, record, fmt), encoding="utf-8")
        files = sorted(p.name for p in partial.iterdir())
        (partial / STAMP).write_text(json.dumps({"format": fmt, "files": files}, indent=1) + "\n", encoding="utf-8")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)  # _claim allowed it: empty, or an earlier export's own files
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"files": files, "difference": difference, "card": record}
