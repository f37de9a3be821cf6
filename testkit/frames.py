"""Synthetic frames made from the committed public-domain photos (tests/fixtures): a face photo
placed in a webcam-sized frame, the five-face group photo, and webcam JPEGs."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
# Where the group photo's five faces sit, as fractions of its width and height.
FIVE_FACES = [(0.5, 0.5), (0.15, 0.25), (0.85, 0.25), (0.2, 0.75), (0.8, 0.75)]


def photo(name: str) -> np.ndarray:
    """A photo of tests/fixtures as an RGB array (``astronaut``, ``rocket``)."""
    return np.asarray(Image.open(DATA / f"{name}.jpg").convert("RGB"))


def place(picture: np.ndarray, zoom: float, cx: float, cy: float,
          size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """``picture`` at ``zoom`` x the frame height, centred at (cx, cy), on a flat background."""
    w, h = size
    s = zoom * h / picture.shape[0]
    m = np.array([[s, 0, cx - s * picture.shape[1] / 2], [0, s, cy - s * picture.shape[0] / 2]])
    return cv2.warpAffine(picture, m, size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(70, 80, 90))


def group_photo(size: tuple[int, int] = (1280, 720), faces: int = 5) -> np.ndarray:
    """The rocket photo with ``faces`` (up to five) copies of the astronaut's face, each a
    quarter of the frame's height tall."""
    w, h = size
    scene = np.asarray(Image.open(DATA / "rocket.jpg").convert("RGB").resize(size)).copy()
    side = h // 4
    face = cv2.resize(photo("astronaut")[30:210, 150:300], (side * 150 // 180, side))
    for fx, fy in FIVE_FACES[:faces]:
        x, y = int(fx * w - face.shape[1] / 2), int(fy * h - face.shape[0] / 2)
        scene[y:y + face.shape[0], x:x + face.shape[1]] = face
    return scene


def jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def webcam_jpegs(count: int = 8) -> list[bytes]:
    """640x480 JPEG frames, one face each (the astronaut, 400 px), shifted 10 px per frame."""
    face = np.asarray(Image.fromarray(photo("astronaut")).resize((400, 400)))
    frames = []
    for i in range(count):
        canvas = np.full((480, 640, 3), 90, np.uint8)
        canvas[40:440, 60 + 10 * i:460 + 10 * i] = face
        frames.append(jpeg(canvas))
    return frames
