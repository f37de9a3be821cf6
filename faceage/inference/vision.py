"""The one preprocessing path from a photo to model input: decode, detect, align, crop.

Used by ``faceage prepare``, ``faceage evaluate``, ``faceage predict`` and the Serve Detector, so a
face is framed the same way in training data, evaluation and serving:

    load_image(path | bytes) ─▶ FaceDetector.detect(image) ─▶ align_face(image, face, policy, size)
                                 FaceFinder.find(image) does both ─▶ AgeModel.predict_groups(crops)

The crop policy (where the landmarks land in the crop) is model-file metadata; see ``CropPolicy``.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from faceage.errors import ImageError, UserError
from faceage.inference.interval import DEFAULT_COVERAGE, check_coverage

# Enough for a 60-megapixel camera; a decoded image costs 3 bytes per pixel.
DEFAULT_MAX_PIXELS = 64_000_000
# Pillow plugins that decode in-process; EPS (Ghostscript) and exotic formats are not accepted.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "BMP", "GIF", "TIFF", "PPM")
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

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


# -- decoding ------------------------------------------------------------------------------------


def _describe(source: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "image"


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO, *,
               name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a photo (path, bytes or binary file) to an upright HxWx3 uint8 RGB array.

    Honours EXIF orientation and converts grayscale, alpha, palette, CMYK and 16-bit images.
    Raises ``ImageError`` (status 400) for anything that is not a complete image and
    (status 413) for one above ``max_pixels``, checked before the pixels are decoded.
    """
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
        try:
            im.load()
        except Exception as exc:
            raise ImageError(f"{label}: the image data is truncated or corrupt ({exc})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block should not cost the picture
        pass
    return to_rgb_array(im)


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


# -- detection -----------------------------------------------------------------------------------


class DetectorConfig(BaseModel):
    """MTCNN settings; the Serve config and the CLI pass these through unchanged."""

    model_config = ConfigDict(extra="forbid")

    min_face_size: int = Field(20, ge=8, description="smallest face searched for, in pixels of "
                                                     "the original image")
    min_face_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="also skip faces smaller than this share of the "
        "image's shorter side (0: off); bounds the detection pyramid for video, where faces "
        "are large")
    thresholds: tuple[float, float, float] = Field(
        (0.6, 0.7, 0.7), description="P-, R- and O-net score thresholds")
    min_score: float = Field(0.9, ge=0.0, le=1.0, description="faces scoring below are dropped")
    factor: float = Field(0.709, gt=0.1, lt=1.0, description="image pyramid scale step")
    max_side: int = Field(1280, ge=64, description="larger images are detected on a copy "
                                                   "downscaled to this longer side")
    pad: Literal["auto", "always", "never"] = Field(
        "auto", description="pad the frame before detecting; auto: only when a face (nearly) "
                            "fills it or none is found, where MTCNN otherwise misses or misframes")
    pad_fraction: float = Field(0.3, ge=0.0, le=1.0, description="padding per side, as a "
                                                                 "fraction of the longer side")
    max_faces: int = Field(100, ge=1, description="keep at most this many faces (largest first)")


@dataclass
class Face:
    """One detected face in image pixel coordinates, with its aligned crop once aligned."""

    box: np.ndarray  # (4,) x1, y1, x2, y2, clipped to the image
    score: float
    landmarks: np.ndarray  # (5, 2) in LANDMARK_NAMES order; (0, 2) for a whole-image face
    crop: np.ndarray | None = field(default=None, repr=False)  # size x size x 3 uint8 RGB

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


# One MTCNN per process: its three small nets load from the package in ~50 ms but are shared.
_MTCNN_NETS: Any = None


def _mtcnn_nets():
    global _MTCNN_NETS
    if _MTCNN_NETS is None:
        from facenet_pytorch import MTCNN

        _MTCNN_NETS = MTCNN(keep_all=True, device="cpu").eval()
    return _MTCNN_NETS


