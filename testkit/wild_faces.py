"""Synthetic "not pre-cropped" photos from UTKFace chips, with the exact chip → photo transform
(bench/wild_faces.py writes a set of them; bench/crop_policy.py measures framing on them).

Offline we only have the tight chips, so each is placed in a larger frame: a smooth random
background (no second face), a feathered edge, a random rotation (+-15 deg), a random size and
position, and JPEG re-encoding. The face is real; the scene around it is not. The known transform
lets a benchmark measure how well detection + alignment recovers the chip's framing.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def smooth_background(h: int, w: int, colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency colour fields plus fine grain: scenery without faces."""
    grid = rng.integers(0, len(colours), size=(4, 5))
    coarse = colours[grid].astype(np.float32)
    coarse += rng.normal(0, 25, coarse.shape)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    field += rng.normal(0, 6, field.shape).astype(np.float32)
    return np.clip(field, 0, 255)


def make_wild(chip: np.ndarray, rng: np.random.Generator, frame: tuple[int, int] = (640, 480),
              face_px: tuple[float, float] = (80.0, 240.0), max_angle: float = 15.0,
              jpeg_quality: int = 85) -> tuple[np.ndarray, np.ndarray]:
    """A ``frame``-sized RGB photo containing ``chip``, and the 2x3 affine chip → photo."""
    w, h = frame
    side = chip.shape[0]
    # Background colours from the chip's own border, so the scene's light matches the face.
    border = np.concatenate([chip[:8].reshape(-1, 3), chip[-8:].reshape(-1, 3),
                             chip[:, :8].reshape(-1, 3), chip[:, -8:].reshape(-1, 3)])
    colours = border[rng.integers(0, len(border), 6)].astype(np.float32)
    scene = smooth_background(h, w, colours, rng)

    target = rng.uniform(*face_px)
    scale = target / side
    angle = rng.uniform(-max_angle, max_angle)
    # Keep the whole rotated chip inside the frame.
    half = target * (abs(math.cos(math.radians(angle))) + abs(math.sin(math.radians(angle)))) / 2
    cx = rng.uniform(half, w - half)
    cy = rng.uniform(half, h - half)
    m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, scale)
    m[:, 2] += np.array([cx, cy]) - np.array([side / 2, side / 2])

    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    face = cv2.warpAffine(chip.astype(np.float32), m, (w, h), flags=interp,
                          borderMode=cv2.BORDER_CONSTANT)
    # A feathered alpha: the chip's edge fades into the scene instead of a hard seam.
    alpha = np.zeros((side, side), np.float32)
    edge = max(2, side // 14)
    alpha[edge:-edge, edge:-edge] = 1.0
    alpha = cv2.GaussianBlur(alpha, (0, 0), edge / 2)
    alpha = cv2.warpAffine(alpha, m, (w, h), flags=cv2.INTER_LINEAR)[..., None]
    photo = np.clip(alpha * face + (1 - alpha) * scene, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", photo[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    assert ok
    photo = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()
    return photo, m


def framing_error(align_matrix: np.ndarray, chip_to_photo: np.ndarray, chip_side: int,
                  crop_side: int) -> tuple[float, float, float, float]:
    """How far an aligned crop's framing is from the chip's: scale ratio, rotation (deg), centre
    shift x and y (fractions of the crop side). A perfect crop is (1, 0, 0, 0)."""
    a = np.vstack([align_matrix, [0, 0, 1]]) @ np.vstack([chip_to_photo, [0, 0, 1]])
    ideal = crop_side / chip_side
    scale = math.sqrt(abs(np.linalg.det(a[:2, :2]))) / ideal
    angle = math.degrees(math.atan2(a[1, 0], a[0, 0]))
    centre = a[:2, :2] @ np.array([chip_side / 2, chip_side / 2]) + a[:2, 2]
    dx, dy = (centre - crop_side / 2) / crop_side
    return scale, angle, float(dx), float(dy)
