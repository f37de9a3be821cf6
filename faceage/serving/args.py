"""The Serve application's ``args`` (serve/config.yaml's ``applications[0].args``), validated.

Torch-free, like the Ingress that imports it.
"""

import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from faceage import CHECKOUT, DEFAULT_MODEL_PATH
from faceage.errors import UserError
from faceage.inference.detection import DetectorConfig
from faceage.inference.images import DEFAULT_MAX_PIXELS
from faceage.inference.interval import DEFAULT_COVERAGE
from faceage.serving.corrections import CorrectionSettings

MiB = 1024 * 1024

# The live-stream profile's defaults: detect on a copy at most 320 px long, only faces at least
# a tenth of the frame's shorter side (a webcam user fills much more), in one pass (no mirror).
STREAM_DETECTOR_DEFAULTS = {"max_side": 320, "min_face_fraction": 0.1, "mirror": False}


class ServeArgs(BaseModel):
    """The application's ``args`` in serve/config.yaml."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str | None = Field(
        None, description="model file; relative paths are from the repository root (a "
                          "checkout's; an installed faceage takes absolute paths only) "
                          "(default: the shipped models/faceage-default.pt)")
    detector: DetectorConfig = Field(
        default_factory=DetectorConfig, description="full detection: single photos (/predict)")
    stream_detector: DetectorConfig = Field(
        default_factory=lambda: DetectorConfig(**STREAM_DETECTOR_DEFAULTS),
        description="the live-stream profile: video and webcam frames (/stream, "
                    "/predict/frames); cheaper settings, measured in docs/serve.md")
    stream_track_frames: int = Field(
        10, ge=0, description="on /stream, search only around the previous frame's faces for "
                              "up to this many frames between whole-frame detections (0: "
                              "every frame whole); new faces appear at the next whole one")
    stream_in_flight: int = Field(
        2, ge=1, description="frames of one /stream socket worked on at once (answers still go "
                             "back in order); 2 keeps a frame in detection while the last "
                             "one is aged and travels back; 1: strictly one at a time")
    detector_threads: int | None = Field(
        None, ge=1, description="torch threads per Detector replica (default: Ray's, one per "
                                "whole CPU of its num_cpus, at least one)")
    regressor_threads: int | None = Field(
        None, ge=1, description="torch threads per AgeRegressor replica (default: Ray's)")
    regressor_engine: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="what runs the age network: torch, ONNX Runtime (CPU), or auto: the "
        "faster on this CPU from a short probe at load (the detector's nets: detector.engine)")
    no_face: Literal["skip", "whole"] = Field(
        "skip", description="no face found: report none, or age the whole image")
    tta: bool | None = Field(
        None, description="average each face with its mirror image (null: as the model file "
                          "says, its flip_average: how it was validated)")
    interval_coverage: float = Field(
        DEFAULT_COVERAGE, gt=0.0, le=0.99, description="each face's age_interval is the central "
        "interval covering this share of faces like the model's validation faces")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when the replica was given a GPU (num_gpus)")
    max_body_bytes: int = Field(16 * MiB, ge=1024, description="larger request bodies and "
                                                               "WebSocket frames get 413")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images get 413, "
                                                                  "checked before decoding")
    max_frames: int = Field(32, ge=1, description="most frames in one /predict/frames request")
    frames_in_flight: int = Field(4, ge=1, description="frames of one /predict/frames request "
                                                       "detected concurrently")
    health_timeout_s: float = Field(10.0, gt=0, description="/healthz waits this long for "
                                                            "the Detector and AgeRegressor")
    corrections: CorrectionSettings = Field(
        default_factory=CorrectionSettings, description="corrections from users (POST "
        "/corrections); off unless corrections.dir is set")

    @model_validator(mode="before")
    @classmethod
    def _old_feedback_key(cls, data: Any) -> Any:
        """``args.feedback``, the deprecated old name of ``args.corrections``: still taken (its
        keys win over ``corrections``'), with a warning."""
        if isinstance(data, dict) and "feedback" in data:
            warnings.warn("serve/config.yaml args.feedback is deprecated: it is now "
                          "args.corrections (same keys: dir, keep_faces, keep_s); rename it",
                          FutureWarning, stacklevel=2)
            data = dict(data)
            old, new = data.pop("feedback"), data.get("corrections")
            data["corrections"] = ({**new, **old} if isinstance(old, dict)
                                   and isinstance(new, dict) else old)
        return data

    def resolved_model_path(self) -> Path:
        if self.model_path is None:
            return DEFAULT_MODEL_PATH
        return _from_repo(self.model_path, "args.model_path")

    def resolved_corrections_dir(self) -> Path | None:
        if self.corrections.dir is None:
            return None
        return _from_repo(self.corrections.dir, "args.corrections.dir")


def _from_repo(name: str, key: str) -> Path:
    """``name`` made absolute against the checkout. Replicas and the builder run in Ray workers
    whose working directory is not the caller's, so an installed faceage (no checkout) takes
    absolute paths only."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    if CHECKOUT is None:
        raise UserError(f"{key} {name!r} is a relative path, and this faceage is installed, not "
                        "a checkout: give an absolute path")
    return CHECKOUT / path
