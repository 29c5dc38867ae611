"""open_clip-backed model factory, the bi-path forward, checkpoint loading and export.

We use open_clip as a library: its model configs, create_model and tokenizer. ALIP's model is a
plain open_clip CLIP (one image tower, one text tower shared by raw text and caption), so the
official ALIP ViT-B/32 weights load into open_clip's `ViT-B-32` once DDP's `module.` is stripped,
and what we export loads in open_clip and CLIP_benchmark unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from alip.cli import UserError
from alip.text_trim import TrimMode, encode_texts, supports_trim

logger = logging.getLogger(__name__)

# Small configs of ours (tests, demo), registered with open_clip so every open_clip entry point
# (create_model, get_tokenizer, list_models) knows them by name.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

# Prefixes wrappers put in front of parameter names: DDP, torch.compile, our BiPathCLIP.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "clip.")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# Where our training checkpoints keep the model weights (alip.train writes this key).
TRAIN_CHECKPOINT_MODEL_KEY = "model"


class UnknownModelError(UserError, ValueError):
    """A model name that open_clip does not know."""


class ExportPathError(UserError, ValueError):
    """An export path whose suffix names no format we write."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: unsafe, unreadable, not a checkpoint, not matching the model,
    or (alip.train) refused for a resume or not writable."""


def create_model(
    model_name: str = "ViT-B-32",
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    **kwargs: Any,
) -> tuple[nn.Module, Any, Any]:
    """Build any open_clip architecture by name. Returns (model, preprocess_train, preprocess_val).

    `pretrained` is a local checkpoint file in any format `load_checkpoint` accepts (the ALIP
    release, open_clip, ours, safetensors), or an open_clip pretrained tag, which open_clip fetches
    from its hub where the machine can reach it. Extra keyword arguments go to open_clip.
    """
    check_model_name(model_name)
    local_file = pretrained is not None and Path(pretrained).is_file()
    if pretrained is not None and not local_file and Path(pretrained).suffix in _CHECKPOINT_SUFFIXES:
        # Looks like a file, not an open_clip tag: say so instead of asking a hub for it.
        raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained}")
    if local_file:
        model, preprocess_train, preprocess_val, _ = model_from_checkpoint(
            model_name, pretrained, device=device, precision=precision, **kwargs
        )
        return model, preprocess_train, preprocess_val
    return open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, precision=precision, **kwargs
    )


def check_model_name(model_name: str) -> None:
    """UnknownModelError for a name open_clip does not know, before any file is read."""
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise UnknownModelError(
            f"unknown model {model_name!r}; open_clip knows {len(open_clip.list_models())} configs, "
            "e.g. ViT-B-32, ViT-B-16, RN50, ALIP-Tiny (see open_clip.list_models())"
        )


def architecture_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The open_clip keyword arguments a checkpoint's weights imply beyond its architecture name: SigLIP's
    `logit_bias` (a sigmoid-trained model) makes open_clip build the parameter, which the load then fills."""
    return {"init_logit_bias": 0.0} if "logit_bias" in state_dict else {}


