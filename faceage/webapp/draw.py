"""Pictures for the page: faces drawn on frames (faceage.inference.annotate, Pillow only), status
banners, JPEG/PNG encoding."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from faceage.inference.annotate import draw_faces

BANNER_OK = (20, 20, 20)
BANNER_WARN = (200, 30, 30)


def draw_frame(rgb: np.ndarray, faces: Sequence[dict[str, Any]], banner: str | None = None,
               warn: bool = False) -> np.ndarray:
    """``rgb`` with each face's box and age drawn, and an optional one-line banner on top."""
    im = draw_faces(rgb, faces) if faces else Image.fromarray(rgb)
    if banner:
        draw = ImageDraw.Draw(im)
        size = max(12, round(im.height / 28))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow without FreeType
            font = ImageFont.load_default()
        left, top, right, bottom = draw.textbbox((0, 0), banner, font=font)
        pad = max(3, size // 4)
        draw.rectangle([0, 0, right - left + 2 * pad, bottom - top + 2 * pad],
                       fill=BANNER_WARN if warn else BANNER_OK)
        draw.text((pad - left, pad - top), banner, fill=(255, 255, 255), font=font)
    return np.asarray(im)


def interval_text(face: dict[str, Any]) -> str:
    """``29–40``: the face's age interval in whole years, or ``–`` when Serve sent none."""
    interval = face.get("age_interval")
    if not interval or len(interval) != 2:
        return "–"
    return f"{interval[0]:.0f}–{interval[1]:.0f}"


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an RGB array (OpenCV: several times faster than Pillow for video frames)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("could not encode the frame as JPEG")
    return buf.tobytes()


def encode_image(im: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    """``im`` encoded as ``fmt`` (PNG or JPEG) for a download button."""
    pil = Image.fromarray(im) if isinstance(im, np.ndarray) else im
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def shrink(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``rgb`` scaled down so its longer side is at most ``max_side``, and the scale used."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return rgb, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale


def face_thumbnail(rgb: np.ndarray, box: Sequence[float], height: int = 96,
                   margin: float = 0.2) -> np.ndarray:
    """The face in ``box`` (widened by ``margin`` of its size on each side), ``height`` px high:
    which face a correction input is about."""
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    left, top = max(0, int(x1 - mx)), max(0, int(y1 - my))
    right, bottom = min(w, int(x2 + mx) + 1), min(h, int(y2 + my) + 1)
    if right <= left or bottom <= top:
        return np.zeros((height, height, 3), np.uint8)
    face = rgb[top:bottom, left:right]
    width = max(1, round(face.shape[1] * height / face.shape[0]))
    return cv2.resize(face, (width, height), interpolation=cv2.INTER_AREA)
