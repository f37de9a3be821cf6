"""Face detection: MTCNN settings, the detected ``Face`` and ``FaceDetector`` (faceage's MTCNN,
``faceage.inference.mtcnn``).

Torch loads only when a detector is built, so the Serve Ingress can import ``Face`` and
``DetectorConfig`` (what it unpickles and validates) without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from faceage.inference.images import check_image_array
from faceage.inference.overlap import iou, overlaps

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


class DetectorConfig(BaseModel):
    """MTCNN settings; the Serve config and the CLI pass these through unchanged."""

    model_config = ConfigDict(extra="forbid")

    min_face_size: int = Field(20, ge=8, description="smallest face searched for, in pixels of "
                                                     "the original image")
    min_face_fraction: float = Field(
        0.03, ge=0.0, lt=1.0, description="also skip faces smaller than this share of the "
        "image's shorter side (0: off): 90 px of a 12-megapixel photo, where 20 px alone would "
        "cost 8x the detection time (docs/serve.md, \"Phone photos\"); no change below "
        "about 670 px, where min_face_size is larger. The live-stream profile uses 0.1")
    thresholds: tuple[float, float, float] = Field(
        (0.6, 0.7, 0.7), description="P-, R- and O-net score thresholds")
    min_score: float = Field(0.9, ge=0.0, le=1.0, description="faces scoring below are dropped")
    factor: float = Field(0.709, gt=0.1, lt=1.0, description="image pyramid scale step")
    max_side: int = Field(1280, ge=64, description="larger images are detected on a copy "
                                                   "downscaled to this longer side")
    decode_side: int = Field(
        1600, ge=0, description="a JPEG at least twice this long is decoded at 1/2, 1/4 or 1/8 "
        "scale, keeping at least this longer side (faceage.inference.images.load_photo): a "
        "12-megapixel photo decodes 3-4x faster; 0: always at full size")
    pad: Literal["auto", "always", "never"] = Field(
        "auto", description="pad the frame before detecting; auto: only when a face (nearly) "
                            "fills it or none is found, where MTCNN otherwise misses or misframes")
    pad_fraction: float = Field(0.3, ge=0.0, le=1.0, description="padding per side, as a "
                                                                 "fraction of the longer side")
    max_faces: int = Field(100, ge=1, description="keep at most this many faces (largest first)")
    mirror: bool = Field(
        True, description="also detect on the mirror image and average each face's box and "
        "landmarks with its mirror's: a face and its mirror image are then framed alike, and "
        "read alike (twice the detection time; the live-stream profile leaves it off)")
    engine: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="what runs the P-, R- and O-nets: torch, ONNX Runtime (CPU), or "
        "auto: whichever is faster for each net on this CPU at this thread count, from a short "
        "probe at load (docs/benchmarks.md, \"ONNX Runtime\")")


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


# One set of MTCNN nets per process, engine and thread count on the CPU, shared by every
# detector (Serve's photo and stream profiles hold one each): loading takes ~50 ms, an ONNX
# export and the ``auto`` probe a second or two more.
_MTCNN_NETS: dict[tuple[str, int], Any] = {}


def _mtcnn_nets(device: str = "cpu", engine: str = "torch"):
    import torch

    from faceage.inference.mtcnn import load_nets

    if device != "cpu":
        return load_nets(device, engine)
    key = (engine, torch.get_num_threads())
    if key not in _MTCNN_NETS:
        _MTCNN_NETS[key] = load_nets("cpu", engine)
    return _MTCNN_NETS[key]


class FaceDetector:
    """MTCNN (faceage.inference.mtcnn, weights in the package): every face's box, score and
    landmarks."""

    def __init__(self, config: DetectorConfig | dict | None = None, device: str = "cpu"):
        if isinstance(config, dict):
            config = DetectorConfig(**config)
        self.config = config or DetectorConfig()
        self.device = device
        self._nets = _mtcnn_nets(device, self.config.engine)

    @property
    def engines(self) -> dict[str, dict[str, Any]]:
        """Each net's runtime and why (``/model``)."""
        return {c.network: c.info() for c in self._nets.engines}

    def _run_mtcnn(self, image: np.ndarray, min_face: float) -> tuple[np.ndarray, np.ndarray]:
        from faceage.inference.mtcnn import detect_faces

        h, w = image.shape[:2]
        # P-net's window is 12 px: smaller faces are not searched for (as facenet-pytorch did).
        min_face = max(12.0, float(min_face))
        if min(h, w) < min_face:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        return detect_faces(image, self._nets, min_face, self.config.thresholds,
                            self.config.factor)

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

    def detect(self, image: np.ndarray, min_face: float | None = None) -> list[Face]:
        """All faces in an HxWx3 uint8 RGB image, largest first; ``min_face``: the smallest
        face in its pixels (default: ``min_face(h, w)``)."""
        image = check_image_array(image)
        min_face = min_face or self.min_face(*image.shape[:2])
        faces = self._detect(image, min_face, None)
        if self.config.mirror:
            mirrored = self._detect(np.ascontiguousarray(image[:, ::-1]), min_face, None)
            faces = mirror_average(faces, mirrored, image.shape[1])[: self.config.max_faces]
        return faces

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
                    margin: float = 0.5, min_face: float | None = None) -> list[Face]:
        """Faces in the region around ``boxes`` (``[x1, y1, x2, y2]``: where faces were in the
        previous frame of a video), each box widened by ``margin`` x its longer side on every
        side; [] when none is found there. Detected at the scale a whole-frame detection would
        use (so faces are framed alike) and for faces at least half the smallest given one:
        a fraction of a whole-frame detection's cost."""
        image = check_image_array(image)
        h, w = image.shape[:2]
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
        min_face = max(min_face or self.min_face(h, w), 0.5 * float(side.min(initial=0.0)))
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
                if not any(overlaps(boxes[i], b) for b in padded_boxes)]
        return (np.concatenate([padded_boxes, boxes[keep]]),
                np.concatenate([padded_points, points[keep]]))


