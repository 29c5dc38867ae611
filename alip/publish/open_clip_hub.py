"""An open_clip model as open_clip's own hub folder, written by open_clip's `save_for_hf`.

`open_clip.create_model_and_transforms("local-dir:OUT")` (and `hf-hub:ORG/NAME` once uploaded) builds it
from `open_clip_config.json` and loads `open_clip_model.safetensors`. The config is the architecture's, with
what the weights say a run changed: the text context (an extended positional embedding) and SigLIP's
logit bias, so the folder builds the trained shape without being told.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import open_clip
from torch import nn

from alip.publish.transformers_format import ExportRefused


def hub_model_config(model: nn.Module, model_name: str) -> dict[str, Any]:
    """open_clip's config of `model_name`, with the context length and logit bias `model` actually has."""
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ExportRefused(f"open_clip has no config named {model_name!r} to write into open_clip_config.json")
    config = copy.deepcopy(config)
    positions = getattr(model, "positional_embedding", None)
    if positions is not None:
        config.setdefault("text_cfg", {})["context_length"] = int(positions.shape[0])
    bias = getattr(model, "logit_bias", None)
    if bias is not None:
        config["init_logit_bias"] = float(bias.detach())  # so open_clip builds the parameter the weights fill
    return config


def save_open_clip(model: nn.Module, model_name: str, out: Path) -> list[str]:
    """Write open_clip's hub folder for `model` into `out` (exists, empty); returns the file names."""
    from open_clip.push_to_hf_hub import save_for_hf

    from alip.publish.transformers_format import clip_vocabulary

    config = hub_model_config(model, model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    if not hasattr(tokenizer, "save_pretrained"):
        # CLIP's own BPE (SimpleTokenizer) has no files to save: open_clip rebuilds it from the config. The
        # transformers tokenizer of the same vocabulary goes beside it, for hub users who read tokenizer.json.
        from transformers import CLIPTokenizer

        from alip.publish.transformers_format import PAD_TOKEN

        vocab, merges = clip_vocabulary()
        context = int(config.get("text_cfg", {}).get("context_length", 77))
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=PAD_TOKEN, model_max_length=context)
    save_for_hf(model, tokenizer, config, str(out), safe_serialization=True)
    return sorted(p.name for p in out.iterdir())
