"""An image-captioning model from Hugging Face `transformers`, with its decoding settings.

Any model that `AutoModelForImageTextToText` and `AutoProcessor` load works (BLIP, BLIP-2, GIT,
vision-encoder-decoder, ...); the default is BLIP base, the closest model in transformers to the
OFA-base captioner the ALIP paper used. A model is loaded from a local folder, or by hub name. A
hub name is only downloaded when the machine can reach the hub and HF_HUB_OFFLINE is not set;
otherwise it must already be in the local Hugging Face cache.

Whether the hub can be reached is probed first (`hub_reachable`: one TCP connection, a few
seconds), because on a machine without network huggingface_hub retries every file for minutes
before it gives up. An unreachable hub means loading from the cache only, as HF_HUB_OFFLINE=1
would. ALIP_HUB_PROBE=0 skips the probe (e.g. where only an HTTP proxy the probe does not know
about reaches the hub).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from alip.caption import DEFAULT_MODEL
from alip.cli import UserError
from alip.data.ingest.sources import InputError

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(UserError, RuntimeError):
    """The captioning model cannot be loaded: a missing folder, not cached while offline, not image-to-text."""


@dataclass(frozen=True)
class DecodeSettings:
    """Generation settings, recorded in the sidecar header.

    The defaults give short descriptive captions like OFA's in the paper (a small beam, at most 30
    new tokens, no repeated trigrams, as OFA's caption decoding uses no_repeat_ngram_size=3).
    Lengths count generated tokens only, not the prompt.
    """

    prompt: str = ""  # e.g. "a picture of" for BLIP's conditional captioning
    num_beams: int = 3
    max_length: int = 30
    min_length: int = 5
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    strip_prompt: bool = True  # drop the prompt from the front of the caption

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise InputError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 0 <= self.min_length <= self.max_length or self.max_length < 1:
            raise InputError(f"need 0 <= min_length <= max_length and max_length >= 1, got {self}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise InputError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it, else fp16 on GPU, and fp32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a separator is meant as a folder
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_address() -> tuple[str, int]:
    """(host, port) the first connection to the hub goes to: the HTTPS proxy if one is set, else
    HF_ENDPOINT's host (default huggingface.co)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (`hub_address`) opens within `timeout` seconds.

    The connection runs in a thread joined with the timeout, because a name lookup that hangs is
    not bounded by the socket's own timeout. ALIP_HUB_PROBE=0 skips the probe (says reachable).
    """
    if os.environ.get("ALIP_HUB_PROBE", "").strip() == "0":
        return True
    opened: list[bool] = []
    done = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection(hub_address(), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass
        finally:
            done.set()

    threading.Thread(target=connect, daemon=True).start()
    return done.wait(timeout) and bool(opened)


def load_model(
    name_or_path: str, dtype: torch.dtype, device: torch.device, hub_probe: Callable[[], bool] = hub_reachable
):
    """(model, processor) in eval mode on `device`. Raises ModelLoadError with what to do about it.

    A hub name is looked up in the local cache only when HF_HUB_OFFLINE is set or `hub_probe()`
    says the hub cannot be reached.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(name_or_path).expanduser()
    local = path.exists()
    if local and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a model folder (no config.json); point --model at a save_pretrained folder"
        )
    if not local and _looks_like_path(name_or_path):
        raise ModelLoadError(f"model folder not found: {name_or_path}")
    offline = _hub_offline()
    unreachable = not local and not offline and not hub_probe()
    # local_files_only makes an uncached hub name fail fast instead of trying the network when offline
    kwargs = {"local_files_only": local or offline or unreachable}
    try:
        processor = AutoProcessor.from_pretrained(str(path) if local else name_or_path, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(str(path) if local else name_or_path, dtype=dtype, **kwargs)
    except OSError as e:
        if local:
            raise ModelLoadError(f"cannot load the model in {path}: {e}") from None
        fetch = (
            f"fetch it on a machine with internet (huggingface-cli download {name_or_path}) and copy the "
            "cache or folder here, or pass a local folder"
        )
        if offline:
            hint = f"HF_HUB_OFFLINE is set, so nothing is downloaded: {fetch}"
        elif unreachable:
            host, port = hub_address()
            hint = f"the hub ({host}:{port}) cannot be reached from this machine and it is not cached: {fetch}"
        else:
            hint = "check the name, the network and your Hugging Face credentials, or pass a local folder"
        raise ModelLoadError(f"cannot load model {name_or_path!r} from the hub or the local cache: {hint}") from None
    except ValueError as e:  # e.g. a text-only model: no image-text-to-text class for its config
        raise ModelLoadError(f"{name_or_path} is not an image-to-text model transformers can load: {e}") from None
    if unreachable:
        host, port = hub_address()
        logger.warning("the hub (%s:%d) cannot be reached: loaded %s from the local cache", host, port, name_or_path)
    return model.to(device).eval(), processor


class Captioner:
    """A loaded model + processor + decoding settings. `preprocess` is cheap to pickle into loader workers."""

    def __init__(self, model, processor, settings: DecodeSettings, name: str) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self.name = name
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._prompt_ids = None
        if settings.prompt:
            tokenizer = getattr(processor, "tokenizer", processor)
            self._prompt_ids = tokenizer([settings.prompt], return_tensors="pt")["input_ids"].to(self.device)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_MODEL,
        settings: DecodeSettings | None = None,
        device="cpu",
        dtype="auto",
        hub_probe: Callable[[], bool] = hub_reachable,
    ) -> Captioner:
        device = torch.device(device)
        model, processor = load_model(name_or_path, resolve_dtype(dtype, device), device, hub_probe)
        return cls(model, processor, settings or DecodeSettings(), name_or_path)

    @property
    def image_processor(self):
        return getattr(self.processor, "image_processor", self.processor)

    def describe(self) -> dict:
        """What made the captions: recorded in the sidecar and compared when a run resumes."""
        return {
            "model": self.name,
            "model_class": type(self.model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            **asdict(self.settings),
        }

    @torch.inference_mode()
    def caption(self, pixel_values: torch.Tensor) -> list[str]:
        """Captions of a batch of preprocessed images [B, 3, H, W]; greedy/beam search, no sampling."""
        s = self.settings
        inputs = {"pixel_values": pixel_values.to(self.device, self.dtype, non_blocking=True)}
        if self._prompt_ids is not None:
            ids = self._prompt_ids.repeat(pixel_values.shape[0], 1)  # not expand(): BLIP writes into input_ids
            inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        out = self.model.generate(
            **inputs,
            do_sample=False,
            num_beams=s.num_beams,
            max_new_tokens=s.max_length,
            min_new_tokens=s.min_length,
            repetition_penalty=s.repetition_penalty,
            no_repeat_ngram_size=s.no_repeat_ngram_size,
        )
        texts = [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        if s.prompt and s.strip_prompt:
            # decoder-only models and BLIP echo the prompt (uncased tokenizers lower-case it)
            p = s.prompt.strip().lower()
            texts = [t[len(p) :].strip() if t.lower().startswith(p) else t for t in texts]
        return texts
