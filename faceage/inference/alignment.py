"""Alignment and crop: how a detected face is framed in the model's input (``CropPolicy``, stored
in the model file) and the warp that cuts it out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from faceage.errors import UserError
from faceage.inference.detection import Face

# Where MTCNN's five landmarks fall in a UTKFace chip, as fractions of the chip side. UTKFace chips
# are eyes-level crops of a fixed framing, so aligning a wild photo to these points reproduces the
# framing the model was trained on. Derived from the training data, not chosen:
#   uv run python bench/derive_crop_template.py --limit 3000
# (3000 train-split chips, padded, MTCNN found 99.3 %; see docs/pipeline.md for the figures).
UTKFACE_CHIP_TEMPLATE = (
    (0.3001, 0.2917),
    (0.6930, 0.2915),
    (0.4957, 0.5244),
    (0.3187, 0.6970),
    (0.6721, 0.6970),
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, shift) taking ``src`` to ``dst``.

    Closed form of Umeyama (1991); returns a 2x3 matrix for ``cv2.warpAffine``.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    var_s = (s ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ sign) / var_s) if var_s > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


@dataclass(frozen=True)
class CropPolicy:
    """How a face is framed in the model's input: stored in the model file as ``crop_policy``.

    ``landmarks``: a similarity transform puts the 5 landmarks on ``template`` (fractions of
    the crop side), eyes level. ``margin`` widens the crop by that fraction of its side on
    every side. ``box``: a square of ``box_scale`` x the box's longer side around its centre,
    shifted down by ``box_shift`` x its height (no rotation), for detectors without landmarks.
    """

    name: str = "utkface-chip"
    kind: Literal["landmarks", "box"] = "landmarks"
    template: tuple[tuple[float, float], ...] = UTKFACE_CHIP_TEMPLATE
    margin: float = 0.0
    box_scale: float = 1.0
    box_shift: float = 0.0

    @classmethod
    def from_metadata(cls, meta: dict | None) -> CropPolicy:
        """The policy a model file or ``prepare.json`` names (default: UTKFace chip framing)."""
        meta = dict(meta or {})
        name = meta.get("name", "utkface-chip")
        if name in BUILTIN_POLICIES and set(meta) <= {"name", "margin", "border"}:
            base = BUILTIN_POLICIES[name]
            return cls(**{**base.__dict__, "margin": float(meta.get("margin", base.margin))})
        try:
            template = tuple(tuple(float(v) for v in pt) for pt in meta.get("template", ()))
            policy = cls(name=name, kind=meta.get("kind", "landmarks"),
                         template=template or UTKFACE_CHIP_TEMPLATE,
                         margin=float(meta.get("margin", 0.0)),
                         box_scale=float(meta.get("box_scale", 1.0)),
                         box_shift=float(meta.get("box_shift", 0.0)))
        except (TypeError, ValueError) as exc:
            raise UserError(f"crop policy {meta!r} is malformed: {exc}") from None
        if policy.kind not in ("landmarks", "box") or len(policy.template) != 5:
            raise UserError(f"crop policy {meta!r} is not one this faceage understands")
        return policy

    def to_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "margin": self.margin,
                               "border": "replicate"}
        if self.kind == "landmarks":
            out["template"] = [list(p) for p in self.template]
        else:
            out.update(box_scale=self.box_scale, box_shift=self.box_shift)
        return out

    def matrix(self, face: Face, size: int) -> np.ndarray:
        """2x3 affine from image pixels to a ``size`` x ``size`` crop."""
        if self.kind == "landmarks" and len(face.landmarks) == 5:
            dst = (np.asarray(self.template) - 0.5) / (1 + 2 * self.margin) + 0.5
            return similarity_transform(face.landmarks, dst * size)
        x1, y1, x2, y2 = (float(v) for v in face.box)
        bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        side = max(bw, bh) * (self.box_scale if self.kind == "box" else 1.0) * (1 + 2 * self.margin)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + (self.box_shift if self.kind == "box" else 0) * bh
        s = size / side
        return np.array([[s, 0, size / 2 - s * cx], [0, s, size / 2 - s * cy]])


BUILTIN_POLICIES: dict[str, CropPolicy] = {"utkface-chip": CropPolicy()}


def warp_crop(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Sample a ``size`` x ``size`` crop through ``matrix``, area-averaging first when shrinking."""
    m = np.asarray(matrix, np.float64).copy()
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
    src = image
    if scale < 0.7:
        # warpAffine samples bilinearly and would alias a big face; shrink the region it reads
        # with area averaging to about the output scale first.
        inv = cv2.invertAffineTransform(m)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], float)
        pts = corners @ inv.T
        h, w = image.shape[:2]
        x0 = int(np.clip(np.floor(pts[:, 0].min()) - 2, 0, w - 1))
        y0 = int(np.clip(np.floor(pts[:, 1].min()) - 2, 0, h - 1))
        x1 = int(np.clip(np.ceil(pts[:, 0].max()) + 2, x0 + 1, w))
        y1 = int(np.clip(np.ceil(pts[:, 1].max()) + 2, y0 + 1, h))
        roi = image[y0:y1, x0:x1]
        new_w, new_h = max(1, round(roi.shape[1] * scale)), max(1, round(roi.shape[0] * scale))
        src = cv2.resize(roi, (new_w, new_h), interpolation=cv2.INTER_AREA)
        fx, fy = new_w / roi.shape[1], new_h / roi.shape[0]
        m = np.concatenate([m[:, :2] @ np.diag([1 / fx, 1 / fy]),
                            (m[:, 2] + m[:, :2] @ np.array([x0, y0]))[:, None]], axis=1)
    return cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def align_face(image: np.ndarray, face: Face, policy: CropPolicy, size: int) -> np.ndarray:
    """The ``size`` x ``size`` RGB crop of ``face`` framed by ``policy``."""
    return warp_crop(image, policy.matrix(face, size), size)


def whole_image_face(image: np.ndarray, size: int) -> Face:
    """The whole image as one face (for pre-cropped photos), resized like training images."""
    h, w = image.shape[:2]
    crop = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if min(h, w) > size
                      else cv2.INTER_LINEAR)
    return Face(box=np.array([0, 0, w, h], np.float32), score=0.0,
                landmarks=np.zeros((0, 2), np.float32), crop=crop)