# Landmarks of a mirrored face in LANDMARK_NAMES order: the eyes and mouth corners swap sides.
MIRRORED_LANDMARKS = [1, 0, 2, 4, 3]


def mirror_back(face: Face, width: int) -> Face:
    """A face found on the mirror image of an image ``width`` pixels wide, in the image's
    coordinates: pixel column ``i`` is column ``width - 1 - i`` there."""
    box = face.box.copy()
    box[[0, 2]] = (width - 1) - face.box[[2, 0]]
    marks = face.landmarks[MIRRORED_LANDMARKS].copy()
    marks[:, 0] = (width - 1) - marks[:, 0]
    return Face(box=box, score=face.score, landmarks=marks)


def mirror_average(faces: list[Face], mirrored: list[Face], width: int) -> list[Face]:
    """The faces of an image and of its mirror image as one list: each pair that overlaps most
    (IoU above 0.5) becomes one face, the mean of the two boxes, scores and landmarks; a face
    of one pass only is kept as it is. The same computation on the mirror image gives the mirror
    of the result, so a face and its mirror image get the same crop (up to the flip)."""
    back = [mirror_back(f, width) for f in mirrored]
    pairs = sorted(((iou(a.box, b.box), i, j) for i, a in enumerate(faces)
                    for j, b in enumerate(back)), reverse=True)
    used_a, used_b, out = set(), set(), []
    for overlap, i, j in pairs:
        if overlap <= 0.5 or i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        a, b = faces[i], back[j]
        out.append(Face(box=(a.box + b.box) / 2, score=(a.score + b.score) / 2,
                        landmarks=(a.landmarks + b.landmarks) / 2))
    out += [f for i, f in enumerate(faces) if i not in used_a]
    out += [f for j, f in enumerate(back) if j not in used_b]
    out.sort(key=lambda f: -f.area)
    return out


