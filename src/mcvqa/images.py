"""Loading and shaping images: safe decoding, RGB conversion, letterbox and native-resolution resizing.

Everything here is model-agnostic: it returns PIL images whose sides are multiples of 32 (Qwen-VL's
patch 16 x merge 2), so the model's image processor never has to resize again and the number of visual
tokens is known from the size alone.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mcvqa.config import ImageConfig
from mcvqa.errors import ImageError

FACTOR = 32  # patch_size 16 x spatial_merge_size 2: one visual token per 32x32 pixels
RESAMPLE = Image.Resampling.BICUBIC


def open_image(path: str | Path, max_image_pixels: int = 64_000_000) -> Image.Image:
    """Open lazily (header only) and refuse what can never be decoded safely."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found")
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; we apply our own limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageError(path, "image dimensions are too large to decode safely (decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file that can be read (wrong extension or corrupt header)") from None
    except OSError as e:
        raise ImageError(path, f"cannot be read ({e})") from None
    w, h = img.size
    if w * h > max_image_pixels:
        img.close()
        raise ImageError(
            path,
            f"{w}x{h} = {w * h:,} pixels exceeds the {max_image_pixels:,}-pixel limit (decompression-bomb guard); "
            "raise image.max_image_pixels if the image is genuine",
        )
    if w < 1 or h < 1:
        img.close()
        raise ImageError(path, f"invalid image size {w}x{h}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is composited on white (dark text on transparent stays legible)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 16-bit -> 8-bit keeping the full range
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        return img.convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, max_image_pixels: int = 64_000_000, draft_size: int | None = None) -> Image.Image:
    """Decode fully, apply EXIF orientation, convert to RGB. Raises :class:`ImageError` with a one-line reason.

    ``draft_size`` lets JPEG decoding skip detail we would throw away (DCT scaling), never going below it.
    """
    img = open_image(path, max_image_pixels)
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"truncated or corrupt image data ({e})") from None


def letterbox(img: Image.Image, size: int, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Scale the long side to ``size`` keeping aspect ratio, pad to a centred ``size x size`` square."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), RESAMPLE, reducing_gap=3.0)
    if (nw, nh) == (size, size):
        return img
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def native_size(w: int, h: int, max_pixels: int, min_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """Closest (w, h) to the original with both sides multiples of ``factor`` and area within the budget.

    Same rule as Qwen-VL's ``smart_resize``: a 540x720 photo stays 544x736 at the default budget -> 17x23 = 391 tokens.
    """
    nh = max(factor, round(h / factor) * factor)
    nw = max(factor, round(w / factor) * factor)
    if nh * nw > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        nh = max(factor, math.floor(h / beta / factor) * factor)
        nw = max(factor, math.floor(w / beta / factor) * factor)
    elif nh * nw < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        nh = math.ceil(h * beta / factor) * factor
        nw = math.ceil(w * beta / factor) * factor
    return nw, nh


def prepare(img: Image.Image, cfg: ImageConfig) -> Image.Image:
    """The image exactly as the model will see it."""
    if cfg.mode == "letterbox":
        size = max(FACTOR, round(cfg.size / FACTOR) * FACTOR)
        return letterbox(img, size, cfg.fill)
    nw, nh = native_size(*img.size, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels)
    return img if (nw, nh) == img.size else img.resize((nw, nh), RESAMPLE, reducing_gap=3.0)


def draft_size(cfg: ImageConfig) -> int | None:
    """Smallest side JPEG decoding may shrink to without losing detail the model would see."""
    if cfg.mode == "letterbox":
        return cfg.size
    return None  # native keeps (up to) full resolution


def load_prepared(path: str | Path, cfg: ImageConfig) -> Image.Image:
    return prepare(load_image(path, cfg.max_image_pixels, draft_size(cfg)), cfg)


def visual_tokens(img: Image.Image) -> int:
    """Visual tokens Qwen-VL spends on an image already shaped by :func:`prepare`."""
    w, h = img.size
    return (w // FACTOR) * (h // FACTOR)