class FaceDetector:
    """MTCNN (facenet-pytorch, weights in the package): every face's box, score and landmarks."""

    def __init__(self, config: DetectorConfig | dict | None = None, device: str = "cpu"):
        if isinstance(config, dict):
            config = DetectorConfig(**config)
        self.config = config or DetectorConfig()
        self.device = device
        nets = _mtcnn_nets()
        if device != "cpu":
            from facenet_pytorch import MTCNN

            nets = MTCNN(keep_all=True, device=device).eval()
        self._nets = nets

    def _run_mtcnn(self, image: np.ndarray, min_face: float) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from facenet_pytorch.models.utils.detect_face import detect_face

        h, w = image.shape[:2]
        min_face = max(12.0, float(min_face))
        if min(h, w) < min_face:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        n = self._nets
        try:
            with torch.no_grad():
                boxes, points = detect_face(image, min_face, n.pnet, n.rnet, n.onet,
                                            list(self.config.thresholds), self.config.factor,
                                            torch.device(self.device))
        except RuntimeError as exc:
            # facenet-pytorch concatenates an empty candidate list when every candidate box
            # is degenerate; that is "no face", not a failure.
            if "non-empty" in str(exc):
                return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
            raise
        b = np.asarray(boxes[0], dtype=np.float32).reshape(-1, 5)
        p = np.asarray(points[0], dtype=np.float32).reshape(-1, 5, 2)
        return b, p

    def min_face(self, height: int, width: int) -> float:
        """The smallest face searched for in an image of this size, in its pixels."""
        cfg = self.config
        return max(float(cfg.min_face_size), cfg.min_face_fraction * min(height, width))

    def detect_raw(self, image: np.ndarray, pad: bool, min_face: float | None = None,
                   scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """MTCNN's unfiltered, unclipped boxes+scores (N, 5) and landmarks (N, 5, 2), for faces
        of at least ``min_face`` pixels (default: ``min_face(h, w)``), detected on a copy
        resized by ``scale`` (default: down to ``max_side``)."""
        cfg = self.config
        h, w = image.shape[:2]
        if scale is None:
            scale = min(1.0, cfg.max_side / max(h, w))
        small = image
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        offset = 0
        if pad:
            offset = int(round(cfg.pad_fraction * max(small.shape[:2])))
            # A flat mean-coloured border: reflection would mirror half-faces into the frame.
            fill = [int(v) for v in small.reshape(-1, 3).mean(axis=0)]
            small = cv2.copyMakeBorder(small, offset, offset, offset, offset,
                                       cv2.BORDER_CONSTANT, value=fill)
        if min_face is None:
            min_face = self.min_face(h, w)
        boxes, points = self._run_mtcnn(small, min_face * scale)
        boxes = boxes.copy()
        boxes[:, :4] = (boxes[:, :4] - offset) / scale
        points = (points - offset) / scale
        return boxes, points

    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an HxWx3 uint8 RGB image, largest first."""
        image = check_image_array(image)
        return self._detect(image, self.min_face(*image.shape[:2]), None)

    def _detect(self, image: np.ndarray, min_face: float, scale: float | None) -> list[Face]:
        cfg = self.config
        h, w = image.shape[:2]
        boxes, points = self.detect_raw(image, cfg.pad == "always", min_face, scale)
        if cfg.pad == "auto":
            sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
            if len(boxes) == 0:
                boxes, points = self.detect_raw(image, True, min_face, scale)
            elif sides.max() >= 0.6 * min(h, w):
                boxes, points = self._redetect_large(image, boxes, points, sides, min_face,
                                                     scale)
        faces = []
        for b, p in zip(boxes, points, strict=True):
            score = float(b[4])
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            # A face found in the padding (centre outside the frame) is an artefact.
            if score < cfg.min_score or not (0 <= cx < w and 0 <= cy < h):
                continue
            # MTCNN's box regression can shrink a box below the pyramid's smallest face.
            if max(b[2] - b[0], b[3] - b[1]) < min_face:
                continue
            box = np.array([np.clip(b[0], 0, w), np.clip(b[1], 0, h),
                            np.clip(b[2], 0, w), np.clip(b[3], 0, h)], dtype=np.float32)
            faces.append(Face(box=box, score=score, landmarks=p.astype(np.float32)))
        faces.sort(key=lambda f: -f.area)
        return faces[: cfg.max_faces]

    def detect_near(self, image: np.ndarray, boxes: Sequence[Sequence[float]],
                    margin: float = 0.5) -> list[Face]:
        """Faces in the region around ``boxes`` (``[x1, y1, x2, y2]``: where faces were in the
        previous frame of a video), each box widened by ``margin`` x its longer side on every
        side; [] when none is found there. Detected at the scale a whole-frame detection would
        use (so faces are framed alike) and for faces at least half the smallest given one:
        a fraction of a whole-frame detection's cost."""
        image = check_image_array(image)
        h, w = image.shape[:2]
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
        min_face = max(self.min_face(h, w), 0.5 * float(side.min(initial=0.0)))
        scale = min(1.0, self.config.max_side / max(h, w))
        x1 = int(np.clip(np.floor((b[:, 0] - margin * side).min()), 0, w))
        y1 = int(np.clip(np.floor((b[:, 1] - margin * side).min()), 0, h))
        x2 = int(np.clip(np.ceil((b[:, 2] + margin * side).max()), 0, w))
        y2 = int(np.clip(np.ceil((b[:, 3] + margin * side).max()), 0, h))
        if x2 - x1 < 12 or y2 - y1 < 12:
            return []
        faces = self._detect(image[y1:y2, x1:x2], min_face, scale)
        shift = np.array([x1, y1], np.float32)
        for f in faces:
            f.box = f.box + np.tile(shift, 2)
            f.landmarks = f.landmarks + shift
        return faces

    def _redetect_large(self, image: np.ndarray, boxes: np.ndarray, points: np.ndarray,
                        sides: np.ndarray, min_face: float,
                        scale: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Re-find the faces that (nearly) fill the frame on a padded copy, where MTCNN frames
        them better, with a pyramid bounded below at half the largest face: the padded pass only
        has to find faces that large, at a fraction of a full pass's cost. Smaller faces of the
        first pass that overlap none of the new ones are kept as they were."""
        big = max(min_face, 0.5 * float(sides.max()))
        padded_boxes, padded_points = self.detect_raw(image, True, big, scale)
        keep = [i for i in np.flatnonzero(sides < big)
                if not any(_overlaps(boxes[i], b) for b in padded_boxes)]
        return (np.concatenate([padded_boxes, boxes[keep]]),
                np.concatenate([padded_points, points[keep]]))


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether boxes ``[x1, y1, x2, y2, ...]`` ``a`` and ``b`` intersect."""
    return bool(min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]))