def model_from_checkpoint(
    model_name: str,
    checkpoint: str | Path,
    *,
    device: str | torch.device = "cpu",
    content: Any = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any, Any, str]:
    """(model, preprocess_train, preprocess_val, checkpoint format): `model_name` built in the shape the
    checkpoint's weights have (`architecture_of`; `kwargs` override it), and the weights loaded.

    The file is read once (not at all when the caller passes its `read_checkpoint` content). A model
    given `init_logit_bias` whose checkpoint has no bias (a softmax CLIP continued with the sigmoid
    objective) keeps its initial bias, with a log line."""
    check_model_name(model_name)
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    content = read_checkpoint(path) if content is None else content
    state_dict, fmt = extract_state_dict(content, source=str(path))
    kwargs = {**architecture_of(state_dict), **kwargs}
    with quiet_random_init():  # the checkpoint is loaded right below: "initialized randomly" would mislead
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained=None, device=device, **kwargs
        )
    keep = ("logit_bias",) if "logit_bias" not in state_dict and kwargs.get("init_logit_bias") is not None else ()
    if keep:
        logger.info("%s has no logit_bias: it starts at init_logit_bias=%s", path, kwargs["init_logit_bias"])
    _load_state_dict(model, state_dict, fmt, str(path), strict=True, keep_missing=keep)
    return model, preprocess_train, preprocess_val, fmt


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning (root logger)
    while a model is built whose weights the caller loads right after."""
    root, drop = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def get_tokenizer(model_name: str = "ViT-B-32") -> Any:
    """open_clip's tokenizer for the model (CLIP BPE, context 77 for the CLIP configs)."""
    return open_clip.get_tokenizer(model_name)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The open_clip model inside DDP / torch.compile / BiPathCLIP wrappers."""
    while True:
        if isinstance(model, BiPathCLIP):
            model = model.clip
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


class BiPathCLIP(nn.Module):
    """ALIP's bi-path forward over one open_clip CLIP: image, raw text and caption features.

    Captions are [B, L], or [B, K, L] for K caption sources (features [B, K, D]).

    Raw text and caption go through the shared text tower; `text_trim` (see alip.text_trim)
    decides how: "buckets" (the default, the trainer's) sorts all texts by length into groups;
    "batch" cuts each source to its longest text; "off" is one batched call at 77 tokens ([2B, 77]),
    as the release. All three give the same features and gradients, so the cheapest is the default.
    This is the module to wrap in DDP, so that DDP's forward hooks see the whole step.
    """

    def __init__(self, clip: nn.Module, text_trim: TrimMode = "buckets", text_buckets: int = 4) -> None:
        super().__init__()
        self.clip = clip
        if text_trim != "off" and not supports_trim(clip):
            logger.warning("model.text_trim=%s needs a causal, argmax-pooled text tower; not trimming", text_trim)
            text_trim = "off"
        self.text_trim, self.text_buckets = text_trim, text_buckets
        # Text tower calls (texts, tokens each) of the forwards that backpropagate, for the FLOP
        # count (alip.flops); the no-grad first pass of cached accumulation is recomputation, not counted.
        self.text_calls: list[tuple[int, int]] = []

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`torch.compile` in place (state-dict keys unchanged); arguments as `nn.Module.compile`.

        Untrimmed, the whole forward is compiled. Trimmed, the length planning must stay outside
        dynamo (it reads the lengths on the host; traced, it recompiles at nearly every step, see
        alip.text_trim), so the towers are compiled instead: the image tower, and the text
        transformer, which the planning calls at <= 77 / ROUND rounded lengths.
        """
        if self.text_trim == "off":
            super().compile(*args, **kwargs)
            return
        self.clip.visual.compile(*args, **kwargs)
        self.clip.transformer.compile(*args, **kwargs)

    def take_text_calls(self) -> list[tuple[int, int]]:
        """The text tower calls recorded since the last take (see `text_calls`)."""
        calls, self.text_calls = self.text_calls, []
        return calls

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, caption: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        image_features = self.clip.encode_image(image, normalize=True)  # [B, D]
        # K caption sources ([B, K, L]) are K more token batches of the same tower call(s)
        captions = [] if caption is None else list(caption.unbind(1)) if caption.dim() == 3 else [caption]
        features, calls = encode_texts(self.clip, [text, *captions], self.text_trim, self.text_buckets)
        if torch.is_grad_enabled():
            self.text_calls.extend(calls)
        caption_features = None
        if caption is not None:  # [B, D], or [B, K, D] for [B, K, L] captions
            caption_features = torch.stack(features[1:], dim=1) if caption.dim() == 3 else features[1]
        return {
            "image_features": image_features,
            "raw_features": features[0],
            "caption_features": caption_features,
            "logit_scale": self.clip.logit_scale.exp(),
            # SigLIP's learnable bias (open_clip's init_logit_bias), for the sigmoid objective; None without
            "logit_bias": getattr(self.clip, "logit_bias", None),
        }


def _is_safetensors(path: Path) -> bool:
    """By content, whatever the name: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"cannot read safetensors file {path}: truncated or corrupt ({e})") from None


def _unpickling_refusal(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """weights_only refused the file: either it holds code-bearing objects, or it is no pickle at all."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    blocked = [line for line in lines if "GLOBAL" in line]  # "Trying to load unsupported GLOBAL posix.system ..."
    if not blocked:  # "Unsupported operand 67": bytes that are not a pickled checkpoint
        return CheckpointError(f"{path} is not a PyTorch checkpoint (not a file torch.save writes)")
    return CheckpointError(
        f"refused to load {path}: it contains Python objects other than tensors and plain containers, "
        f"which could run code when unpickled ({blocked[0]})"
    )


def read_checkpoint(path: str | Path) -> Any:
    """A checkpoint file's content, loaded without running code; CheckpointError says what is wrong.

    safetensors files are recognised by content, torch.save files are loaded with weights_only=True.
    An empty file, bytes that are not a checkpoint, a truncated archive and a pickle that would run
    code each get their own message, rather than PyTorch's advice to set weights_only=False.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        return _read_safetensors(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # a zip archive (torch.save) or the legacy pickle format
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {magic!r}, not a torch.save header)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_refusal(path, e) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or corrupt ({str(e).splitlines()[0]})") from e


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Find the model weights in a loaded checkpoint; returns (state_dict, format name).

    Formats: our training checkpoint ({"model": sd, ...}), open_clip ({"state_dict": sd, ...}),
    the ALIP release / plain export (a bare sd). DDP's `module.` and torch.compile's `_orig_mod.`
    prefixes are stripped.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a state dict")
    if isinstance(checkpoint.get(TRAIN_CHECKPOINT_MODEL_KEY), Mapping):
        state_dict, fmt = checkpoint[TRAIN_CHECKPOINT_MODEL_KEY], "alip-train"
    elif isinstance(checkpoint.get("state_dict"), Mapping):
        state_dict, fmt = checkpoint["state_dict"], "open_clip"
    else:
        state_dict, fmt = checkpoint, "state_dict"
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source} ({fmt} format) has non-tensor entries: {not_tensors[:5]}")
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    if len(out) != len(state_dict):
        raise CheckpointError(f"{source}: keys collide after stripping wrapper prefixes {_WRAPPER_PREFIXES}")
    return out, fmt


def _describe_mismatch(
    source: str, missing: list[str], unexpected: list[str], shapes: list[tuple[str, tuple, tuple]]
) -> str:
    def listing(items: list[str]) -> str:
        shown = ", ".join(items[:20])
        return shown + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")

    lines = [f"{source} does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {listing(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}):")
        lines += [f"    {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in shapes[:20]]
    lines.append("  (was it trained with another architecture? pass the matching model name)")
    return "\n".join(lines)


def load_checkpoint(model: nn.Module, checkpoint: str | Path, strict: bool = True) -> str:
    """Load weights into `model` (or the open_clip model inside its wrappers); returns the format name.

    Accepts the original ALIP release (bare state dict with DDP `module.` keys), open_clip
    checkpoints ({"state_dict": ...}, with or without `module.`), our training checkpoints and
    safetensors exports. Always loads with weights_only=True. A mismatch raises CheckpointError
    naming the missing and unexpected keys and the differing shapes.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state_dict, fmt = extract_state_dict(read_checkpoint(path), source=str(path))
    return _load_state_dict(model, state_dict, fmt, str(path), strict=strict)


def _load_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    fmt: str,
    source: str,
    strict: bool,
    keep_missing: tuple[str, ...] = (),
) -> str:
    """`load_checkpoint` past the file: the key and shape checks, then the load. Keys in `keep_missing`
    may be absent from the checkpoint: the model keeps its own values for them."""
    target = unwrap_model(model)
    expected = target.state_dict()
    # Non-persistent buffers (e.g. the text attention mask) may be in checkpoints of older
    # open_clip versions; they are rebuilt by the model, so they are neither missing nor unexpected.
    non_persistent = {name for name, _ in target.named_buffers()} - expected.keys()
    state_dict = {k: v for k, v in state_dict.items() if k not in non_persistent}
    missing = sorted(expected.keys() - state_dict.keys() - set(keep_missing))
    unexpected = sorted(state_dict.keys() - expected.keys())
    shapes = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointError(_describe_mismatch(source, missing, unexpected, shapes))
    target.load_state_dict(state_dict, strict=strict and not keep_missing)
    logger.info("loaded %s checkpoint %s", fmt, source)
    return fmt


def export_model(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model as a plain open_clip state dict: `.safetensors`, or `.pt`/`.bin` (torch.save).

    Both load unchanged with `open_clip.create_model(name, pretrained=path)` and CLIP_benchmark.
    `metadata` (strings only) goes into the safetensors header.
    """
    path = Path(path)
    # Contiguous CPU copies: safetensors refuses views and shared storage, and a .pt should not
    # pin the tensors to the device they were trained on.
    state_dict = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(model).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(tmp), metadata={"format": "pt", **(metadata or {})})
    elif path.suffix in (".pt", ".pth", ".bin"):
        torch.save(state_dict, tmp)
    else:
        raise ExportPathError(f"export path must end in .safetensors, .pt, .pth or .bin, got {path.name}")
    tmp.replace(path)  # atomic: a crash never leaves a half-written export under the final name
    return path
