"""Validate one input image and turn it into JPEG bytes that DALI decodes.

DALI cannot skip a bad image in the middle of training, so every image is fully decoded here
before it enters a shard. Zero-byte, truncated and corrupt files and decompression bombs are
rejected with a reason. Everything else is converted to RGB, 16-bit and float images scaled to
8 bits (see `_to_8bit`). An RGB or grayscale JPEG that needs no resize and no EXIF rotation
passes through byte for byte; that is the fast path. An image that cannot be converted or
encoded (JPEG allows at most 65500 pixels a side) is a skip with its reason, like a corrupt one.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
JPEG_MAX_SIDE = 65500  # libjpeg's limit on either side


class BadImage(ValueError):
    """The image cannot enter a shard; str(e) is the reason for the skip report."""


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    width: int
    height: int
    passthrough: bool  # the input bytes were kept unchanged
    source_mode: str  # PIL mode of the input ("RGB", "L", "RGBA", "P", "CMYK", ...)
    source_format: str | None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white, as a viewer would show it."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode == "F" or img.mode.startswith("I"):
        img = _to_8bit(img)
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """8-bit grayscale from a 16-bit, 32-bit integer or float image, scaled, not clipped.

    PIL's own convert() clips these values to 0..255: a float image in 0..1 becomes all black.
    - 16-bit ("I;16*"): the type fixes the range; 0..65535 -> 0..255 (/257 maps 65535 to 255).
    - float within [0, 1]: the convention of float images (1.0 = white, as in skimage) -> x255.
    - other float and 32-bit integer data ("I") have no fixed range (depth, HDR, scientific
      images): the image's own min..max is stretched to 0..255, so it is never all black or white.
    """
    a = np.asarray(img, dtype=np.float32)
    if not np.isfinite(a).all():
        raise BadImage(f"float image ({img.mode}) with NaN or infinite pixels")
    lo, hi = float(a.min()), float(a.max())
    if img.mode.startswith("I;16"):
        a = a / 257
    elif img.mode == "F" and 0 <= lo and hi <= 1:
        a = a * 255
    elif hi > lo:
        a = (a - lo) * (255 / (hi - lo))
    else:  # a constant image: no range to stretch
        a = np.clip(a, 0, 255)
    return Image.fromarray(np.rint(a).astype(np.uint8))


def open_image(data: bytes, max_pixels: int = 89_478_485) -> Image.Image:
    """Fully decode `data` and check it; the image keeps its own mode and orientation. Raises BadImage.

    `max_pixels` is our bomb limit. PIL's process-wide guard is left alone (no global side
    effects); it refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS, about 179 Mpx, on its own.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. PIL's palette-transparency notices
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"decompression bomb: {width}x{height} = {width * height} pixels > limit {max_pixels}")
            img.load()  # the full decode: raises on truncated or corrupt data
    except BadImage:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard fired first
        raise BadImage(f"decompression bomb: {e}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for bad files
        raise BadImage(f"corrupt or unreadable image: {_reason(e)}") from None
    if width == 0 or height == 0:
        raise BadImage(f"image has no pixels ({width}x{height})")
    return img


def _reason(error: Exception) -> str:
    # PIL names the buffer ("<_io.BytesIO object at 0x7f...>"): a memory address would make
    # the reports of identical runs differ
    text = str(error).splitlines()[0] if str(error) else ""
    return _OBJECT_REPR.sub("", text).strip() or type(error).__name__


def _is_rotated(img: Image.Image) -> bool:
    return img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)


def decode_image(data: bytes, max_pixels: int = 89_478_485) -> Image.Image:
    """Decode and check `data`: an upright RGB image, as data2rec stores it. Raises BadImage."""
    img = open_image(data, max_pixels)
    if _is_rotated(img):
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def prepare_image(
    data: bytes, max_side: int | None = None, quality: int = 95, max_pixels: int = 89_478_485
) -> PreparedImage:
    """Decode and check `data`; return JPEG bytes ready for a shard, or raise BadImage."""
    img = open_image(data, max_pixels)
    width, height = img.size
    fmt, mode = img.format, img.mode
    rotated = _is_rotated(img)
    too_big = max_side is not None and max(width, height) > max_side
    if fmt == "JPEG" and mode in ("RGB", "L") and not rotated and not too_big:
        return PreparedImage(data, width, height, True, mode, fmt)
    try:
        img = _convert(img, rotated, max_side if too_big else None)
        jpeg = _encode_jpeg(img, quality)
    except BadImage:
        raise
    except Exception as e:  # one image that PIL cannot convert or encode must not abort a conversion
        raise BadImage(f"cannot convert to JPEG: {_reason(e)}") from None
    return PreparedImage(jpeg, img.width, img.height, False, mode, fmt)


def _convert(img: Image.Image, rotated: bool, max_side: int | None) -> Image.Image:
    if rotated:  # bake the rotation in: decoders disagree on whether to honour EXIF orientation
        img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    if max_side is not None:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return img


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    if max(img.size) > JPEG_MAX_SIDE:  # PIL's own message for this is garbled
        raise BadImage(
            f"too large for JPEG: {img.width}x{img.height} (at most {JPEG_MAX_SIDE} pixels a side); "
            "--max-side resizes such images"
        )
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()