# -- alignment -----------------------------------------------------------------------------------


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


# -- the parts composed --------------------------------------------------------------------------


NoFace = Literal["skip", "whole"]


class FaceFinder:
    """Detect and align: image → faces with crops ready for the model. The Serve Detector's core."""

    def __init__(self, policy: CropPolicy | dict | None = None, size: int = 128,
                 detector: FaceDetector | DetectorConfig | dict | None = None,
                 no_face: NoFace = "skip"):
        if no_face not in ("skip", "whole"):
            raise UserError(f"no_face must be 'skip' or 'whole', not {no_face!r}")
        self.policy = policy if isinstance(policy, CropPolicy) else CropPolicy.from_metadata(policy)
        self.size = int(size)
        self.detector = detector if isinstance(detector, FaceDetector) else FaceDetector(detector)
        self.no_face = no_face

    @classmethod
    def for_model(cls, metadata: dict, detector: FaceDetector | DetectorConfig | dict | None = None,
                  no_face: NoFace = "skip") -> FaceFinder:
        """Frame faces as the model with this metadata was trained (its crop policy and size)."""
        return cls(metadata.get("crop_policy"), int(metadata["preprocessing"]["input_size"]),
                   detector, no_face)

    def find(self, image: np.ndarray, near: Sequence[Sequence[float]] | None = None) -> list[Face]:
        """Faces in ``image`` (largest first), each with ``crop`` set.

        ``near``: boxes of the same faces in the previous frame of a video; only the region
        around them is searched (``FaceDetector.detect_near``), and the whole frame when no
        face is found there.
        """
        return self.find_tracked(image, near)[0]

    def find_tracked(self, image: np.ndarray, near: Sequence[Sequence[float]] | None = None
                     ) -> tuple[list[Face], bool]:
        """``find``, and whether the faces were found near ``near`` (False: the whole frame
        was searched)."""
        faces = self.detector.detect_near(image, near) if near else []
        tracked = bool(faces)
        if not faces:
            faces = self.detector.detect(image)
        for f in faces:
            f.crop = align_face(image, f, self.policy, self.size)
        if not faces and self.no_face == "whole":
            faces = [whole_image_face(image, self.size)]
        return faces, tracked


def face_record(face: Face, age: float, low: float, high: float) -> dict[str, Any]:
    """The JSON form of one face, shared by ``faceage predict --json`` and the Serve API:
    ``age`` and its interval ``age_interval: [low, high]`` (``AgeModel.estimate``)."""
    return {
        "box": [round(float(v), 1) for v in face.box],
        "score": round(float(face.score), 4),
        "age": round(float(age), 2),
        "age_interval": [round(float(low), 2), round(float(high), 2)],
        "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in face.landmarks],
    }


def face_records(faces: Sequence[Face], estimates) -> list[dict[str, Any]]:
    """``face_record`` for each face and its ``AgeEstimates`` entry."""
    return [face_record(f, *e) for f, e in zip(faces, estimates, strict=True)]


class FacePipeline:
    """A model file with its detector, in one process: photos in, JSON face records out.

    ``faceage predict`` uses it. Serve splits the same two steps over
    deployments: the Detector holds a ``FaceFinder``, the AgeRegressor the ``AgeModel``, and both
    this class and the AgeRegressor age crops through ``AgeModel.predict_groups``.
    """

    def __init__(self, model, detector: FaceDetector | DetectorConfig | dict | None = None,
                 no_face: NoFace = "skip", tta: bool = False,
                 coverage: float = DEFAULT_COVERAGE):
        self.model = model
        self.finder = FaceFinder.for_model(model.metadata, detector, no_face)
        self.tta = tta
        self.coverage = check_coverage(coverage)  # of each face's age interval

    def find_faces(self, image: np.ndarray) -> list[Face]:
        return self.finder.find(image)

    def predict_faces(self, images: Sequence[np.ndarray]) -> list[tuple[list[Face], Any]]:
        """Faces and their ``AgeEstimates`` (ages, interval ends) for each image; the model runs
        once over all their crops."""
        found = [self.find_faces(im) for im in images]
        ages = self.model.predict_groups([[f.crop for f in faces] for faces in found],
                                         tta=self.tta, coverage=self.coverage)
        return list(zip(found, ages, strict=True))

    def predict(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Face records for one image."""
        faces, estimates = self.predict_faces([image])[0]
        return face_records(faces, estimates)
