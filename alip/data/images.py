"""Validate one input image and turn it into JPEG bytes that DALI decodes.

DALI cannot skip a bad image in the middle of training, so every image is fully decoded here
before it enters a shard. Zero-byte, truncated and corrupt files and decompression bombs are
rejected with a reason. Everything else is converted to RGB. An RGB or grayscale JPEG that needs
no resize and no EXIF rotation passes through byte for byte; that is the fast path.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


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
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")  # 16-bit grayscale -> 8-bit
    return img.convert("RGB")


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
        # PIL names the buffer ("<_io.BytesIO object at 0x7f...>"): a memory address would make
        # the reports of identical runs differ
        reason = _OBJECT_REPR.sub("", str(e).splitlines()[0] if str(e) else "").strip() or type(e).__name__
        raise BadImage(f"corrupt or unreadable image: {reason}") from None
    if width == 0 or height == 0:
        raise BadImage(f"image has no pixels ({width}x{height})")
    return img


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
    if rotated:  # bake the rotation in: decoders disagree on whether to honour EXIF orientation
        img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    if too_big:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return PreparedImage(out.getvalue(), img.width, img.height, False, mode, fmt)
