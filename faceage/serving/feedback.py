"""Corrections on Serve: the ``FeedbackStore`` deployment and the reading of ``POST /feedback``.

The store is one replica (``num_replicas: 1``) that every Ingress replica talks to: after each
/predict (and /predict/frames) answer the Ingress hands it the faces' aligned crops and the
model's answers under fresh face ids (``faceage.feedback.FaceMemory``: the last
``args.feedback.keep_faces`` faces, each for ``args.feedback.keep_s``), and a correction names
one of those ids. So it works with any number of Ingress replicas: the Ingress holds nothing.
With more than one store replica a correction could reach one that never saw the face and get a
404, which is why it always runs one. It is also the one writer of the feedback folder
(``faceage.feedback.FeedbackFolder``), on the node it runs on: on a cluster, give it a folder on
shared storage, or pin it to a node with ``ray_actor_options.resources``. It is deployed only when
``args.feedback.dir`` is set; without it nothing is kept and /feedback answers 404.

Torch-free (faceage.feedback needs OpenCV and filelock only), so the store's replica and the
Ingress, which imports this module, stay small.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from faceage.errors import UserError
from faceage.feedback import (
    FaceMemory,
    FeedbackError,
    FeedbackFolder,
    RememberedFace,
    check_age,
    encode_crop,
)
from faceage.serving.payload import unpack
from faceage.serving.schemas import ApiError
from faceage.serving.uploads import media_type, read_body

FEEDBACK_MAX_BODY = 4096  # {"face_id": ..., "age": ...} is about 50 bytes
FEEDBACK_OFF = ("corrections are off on this server: start it with a feedback folder "
                "(args.feedback.dir in serve/config.yaml, or `faceage up --feedback-dir DIR`) "
                "to store them")


class FeedbackSettings(BaseModel):
    """``args.feedback`` in serve/config.yaml: corrections from users, off by default."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(
        None, description="take corrections (POST /feedback) and store them in this folder: "
        "each face's aligned crop and a faceage CSV manifest; relative paths are from the "
        "repository root. None (the default): off, no face is kept")
    keep_faces: int = Field(2048, ge=1, description="the server keeps the crops of this many "
                                                    "recent faces for corrections")
    keep_s: float = Field(3600.0, gt=0, description="... and each for at most this long")


def feedback_info(settings: FeedbackSettings, folder) -> dict[str, Any]:
    """/model's ``feedback``: whether corrections are on (``folder``), what is stored, where."""
    if not folder:
        return {"enabled": False, "note": FEEDBACK_OFF}
    return {"enabled": True, "dir": str(folder), "keep_faces": settings.keep_faces,
            "keep_s": settings.keep_s,
            "stores": "per correction: the face's aligned crop (a JPEG, not the photo), the age "
                      "given, the model's answer and interval, its name and version, and the "
                      "time (UTC)"}


async def read_correction(request: Request) -> tuple[str, float]:
    """``(face_id, age)`` of a /feedback request; 415, 413 and 400 for anything else."""
    media = media_type(request.headers.get("content-type"))
    if media != "application/json":
        raise ApiError(415, f"unsupported content type {media or '(none)'!r}; send JSON "
                            "{\"face_id\": \"...\", \"age\": 34} as application/json")
    return parse_correction(await read_body(request, FEEDBACK_MAX_BODY,
                                            "send only {face_id, age}"))


def parse_correction(body: bytes) -> tuple[str, float]:
    """``(face_id, age)`` from a /feedback body; anything else is an ``ApiError`` (400)."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON ({exc}); send {{\"face_id\": \"...\", "
                            "\"age\": 34}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "send a JSON object {\"face_id\": \"...\", \"age\": 34}")
    extra = sorted(set(data) - {"face_id", "age"})
    if extra:
        raise ApiError(400, f"unknown fields {extra}; send only face_id and age")
    face_id = data.get("face_id")
    if not isinstance(face_id, str) or not face_id:
        raise ApiError(400, "face_id is missing: send the face_id a /predict answer gave "
                            "(its feedback.face_ids)")
    if "age" not in data:
        raise ApiError(400, "age is missing: send the person's actual age in years")
    try:
        return face_id, check_age(data["age"])
    except FeedbackError as exc:
        raise ApiError(exc.status, str(exc)) from None


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64,
                  max_queued_requests=256)
class FeedbackStore:
    """Recent faces in memory, corrections on disk; errors come back as ``{error, status}``."""

    def __init__(self, folder: str, keep_faces: int, keep_s: float):
        self.folder = FeedbackFolder(folder, create=True)
        self.memory = FaceMemory(keep_faces, keep_s)
        encode_crop(np.zeros((8, 8, 3), np.uint8))  # OpenCV's import, before the first face

    async def remember(self, face_ids: list[str], crops: Any,
                       answers: list[tuple[float, float, float]], model: dict[str, str]) -> int:
        """Keep each face's crop (as JPEG) and the model's ``(age, low, high)``; how many kept.
        ``crops``: the faces' (N, S, S, 3) stack, or a ``Stored`` one (payload.py)."""
        return await asyncio.to_thread(self._remember, face_ids, await unpack(crops), answers,
                                       model)

    def _remember(self, face_ids: list[str], crops: np.ndarray,
                  answers: list[tuple[float, float, float]], model: dict[str, str]) -> int:
        for face_id, crop, (age, low, high) in zip(face_ids, crops, answers, strict=True):
            self.memory.remember(face_id, RememberedFace(
                encode_crop(crop), age, low, high, model["name"], model["version"]))
        return len(self.memory)

    async def correct(self, face_id: str, age: float) -> dict[str, Any]:
        """Store ``age`` as the true age of the face ``face_id`` names."""
        try:
            face = self.memory.recall(face_id)
            # Off the event loop: the lock wait and fsync must not hold up remember().
            row, replaced = await asyncio.to_thread(self.folder.add, face_id, face, age)
        except FeedbackError as exc:
            return {"error": str(exc), "status": exc.status}
        return {"id": row["id"], "age": age, "predicted": face.predicted,
                "age_interval": [face.low, face.high],
                "model": {"name": face.model_name, "version": face.model_version},
                "time": row["time"], "replaced": replaced,
                "stored_in": str(self.folder.root)}

    def info(self) -> dict[str, Any]:
        return {"dir": str(self.folder.root), "keep_faces": self.memory.capacity,
                "keep_s": self.memory.keep_s, "faces_held": len(self.memory)}


def bind_store(folder: Path | None, settings: FeedbackSettings) -> Application | None:
    """The FeedbackStore for ``folder`` (None: corrections are off); a folder that cannot be
    created or written fails the deploy now, with the reason, not in the replica."""
    if folder is None:
        return None
    try:
        FeedbackFolder(folder, create=True)
    except UserError as exc:
        raise UserError(f"serve/config.yaml args.feedback.dir: {exc}") from None
    return FeedbackStore.bind(str(folder), settings.keep_faces, settings.keep_s)
