"""An open_clip CLIP as a Hugging Face `transformers` CLIPModel folder: config, weights, tokenizer, processor.

The mapping is read off the model itself (its modules and shapes), not off a config name, so a checkpoint
that was extended or retrained under another architecture maps as it is. Where transformers' CLIPModel
cannot express the model (a ResNet or timm image tower, attention pooling, layer scale, SigLIP's logit
bias, another tokenizer), `check_expressible` raises ExportRefused in one line that names the part and
the format that works instead: a refusal before a single file is written, never a folder that loads into
a model which computes something else.

What is equal by construction (tests/test_publish.py measures it):
- the weights: every tensor of the open_clip state dict lands in one CLIPModel tensor (the fused attention
  projection split into q, k and v), and every CLIPModel tensor comes from one of them;
- the text pooling: open_clip pools at the argmax of the token ids, the end-of-text id 49407 being the
  largest; the config sets `eos_token_id` 49407, so CLIPModel pools at its first occurrence, the same place;
- the tokenizer: open_clip's own BPE vocabulary and merges, so the ids up to the end token are open_clip's;
  it pads with the end token, as openai/clip-vit-* do (open_clip pads with 0, "!"; made the pad token, "!"
  would become a special token and "wow!" lose its "!"); what follows the end token changes no output;
- the image processor: open_clip's mean, std, size, crop and interpolation.
Where transformers' preprocessing itself differs from open_clip's (its text cleaning has no ftfy or HTML
unescaping; its center crop rounds an odd margin down, torchvision rounds it half to even), the README's
"Publishing a model" says so, measured.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn

from alip.cli import UserError

# The CLIP BPE's special ids (open_clip's SimpleTokenizer and transformers' CLIPTokenizer agree on them).
BOS_ID, EOS_ID = 49406, 49407
PAD_TOKEN = "<|endoftext|>"  # as openai/clip-vit-*: a 0 ("!") would become a special token, and "wow!" lose its "!"
OTHER_FORMATS = "export with --format open_clip or to a .safetensors/.pt file instead"


class ExportRefused(UserError, ValueError):
    """A model the requested format cannot express; the message names the part and what works instead."""


def _refuse(what: str) -> ExportRefused:
    return ExportRefused(f"transformers' CLIPModel cannot express this model: {what}; {OTHER_FORMATS}")


def _activation(blocks: nn.ModuleList, tower: str) -> str:
    kinds = set()
    for block in blocks:
        act = block.mlp.gelu
        if isinstance(act, QuickGELU):
            kinds.add("quick_gelu")
        elif isinstance(act, nn.GELU):
            kinds.add({"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate])
        else:
            kinds.add(type(act).__name__)
    if len(kinds) != 1 or not kinds <= {"quick_gelu", "gelu", "gelu_pytorch_tanh"}:
        raise _refuse(f"the {tower} tower's MLP activation is {sorted(kinds)}")
    return kinds.pop()


def _layer_norm_eps(tower: nn.Module, name: str) -> float:
    eps = {m.eps for m in tower.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise _refuse(f"the {name} tower's layer norms use several eps values {sorted(eps)}")
    return eps.pop()


def _tower_shape(blocks: nn.ModuleList, name: str) -> dict[str, int]:
    heads = {b.attn.num_heads for b in blocks}
    mlp = {b.mlp.c_fc.out_features for b in blocks}
    if len(heads) != 1 or len(mlp) != 1:
        raise _refuse(f"the {name} tower's layers differ in heads {sorted(heads)} or MLP width {sorted(mlp)}")
    return {"num_hidden_layers": len(blocks), "num_attention_heads": heads.pop(), "intermediate_size": mlp.pop()}


def check_expressible(model: nn.Module, model_name: str) -> None:
    """Raise ExportRefused (one line) unless CLIPModel computes exactly what `model` computes."""
    if not isinstance(model, open_clip.CLIP):  # CustomTextCLIP (an HF or custom text tower), CoCa
        raise _refuse(f"its text tower is a {type(model).__name__} one, not open_clip's built-in transformer")
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise _refuse(f"its image tower is a {type(visual).__name__} (ResNet or timm), and CLIPModel's is a ViT")
    if getattr(model, "logit_bias", None) is not None:
        raise _refuse(
            "it has SigLIP's logit_bias (sigmoid-trained), which CLIPModel has no field for, and SiglipModel's "
            "towers (no class token, an attention-pooling head) are not this CLIP architecture"
        )
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise _refuse("its image tower pools otherwise than CLIP's class token (attention pool or average)")
    if getattr(visual, "class_embedding", None) is None or not isinstance(visual.ln_pre, nn.LayerNorm):
        raise _refuse("its image tower has no class token or no pre-norm")
    if visual.conv1.bias is not None:
        raise _refuse("its patch embedding has a bias")
    if model.text_pool_type != "argmax" or model.attn_mask is None:
        raise _refuse(f"its text tower pools by {model.text_pool_type!r} or is not causal, CLIP's argmax pooling is")
    for blocks, name in ((visual.transformer.resblocks, "image"), (model.transformer.resblocks, "text")):
        if any(not isinstance(b.ls_1, nn.Identity) or not isinstance(b.ls_2, nn.Identity) for b in blocks):
            raise _refuse(f"the {name} tower uses layer scale")
        if any(not isinstance(b.attn, nn.MultiheadAttention) for b in blocks):
            raise _refuse(f"the {name} tower's attention is not standard multi-head attention")
    if len(set(visual.image_size)) != 1 or len(set(visual.patch_size)) != 1:
        raise _refuse(f"its image or patch size is not square ({visual.image_size}, {visual.patch_size})")
    tokenizer = open_clip.get_tokenizer(model_name)
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer) or tokenizer.vocab_size != 49408:
        raise _refuse(f"its tokenizer is {type(tokenizer).__name__}, not CLIP's BPE")


def transformers_config(model: nn.Module) -> dict[str, Any]:
    """The CLIPConfig of `model` (call `check_expressible` first), as `CLIPConfig(**...)` takes it."""
    visual = model.visual
    vision = {
        "hidden_size": visual.conv1.out_channels,
        "image_size": visual.image_size[0],
        "patch_size": visual.patch_size[0],
        "num_channels": visual.conv1.in_channels,
        "hidden_act": _activation(visual.transformer.resblocks, "image"),
        "layer_norm_eps": _layer_norm_eps(visual, "image"),
        **_tower_shape(visual.transformer.resblocks, "image"),
    }
    text_projection = model.text_projection
    text_out = text_projection.out_features if isinstance(text_projection, nn.Linear) else text_projection.shape[1]
    text = {
        "vocab_size": model.token_embedding.num_embeddings,
        "hidden_size": model.token_embedding.embedding_dim,
        # the context the tower was built (or extended) with: its positional embedding's rows
        "max_position_embeddings": model.positional_embedding.shape[0],
        "hidden_act": _activation(model.transformer.resblocks, "text"),
        "layer_norm_eps": _layer_norm_eps(nn.ModuleList([model.transformer, model.ln_final]), "text"),
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,  # not the legacy 2: CLIPModel then pools at the first 49407, open_clip's argmax
        "pad_token_id": EOS_ID,
        **_tower_shape(model.transformer.resblocks, "text"),
    }
    vision_out = visual.proj.shape[1]
    if vision_out != text_out:
        raise _refuse(f"its towers project to different widths ({vision_out} vs {text_out})")
    return {
        "text_config": text,
        "vision_config": vision,
        "projection_dim": vision_out,
        "logit_scale_init_value": float(model.logit_scale.detach()),  # the trained value; the weight holds it too
    }


# open_clip's names inside a residual block -> CLIPEncoderLayer's
_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_FIXED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def transformers_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under CLIPModel's canonical (on-disk) keys: `text_model.*`, `vision_model.*`, the
    two projections and logit_scale. A key with no counterpart refuses (ExportRefused), never drops."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        tower = "vision_model" if key.startswith("visual.") else "text_model"
        if key in _FIXED:
            out[_FIXED[key]] = value
        elif key == "visual.proj":  # x @ proj in open_clip; a bias-free Linear in transformers: its transpose
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "text_projection.weight":  # open_clip's Linear variant: already [out, in]
            out["text_projection.weight"] = value
        elif m := _IN_PROJ.match(key):  # [q; k; v] fused along the output dimension
            prefix = f"{tower}.encoder.layers.{m.group(2)}.self_attn"
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}.{part}_proj.{m.group(3)}"] = chunk.contiguous()
        elif (m := _BLOCK.match(key)) and m.group(3) in _BLOCK_PARTS:
            out[f"{tower}.encoder.layers.{m.group(2)}.{_BLOCK_PARTS[m.group(3)]}.{m.group(4)}"] = value
        else:
            raise _refuse(f"its weight {key!r} has no CLIPModel counterpart")
    return out


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's BPE as transformers reads it: vocabulary (special tokens under transformers' names,
    same ids) and merges in rank order."""
    bpe = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    if vocab["<|startoftext|>"] != BOS_ID or vocab["<|endoftext|>"] != EOS_ID:
        raise RuntimeError("open_clip's BPE vocabulary moved its special ids")  # an open_clip change, not input
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return vocab, merges


