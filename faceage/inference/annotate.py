"""Draw face records (boxes, landmarks, ages) on a picture; Pillow only, so clients can use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BOX_COLOUR = (0, 220, 90)
TEXT_COLOUR = (0, 0, 0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def age_label(face: dict[str, Any], dash: str = "-") -> str:
    """``34 (29-40)``: the age and its interval, rounded to years; just ``34`` for a record
    without ``age_interval`` (an older Serve). Pillow's default font has no en dash, the page
    asks for one."""
    interval = face.get("age_interval")
    if not interval or len(interval) != 2:
        return f"{face['age']:.0f}"
    low, high = interval
    return f"{face['age']:.0f} ({low:.0f}{dash}{high:.0f})"


def draw_faces(image: np.ndarray | Image.Image, faces: Sequence[dict[str, Any]]) -> Image.Image:
    """A copy of ``image`` with each face record's box, landmarks and age (and interval) drawn."""
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")
    im = im.copy()
    draw = ImageDraw.Draw(im)
    width = max(2, round(min(im.size) / 250))
    for face in faces:
        x1, y1, x2, y2 = face["box"]
        draw.rectangle([x1, y1, x2, y2], outline=BOX_COLOUR, width=width)
        for x, y in face.get("landmarks") or []:
            draw.ellipse([x - width, y - width, x + width, y + width], fill=BOX_COLOUR)
        label = age_label(face)
        font = _font(max(12, round((y2 - y1) / (5 if label.isdigit() else 7))))
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 * width if y1 - th - 2 * width >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 2 * width, ty + th + 2 * width], fill=BOX_COLOUR)
        draw.text((x1 + width - left, ty + width - top), label, fill=TEXT_COLOUR, font=font)
    return im


def scale_faces(faces: Sequence[dict[str, Any]], factor: float) -> list[dict[str, Any]]:
    """Face records with boxes and landmarks multiplied by ``factor`` (back to full size)."""
    if factor == 1.0:
        return [dict(f) for f in faces]
    out = []
    for f in faces:
        g = dict(f)
        g["box"] = [v * factor for v in f["box"]]
        if f.get("landmarks"):
            g["landmarks"] = [[x * factor, y * factor] for x, y in f["landmarks"]]
        out.append(g)
    return out
