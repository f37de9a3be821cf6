"""Photos as phones take them, made from tests/fixtures/astronaut.jpg: 12 and 48 megapixels, JPEG
with light sensor-like noise (so they compress to a phone's file sizes), and HEIC."""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

PORTRAIT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "astronaut.jpg"
# The noise that gives a phone's file sizes: 4000x3000 at q95 ~4.8 MB, 8000x6000 at q85 ~13 MB.
NOISE = {12: 7.0, 48: 14.0}


def phone_scene(width: int, height: int, noise: float = 0.0, seed: int = 0) -> Image.Image:
    """A ``width`` x ``height`` landscape photo: the portrait scaled to the full height in the
    middle of a flat background (one face, about a fifth of the shorter side)."""
    face = Image.open(PORTRAIT).convert("RGB").resize((height, height), Image.BICUBIC)
    scene = Image.new("RGB", (width, height), (90, 110, 140))
    scene.paste(face, ((width - height) // 2, 0))
    if not noise:
        return scene
    rng = np.random.default_rng(seed)
    pixels = np.asarray(scene, np.float32)
    for row in range(0, height, 512):  # in bands: a 48 MP float copy at once costs 0.6 GB
        band = pixels[row:row + 512]
        band += rng.normal(0, noise, band.shape).astype(np.float32)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@lru_cache(maxsize=4)  # bytes: one encode per process, however many tests ask
def phone_jpeg(megapixels: int = 12, quality: int | None = None) -> bytes:
    """A 4000x3000 (12) or 8000x6000 (48) JPEG at a phone's quality (q95 / q85)."""
    width, height = {12: (4000, 3000), 48: (8000, 6000)}[megapixels]
    quality = quality or (95 if megapixels == 12 else 85)
    buf = io.BytesIO()
    phone_scene(width, height, NOISE[megapixels]).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@lru_cache(maxsize=2)
def phone_heic(turned: bool = True, preset: str = "ultrafast") -> bytes:
    """A 12-megapixel HEIC (4032x3024 upright); ``turned``: stored a quarter turn off with
    EXIF orientation 6, as a phone held upright-sideways saves it. ``preset``: x265's encoder
    preset; "ultrafast" encodes in a quarter of the time of "medium" (x265's default, 2.3 s
    against 8.4 s here) and any HEVC decoder reads both."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    scene = phone_scene(4032, 3024)
    exif = Image.Exif()
    if turned:
        scene = scene.transpose(Image.Transpose.ROTATE_90)
        exif[0x0112] = 6
    buf = io.BytesIO()
    scene.save(buf, "HEIF", quality=50, exif=exif.tobytes(), enc_params={"preset": preset})
    return buf.getvalue()


def small_jpeg(width: int = 640, height: int = 480) -> bytes:
    """The same scene at webcam size, for ratios against the phone photos."""
    buf = io.BytesIO()
    phone_scene(width, height).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels that never come: a pixel bomb
    without the pixels, refused from its header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
