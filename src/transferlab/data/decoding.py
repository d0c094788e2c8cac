"""Decoding: any supported image file (or PIL image) into an 8-bit RGB PIL image, and why a file does not decode.

Large JPEGs are decoded at reduced scale, 16-bit and 32-bit images are scaled to 8 bits, the EXIF
orientation is applied. :data:`DECODER` names these rules; it is part of every feature-cache key.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# Errors PIL raises for zero-byte, truncated, corrupt or absurdly large files.
BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)

# How files become pixels; part of every cache key, so caches made by an older decoder are not reused.
# "exif-transpose": EXIF orientation is applied (a portrait phone photo is upright).
# "v2": 16-bit images are reduced (they failed) and EXIF-transposed (they were not); JPEGs over PIL's
# bomb limit at full size but not at their reduced scale decode (they were refused).
DECODER = "pil-rgb-exif-transpose-v2"

# Modes PIL cannot reduce or convert to RGB faithfully: they are box-reduced in float and scaled to 8 bits.
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


# Files that PIL warns about but decodes (bomb-sized below its refusal limit, palette transparency, EXIF
# oddities) are decoded anyway, so those warnings are filtered, once, by origin: decoding runs in several
# threads at once, and warnings.catch_warnings is not thread-safe (two threads leaving it out of order
# leave "ignore every warning" installed in the process for good).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def _is_jpeg(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == b"\xff\xd8\xff"


def _check_decoded_size(img: Image.Image) -> None:
    """PIL's decompression-bomb rule (refuse over twice ``Image.MAX_IMAGE_PIXELS``), on the size that will be decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.size[0] * img.size[1] > 2 * limit:
        raise Image.DecompressionBombError(
            f"Image size ({img.size[0] * img.size[1]} pixels, decoded at {img.size[0]}x{img.size[1]}) exceeds limit of "
            f"{2 * limit} pixels, could be decompression bomb DOS attack.")


def open_image(path: str, min_size: int | None = None) -> Image.Image:
    """Open `path` lazily; a JPEG is set to decode at reduced scale (``draft``), still >= `min_size` on each side.

    PIL's decompression-bomb limit applies to the size actually decoded: a JPEG too large at full
    size but not at its reduced scale is opened; one still too large reduced is refused.
    """
    try:
        img: Image.Image = Image.open(path)
    except Image.DecompressionBombError:
        if min_size is None or not _is_jpeg(path):
            raise
        from PIL import JpegImagePlugin

        img = JpegImagePlugin.JpegImageFile(path)  # what Image.open builds, without its full-size check
        img.draft("RGB", (min_size, min_size))
        _check_decoded_size(img)
        return img
    if min_size is not None and img.format == "JPEG":
        img.draft("RGB", (min_size, min_size))
    return img


def to_rgb(img: Image.Image, min_size: int | None = None) -> Image.Image:
    """Everything :func:`load_rgb` does after opening a file, for a PIL image from anywhere: an 8-bit RGB image.

    Non-JPEG images with a short side of at least 4 x `min_size` are box-reduced right after decoding
    (kept at >= 2 x `min_size`) so later steps work on a small copy; a JPEG straight from
    ``Image.open`` (not yet loaded) is decoded at reduced scale, as from a path. 16-bit and 32-bit
    grey images are scaled to 8 bits (16-bit: v / 65535 * 255, rounded). A palette image with
    transparency goes through RGBA; the EXIF orientation is applied, so a photo taken in portrait is
    upright; grey, palette, RGBA and CMYK images become RGB; alpha is dropped. For a PNG path ``p``,
    ``to_rgb(Image.open(p), m)`` equals ``load_rgb(p, m)`` pixel for pixel.
    """
    if min_size is not None and img.format == "JPEG":
        img.draft("RGB", (min_size, min_size))  # a no-op once loaded
    img.load()
    info = {k: v for k, v in img.info.items() if k != "transparency"}  # keeps the EXIF orientation
    top = None
    if img.mode in HIGH_DEPTH_MODES:
        top = 65535.0 if img.mode.startswith("I;16") or float(np.asarray(img).max()) > 255 else 255.0
        img = img.convert("F")  # PIL cannot reduce 16-bit modes; float also averages without rounding
    if min_size is not None and img.format != "JPEG":
        factor = min(img.size) // (2 * min_size)
        if factor >= 2 and img.mode not in ("P", "1"):
            img = img.reduce(factor)
    if top is not None:
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        img.info.update(info)
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    img = ImageOps.exif_transpose(img) or img
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str, min_size: int | None = None) -> Image.Image:
    """Decode any supported image file into an 8-bit RGB PIL image: :func:`open_image`, then :func:`to_rgb`.

    Large JPEGs are decoded at reduced scale (still >= `min_size` on each side) so an 8000x6000 photo
    never materialises at full size; other large images are box-reduced right after decoding.
    """
    return to_rgb(open_image(path, min_size), min_size)


def describe_bad_image(path: str) -> str:
    """A short reason why `path` does not decode (for error listings)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        load_rgb(path)
    except BAD_IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}".splitlines()[0][:120]
    return "decoded on retry"
