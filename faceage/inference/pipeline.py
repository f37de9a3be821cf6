"""The one preprocessing path from a photo to model input: decode, detect, align, crop.

Used by ``faceage prepare``, ``faceage evaluate``, ``faceage predict`` and the Serve Detector, so a
face is framed the same way in training data, evaluation and serving:

    load_photo(path | bytes) ─▶ FaceDetector.detect(image) ─▶ align_face(image, face, policy, size)
    (images)                    (detection)                   (alignment)
                        FaceFinder.find_photo(photo) does both ─▶ AgeModel.predict_groups(crops)

The crop policy (where the landmarks land in the crop) is model-file metadata; see ``CropPolicy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from faceage.errors import UserError
from faceage.inference.alignment import CropPolicy, align_face, whole_image_face
from faceage.inference.detection import DetectorConfig, Face, FaceDetector
from faceage.inference.images import ImageSource, Photo, load_photo
from faceage.inference.interval import DEFAULT_COVERAGE, check_coverage

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

    def find_tracked(self, image: np.ndarray, near: Sequence[Sequence[float]] | None = None,
                     min_face: float | None = None) -> tuple[list[Face], bool]:
        """``find``, and whether the faces were found near ``near`` (False: the whole frame
        was searched)."""
        faces = self.detector.detect_near(image, near, min_face=min_face) if near else []
        tracked = bool(faces)
        if not faces:
            faces = self.detector.detect(image, min_face)
        for f in faces:
            f.crop = align_face(image, f, self.policy, self.size)
        if not faces and self.no_face == "whole":
            faces = [whole_image_face(image, self.size)]
        return faces, tracked

    def load(self, source: ImageSource, name: str | None = None,
             max_pixels: int | None = None) -> Photo:
        """Decode a photo as this finder wants it (large JPEGs at a reduced scale: the
        detector's ``decode_side``)."""
        kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
        return load_photo(source, name=name, reduce_to=self.detector.config.decode_side,
                          **kwargs)

    def find_photo(self, photo: Photo, near: Sequence[Sequence[float]] | None = None
                   ) -> tuple[list[Face], bool]:
        """``find_tracked`` on a ``Photo``: boxes and landmarks (and ``near``) in the original
        photo's pixels, crops from its decoded pixels."""
        sx, sy = photo.scale
        if (sx, sy) == (1.0, 1.0):
            return self.find_tracked(photo.pixels, near)
        to_pixels = np.array([1 / sx, 1 / sy] * 2)
        near = [np.asarray(b, np.float64) * to_pixels for b in near] if near else None
        # The smallest face is the original photo's min face, in decoded pixels.
        min_face = self.detector.min_face(photo.height, photo.width) / max(sx, sy)
        faces, tracked = self.find_tracked(photo.pixels, near, min_face)
        for f in faces:
            f.box = (f.box * np.array([sx, sy] * 2)).astype(np.float32)
            f.landmarks = (f.landmarks * np.array([sx, sy])).astype(np.float32)
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
                 no_face: NoFace = "skip", tta: bool | None = None,
                 coverage: float = DEFAULT_COVERAGE):
        self.model = model
        self.finder = FaceFinder.for_model(model.metadata, detector, no_face)
        self.tta = model.resolve_tta(tta)  # None: as the model file says (flip_average)
        self.coverage = check_coverage(coverage)  # of each face's age interval

    def find_faces(self, image: np.ndarray | Photo) -> list[Face]:
        if isinstance(image, Photo):
            return self.finder.find_photo(image)[0]
        return self.finder.find(image)

    def predict_faces(self, images: Sequence[np.ndarray | Photo]
                      ) -> list[tuple[list[Face], Any]]:
        """Faces and their ``AgeEstimates`` (ages, interval ends) for each image (an array, or
        a ``Photo`` with boxes in its original pixels); the model runs once over all their
        crops."""
        found = [self.find_faces(im) for im in images]
        ages = self.model.predict_groups([[f.crop for f in faces] for faces in found],
                                         tta=self.tta, coverage=self.coverage)
        return list(zip(found, ages, strict=True))

    def predict(self, image: np.ndarray | Photo) -> list[dict[str, Any]]:
        """Face records for one image."""
        faces, estimates = self.predict_faces([image])[0]
        return face_records(faces, estimates)
