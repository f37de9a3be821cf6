"""Decoding photos: a path, bytes or file to an upright HxWx3 uint8 RGB array, with the size and
format checks every entry point (CLI, Serve, prepare, evaluate) shares.

``load_photo`` may decode a large JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling,
Pillow's ``draft``): a 12-megapixel phone photo decodes 3x faster, a 48-megapixel one 4-8x
(less for noisier, larger files; docs/serve.md, "Phone photos"), and detection works on a copy
at most ``DetectorConfig.max_side`` long anyway. ``Photo`` keeps the original size, so boxes and
landmarks are reported in the original photo's pixels.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from faceage.errors import ImageError

# HEIC/HEIF, what iPhones save by default (libheif, through pillow-heif). It applies the file's
# rotation itself and resets the EXIF orientation to 1, so exif_transpose below does no harm.
pillow_heif.register_heif_opener()

# Enough for a 60-megapixel camera; a decoded image costs 3 bytes per pixel.
DEFAULT_MAX_PIXELS = 64_000_000
# Pillow plugins that decode in-process; EPS (Ghostscript) and exotic formats are not accepted.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "HEIF", "BMP", "GIF", "TIFF", "PPM")
# EXIF orientations that swap width and height (a quarter turn).
_QUARTER_TURNS = (5, 6, 7, 8)


@dataclass
class Photo:
    """A decoded photo: ``pixels`` (upright HxWx3 uint8 RGB), maybe decoded at a reduced scale,
    and the upright size of the original, ``width`` x ``height``."""

    pixels: np.ndarray
    width: int
    height: int

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per decoded pixel, (x, y): 1.0 for a full-size decode."""
        return self.width / self.pixels.shape[1], self.height / self.pixels.shape[0]


def _describe(source: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "image"


ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


def load_image(source: ImageSource, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a photo (path, bytes or binary file) to an upright HxWx3 uint8 RGB array.

    Honours EXIF orientation and converts grayscale, alpha, palette, CMYK and 16-bit images.
    Raises ``ImageError`` (status 400) for anything that is not a complete image and
    (status 413) for one above ``max_pixels``, checked before the pixels are decoded.
    """
    return load_photo(source, name=name, max_pixels=max_pixels).pixels


def load_photo(source: ImageSource, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int = 0) -> Photo:
    """``load_image``, keeping the original size; with ``reduce_to`` > 0, a JPEG whose longer
    side is at least twice that is decoded at the smallest of 1/2, 1/4 or 1/8 scale that keeps
    its longer side at least ``reduce_to`` (other formats always decode at full size)."""
    label = _describe(source, name)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        try:
            data = path.read_bytes()
        except IsADirectoryError:
            raise ImageError(f"{label}: is a folder, not an image file") from None
        except OSError as exc:
            raise ImageError(f"{label}: cannot read the file ({exc.strerror or exc})") from None
        fp: BinaryIO = io.BytesIO(data)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        fp = io.BytesIO(data)
    else:
        data = source.read()
        fp = io.BytesIO(data)
    if not data:
        raise ImageError(f"{label}: the file is empty (0 bytes)")
    with warnings.catch_warnings():
        # The size is checked below against our own limit; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:
            raise ImageError(f"{label}: the image has too many pixels to decode safely",
                             status=413) from None
        except UnidentifiedImageError:
            raise ImageError(f"{label}: not an image, or not one of the supported formats "
                             f"({', '.join(IMAGE_FORMATS)})") from None
        except Exception as exc:  # Pillow raises many types for malformed headers
            raise ImageError(f"{label}: cannot read the image header ({exc})") from None
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(
                f"{label}: {width}x{height} is {width * height / 1e6:.1f} megapixels, above the "
                f"limit of {max_pixels / 1e6:.0f}; resize it first", status=413)
        if width == 0 or height == 0:
            raise ImageError(f"{label}: the image has no pixels ({width}x{height})")
        if reduce_to and im.format == "JPEG" and max(width, height) >= 2 * reduce_to:
            k = reduce_to / max(width, height)
            im.draft(im.mode, (max(1, int(width * k)), max(1, int(height * k))))
        try:
            im.load()
        except Exception as exc:
            raise ImageError(f"{label}: the image data is truncated or corrupt ({exc})") from None
    try:
        turned = im.getexif().get(0x0112) in _QUARTER_TURNS
        im = ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block should not cost the picture
        turned = False
    pixels = to_rgb_array(im)
    if turned:
        width, height = height, width
    return Photo(pixels, width, height)


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → HxWx3 uint8 RGB; 16-bit scaled down, transparency over white."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (Pillow opens 16-bit PNG and TIFF gray as I;16, I;16B or I): Pillow's
        # convert("L"/"RGB") clips at 255, which turns the photo nearly white. "I" holding only
        # 0-255 is 8-bit data in a 32-bit container.
        a = np.asarray(im)
        if mode == "I" and a.max(initial=0) <= 255:
            gray = np.clip(a, 0, 255).astype(np.uint8)
        else:
            # The high byte, as Pillow reduces 16-bit RGB: exact for both ways of widening
            # 8-bit data (v * 257 and v << 8).
            gray = (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        peak = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        gray = np.clip(a * (255.0 / peak), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def check_image_array(image: np.ndarray, label: str = "image") -> np.ndarray:
    """Accept an HxWx3 uint8 RGB array (the form every function here takes)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ImageError(f"{label}: expected an HxWx3 RGB array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ImageError(f"{label}: expected uint8 pixels, got {image.dtype}")
    return image