def image_processor_settings(model: nn.Module) -> dict[str, Any]:
    """CLIPImageProcessor's settings for open_clip's eval transform of `model`."""
    from PIL import Image

    visual = model.visual
    pre = getattr(visual, "preprocess_cfg", {}) or {}
    size = visual.image_size[0]
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    interpolation = pre.get("interpolation", "bicubic")
    mode = pre.get("resize_mode", "shortest")
    if interpolation not in resample or mode not in ("shortest", "squash"):
        raise _refuse(f"its preprocessing ({interpolation}, resize mode {mode}) has no CLIPImageProcessor setting")
    settings = {
        "image_mean": list(visual.image_mean or open_clip.OPENAI_DATASET_MEAN),
        "image_std": list(visual.image_std or open_clip.OPENAI_DATASET_STD),
        "resample": int(resample[interpolation]),
        "crop_size": {"height": size, "width": size},
        "do_center_crop": mode == "shortest",
    }
    settings["size"] = {"shortest_edge": size} if mode == "shortest" else {"height": size, "width": size}
    return settings


def save_transformers(model: nn.Module, model_name: str, out: Path) -> list[str]:
    """Write `model` as a transformers CLIPModel + CLIPProcessor folder into `out` (which exists and is
    empty); returns the file names written. Loads offline with `CLIPModel.from_pretrained(out)`."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    check_expressible(model, model_name)
    config = CLIPConfig(**transformers_config(model))
    config.architectures = ["CLIPModel"]
    tensors = transformers_state_dict(model)
    # Written by hand rather than through CLIPModel.save_pretrained: the keys on disk stay the canonical
    # `text_model.*` ones whatever module tree a transformers release builds (5.6 flattened CLIPTextModel's,
    # transformers#46644); from_pretrained maps them to its tree, which the tests check by loading.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    vocab, merges = clip_vocabulary()
    context = config.text_config.max_position_embeddings
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=PAD_TOKEN, model_max_length=context)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(**image_processor_settings(model)), tokenizer=tokenizer
    )
    processor.save_pretrained(out)
    # The two classic files too, for loaders that read vocab.json/merges.txt rather than tokenizer.json.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sorted(p.name for p in out.iterdir())
