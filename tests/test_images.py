"""Tests for attncap.images: every fixture picture is made here, in tmp_path."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from attncap.errors import AttncapError
from attncap.images import DEFAULT_MAX_PIXELS, decode_image, load_image


def _pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))


def _close(actual, expected, tol=6) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected))


def _assert_rgb(img: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == size


def _noise_jpeg(path, size=(64, 48)) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height, all black: a few KB on disk."""
    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    block = row * 1000
    idat = b"".join(packer.compress(block) for _ in range(height // 1000))
    idat += packer.compress(row * (height % 1000)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


# --- colour modes ---------------------------------------------------------------------------

def test_greyscale_and_bilevel(tmp_path):
    Image.new("L", (5, 4), 100).save(tmp_path / "grey.png")
    img = load_image(tmp_path / "grey.png")
    _assert_rgb(img, (5, 4))
    assert _pixel(img, (2, 2)) == (100, 100, 100)
    bilevel = Image.new("1", (3, 3), 0)
    bilevel.putpixel((1, 1), 1)
    bilevel.save(tmp_path / "bw.png")
    img = load_image(tmp_path / "bw.png")
    assert _pixel(img, (0, 0)) == (0, 0, 0) and _pixel(img, (1, 1)) == (255, 255, 255)


def test_rgba_transparent_becomes_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    _assert_rgb(img, (4, 4))
    assert _pixel(img, (0, 0)) == (255, 255, 255)
    assert _pixel(img, (3, 3)) == (255, 0, 0)
    assert _close(_pixel(img, (1, 0)), (127, 127, 255), tol=2)


def test_la_composited_on_white(tmp_path):
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((1, 0), (0, 0))
    la.save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert _pixel(img, (0, 0)) == (0, 0, 0)
    assert _pixel(img, (1, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(tmp_path, fmt):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 255, 0, 255, 0, 0] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)
    path = tmp_path / f"p.{fmt.lower()}"
    pal.save(path, fmt, transparency=0)
    assert Image.open(path).mode == "P"
    img = load_image(path)
    _assert_rgb(img, (4, 4))
    assert _pixel(img, (0, 0)) == (255, 255, 255)  # the transparent green index
    assert _pixel(img, (2, 2)) == (255, 0, 0)


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    cmyk.paste((0, 0, 0, 255), (0, 0, 8, 16))  # left half pure black
    cmyk.save(tmp_path / "c.jpg", "JPEG", quality=95)
    raw = Image.open(tmp_path / "c.jpg")
    assert raw.mode == "CMYK" and "adobe" in raw.info  # Adobe marker: inverted CMYK on disk
    img = load_image(tmp_path / "c.jpg")
    _assert_rgb(img, (16, 16))
    assert _close(_pixel(img, (12, 8)), (0, 255, 255), tol=12)
    assert _close(_pixel(img, (3, 8)), (0, 0, 0), tol=12)


def test_16bit_png_scaled_by_range(tmp_path):
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = load_image(tmp_path / "deep.png")
    _assert_rgb(img, (4, 1))
    greys = [_pixel(img, (x, 0))[0] for x in range(4)]
    assert greys[0] == 0 and greys[2] == 255
    assert abs(greys[1] - 128) <= 1
    assert greys[3] == 4  # 1000 / 65535 * 255, not clipped to 255


def test_float_and_int32_tiff(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    greys = [_pixel(load_image(tmp_path / "f.tif"), (x, 0))[0] for x in range(3)]
    assert greys == [0, 128, 255]
    deep = np.array([[0, 70000, 140000]], dtype=np.int32)  # beyond 16 bits: min-max scaled
    Image.fromarray(deep, "I").save(tmp_path / "i.tif")
    greys = [_pixel(load_image(tmp_path / "i.tif"), (x, 0))[0] for x in range(3)]
    assert greys == [0, 128, 255]


def test_exif_orientation_6_rotates(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rot.jpg", "JPEG", exif=exif, quality=95)
    img = load_image(tmp_path / "rot.jpg")
    _assert_rgb(img, (20, 40))
    assert _close(_pixel(img, (10, 5)), (255, 0, 0), tol=20)  # stored left -> displayed top
    assert _close(_pixel(img, (10, 34)), (0, 0, 255), tol=20)


def test_content_not_extension_decides(tmp_path):
    Image.new("RGB", (7, 3), (1, 2, 3)).save(tmp_path / "really_png.jpg", "PNG")
    img = load_image(tmp_path / "really_png.jpg")
    _assert_rgb(img, (7, 3))
    assert _pixel(img, (0, 0)) == (1, 2, 3)


def test_decode_image_bytes():
    buf = io.BytesIO()
    Image.new("RGBA", (6, 5), (10, 20, 30, 255)).save(buf, "PNG")
    img = decode_image(buf.getvalue())
    _assert_rgb(img, (6, 5))
    assert _pixel(img, (5, 4)) == (10, 20, 30)
    with pytest.raises(AttncapError, match=r"cannot read image upload\.bin: not an image"):
        decode_image(b"\x01\x02garbage" * 10, name="upload.bin")
    with pytest.raises(AttncapError, match="<upload>: empty"):
        decode_image(b"")


# --- failures -------------------------------------------------------------------------------

def _check_one_line_error(path, reason: str, **kwargs) -> str:
    with pytest.raises(AttncapError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    assert reason in message
    return message


def test_missing_file(tmp_path):
    _check_one_line_error(tmp_path / "photo.jpg", "file not found")


def test_directory(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    _check_one_line_error(tmp_path / "folder.jpg", "is a directory")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\nat all\n")
    _check_one_line_error(tmp_path / "notes.jpg", "not an image (looks like a text file)")


def test_html_page_named_jpg(tmp_path):
    (tmp_path / "page.jpg").write_text("<!DOCTYPE html><html><body>404</body></html>")
    _check_one_line_error(tmp_path / "page.jpg", "HTML page")


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    _check_one_line_error(tmp_path / "empty.png", "empty file")


def test_truncated_jpeg(tmp_path):
    _noise_jpeg(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _check_one_line_error(tmp_path / "cut.jpg", "truncated or corrupt image data")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _check_one_line_error(tmp_path / "cut.png", "truncated or corrupt image data")


def test_bomb_header_rejected_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bomb_png(20000, 20000))
    assert path.stat().st_size < 200_000
    start = time.perf_counter()
    message = _check_one_line_error(path, f"over the limit of {DEFAULT_MAX_PIXELS}")
    assert time.perf_counter() - start < 1.0
    assert "400000000" in message or "20000x20000" in message
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is left alone


def test_own_limit_checked_from_header(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_bomb_png(10000, 10000))  # over Pillow's warning level, under its error level
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak out
        _check_one_line_error(path, "10000x10000 pixels is over the limit of 50000000")
    Image.new("RGB", (300, 300)).save(tmp_path / "small.png")
    _check_one_line_error(tmp_path / "small.png", "300x300 pixels is over the limit of 10000", max_pixels=10_000)
    assert load_image(tmp_path / "small.png", max_pixels=90_000).size == (300, 300)
