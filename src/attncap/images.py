"""Robust image loading: every picture the toolkit reads (training, evaluation, CLI, server) comes in here.

The result is always a fully loaded 8-bit RGB :class:`PIL.Image.Image` with its EXIF orientation
applied. The content decides the format, never the file extension. Anything that goes wrong (missing
file, text file, truncated download, decompression bomb) becomes one :class:`AttncapError` line that
names the file and the reason.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import AttncapError

DEFAULT_MAX_PIXELS = 50_000_000

# Exceptions Pillow's decoders raise on damaged data (a truncated JPEG is an OSError, a broken
# PNG chunk a SyntaxError or zlib.error, a bad TIFF tag a struct.error or ValueError).
_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                struct.error, zlib.error)
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "RGBa"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read the image file at ``path`` as a loaded 8-bit RGB image, EXIF orientation applied.

    Images with more than ``max_pixels`` pixels are refused from their header, before decoding.
    Raises :class:`AttncapError` (one line: file name and reason) for anything unreadable.
    """
    name = os.fspath(path)
    path = Path(path)
    if path.is_dir():
        raise _error(name, "is a directory")
    if not path.exists():
        raise _error(name, "file not found")
    try:
        with open(path, "rb") as fp:
            if path.stat().st_size == 0:
                raise _error(name, "empty file (0 bytes)")
            return _decode(fp, name, max_pixels)
    except PermissionError:
        raise _error(name, "permission denied") from None


def decode_image(data: bytes, name: str = "<upload>",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (an upload, a zip member) exactly like :func:`load_image`.

    ``name`` only appears in error messages.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise _error(name, "empty data (0 bytes)")
    return _decode(io.BytesIO(bytes(data)), name, max_pixels)


def _error(name: str, reason: str) -> AttncapError:
    """The one-line error every failure in this module becomes."""
    return AttncapError(f"cannot read image {name}: {reason}")


def _decode(fp: IO[bytes], name: str, max_pixels: int) -> Image.Image:
    """Open, check the size from the header, decode, orient and convert to RGB."""
    with warnings.catch_warnings():
        # Our own max_pixels check below is the authority; Pillow's softer warning is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = _open(fp, name, max_pixels)
        with img:
            _check_size(img.size, name, max_pixels)
            _load(img, name, max_pixels)
            oriented = _apply_orientation(img)
    return to_rgb(oriented, name)


def _open(fp: IO[bytes], name: str, max_pixels: int) -> Image.Image:
    """``Image.open`` (reads the header only) with its failures turned into our error."""
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        fp.seek(0)
        raise _error(name, _not_an_image_reason(fp.read(512))) from None
    except Image.DecompressionBombError as exc:
        raise _error(name, _bomb_reason(str(exc), max_pixels)) from None
    except _DATA_ERRORS:
        raise _error(name, "corrupt image header") from None


def _load(img: Image.Image, name: str, max_pixels: int) -> None:
    """Decode the pixel data; truncated or damaged data is an error, never a half-grey picture."""
    try:
        img.load()
    except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than its header said
        raise _error(name, _bomb_reason(str(exc), max_pixels)) from None
    except _DATA_ERRORS:
        raise _error(name, "truncated or corrupt image data") from None


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    """Refuse images over ``max_pixels`` before their pixels are decoded (decompression bombs)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise _error(name, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise _error(name, f"{width}x{height} pixels is over the limit of {max_pixels} "
                           "(pass a larger max_pixels to allow it)")


def _bomb_reason(message: str, max_pixels: int) -> str:
    """Reword Pillow's own DecompressionBombError, raised inside ``Image.open`` before we see the size."""
    match = _BOMB_PIXELS.search(message)
    if match is None:
        return f"over Pillow's decompression-bomb limit ({message})"
    pixels = int(match.group(1))
    if pixels > max_pixels:
        return f"{pixels} pixels is over the limit of {max_pixels} (pass a larger max_pixels to allow it)"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return f"{pixels} pixels is over Pillow's limit of {limit} (raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"


def _not_an_image_reason(head: bytes) -> str:
    """Say what the file looks like instead, from its first bytes."""
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text[:256]:
        return "not an image (looks like an HTML page)"
    control = sum(1 for byte in head if byte < 32 and byte not in b"\t\n\r\f")
    if head and b"\x00" not in head and control <= len(head) // 20:
        return "not an image (looks like a text file)"
    return "not an image (unknown or unsupported format)"


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Return a loaded copy rotated as its EXIF Orientation tag says.

    A damaged EXIF block only costs the rotation: the pixels themselves decoded fine.
    """
    try:
        return ImageOps.exif_transpose(img)
    except _DATA_ERRORS:
        return img.copy()


def to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(img)
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")  # palette and tRNS transparency become a real alpha channel
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # 1, L, CMYK (Adobe-inverted JPEGs are undone by Pillow), YCbCr...
    except ValueError:
        raise _error(name, f"unsupported colour mode {img.mode}") from None


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float greyscale to 8 bits by its value range (no clipping)."""
    values = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = _value_range(values, img.mode)
    scaled = (values - low) / max(high - low, 1e-12) * 255.0
    grey = np.clip(np.round(scaled), 0, 255).astype(np.uint8)  # (H, W)
    return Image.fromarray(grey, "L").convert("RGB")


def _value_range(values: np.ndarray, mode: str) -> tuple[float, float]:
    """The nominal range of the data: full 16-bit for I;16, else the smallest standard range that fits."""
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    low, high = float(values.min()), float(values.max())
    nominal = [(0.0, 1.0)] if mode == "F" else []
    for lo, hi in nominal + [(0.0, 255.0), (0.0, 65535.0)]:
        if low >= lo and high <= hi:
            return lo, hi
    return low, high
