"""Corrections on Serve: the ``CorrectionStore`` deployment, its ``FaceMemory`` and the reading of
``POST /corrections`` (``POST /feedback``: its deprecated alias).

The store is one replica (``num_replicas: 1``) that every Ingress replica talks to: after each
/predict (and /predict/frames) answer the Ingress hands it the faces' aligned crops and the
model's answers under fresh face ids (``FaceMemory``: the last ``args.corrections.keep_faces``
faces, each for ``args.corrections.keep_s``), and a correction names one of those ids. So it
works with any number of Ingress replicas: the Ingress holds nothing. With more than one store
replica a correction could reach one that never saw the face and get a 404, which is why it
always runs one. It is also the one writer of the corrections folder
(``faceage.corrections.CorrectionFolder``), on the node it runs on: on a cluster, give it a folder
on shared storage, or pin it to a node with ``ray_actor_options.resources``. It is deployed only
when ``args.corrections.dir`` is set; without it nothing is kept and /corrections answers 404.

Torch-free (faceage.corrections needs OpenCV and filelock only), so the store's replica and the
Ingress, which imports this module, stay small.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from faceage.corrections import (
    CorrectionError,
    CorrectionFolder,
    RememberedFace,
    check_age,
    encode_crop,
)
from faceage.errors import UserError
from faceage.serving.payload import unpack
from faceage.serving.schemas import ApiError
from faceage.serving.uploads import media_type, read_body

CORRECTIONS_MAX_BODY = 4096  # {"face_id": ..., "age": ...} is about 50 bytes
CORRECTIONS_OFF = ("corrections are off on this server: start it with a corrections folder "
                   "(args.corrections.dir in serve/config.yaml, or `faceage up "
                   "--corrections-dir DIR`) to store them")


class FaceMemory:
    """The last ``capacity`` faces by id, each for at most ``keep_s`` seconds (thread-safe)."""

    def __init__(self, capacity: int = 2048, keep_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.keep_s = keep_s
        self._clock = clock
        self._faces: OrderedDict[str, tuple[float, RememberedFace]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._faces)

    def remember(self, face_id: str, face: RememberedFace) -> None:
        now = self._clock()
        with self._lock:
            self._faces[face_id] = (now, face)
            self._faces.move_to_end(face_id)
            while len(self._faces) > self.capacity:
                self._faces.popitem(last=False)
            while self._faces:  # the oldest first: stop at the first one still fresh
                first = next(iter(self._faces.values()))
                if now - first[0] <= self.keep_s:
                    break
                self._faces.popitem(last=False)

    def recall(self, face_id: str) -> RememberedFace:
        """The face ``face_id`` names; unknown, forgotten or expired: ``CorrectionError`` (404)."""
        with self._lock:
            entry = self._faces.get(face_id)
            if entry is not None and self._clock() - entry[0] > self.keep_s:
                del self._faces[face_id]
                entry = None
            if entry is not None:
                self._faces.move_to_end(face_id)
        if entry is None:
            raise CorrectionError(
                f"face {face_id!r} is not known here: the server keeps the faces of its last "
                f"{self.capacity} answers for {self.keep_s:.0f} s. Send the photo to /predict "
                "again and correct the face id of that answer.", status=404)
        return entry[1]


class CorrectionSettings(BaseModel):
    """``args.corrections`` in serve/config.yaml: corrections from users, off by default."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field(
        None, description="take corrections (POST /corrections) and store them in this folder: "
        "each face's aligned crop and a faceage CSV manifest; relative paths are from the "
        "repository root. None (the default): off, no face is kept")
    keep_faces: int = Field(2048, ge=1, description="the server keeps the crops of this many "
                                                    "recent faces for corrections")
    keep_s: float = Field(3600.0, gt=0, description="... and each for at most this long")


def corrections_info(settings: CorrectionSettings, folder) -> dict[str, Any]:
    """/model's ``corrections``: whether corrections are on (``folder``), what is stored, where."""
    if not folder:
        return {"enabled": False, "note": CORRECTIONS_OFF}
    return {"enabled": True, "dir": str(folder), "keep_faces": settings.keep_faces,
            "keep_s": settings.keep_s,
            "stores": "per correction: the face's aligned crop (a JPEG, not the photo), the age "
                      "given, the model's answer and interval, its name and version, and the "
                      "time (UTC)"}


async def read_correction(request: Request) -> tuple[str, float]:
    """``(face_id, age)`` of a /corrections request; 415, 413 and 400 for anything else."""
    media = media_type(request.headers.get("content-type"))
    if media != "application/json":
        raise ApiError(415, f"unsupported content type {media or '(none)'!r}; send JSON "
                            "{\"face_id\": \"...\", \"age\": 34} as application/json")
    return parse_correction(await read_body(request, CORRECTIONS_MAX_BODY,
                                            "send only {face_id, age}"))


def parse_correction(body: bytes) -> tuple[str, float]:
    """``(face_id, age)`` from a /corrections body; anything else is an ``ApiError`` (400)."""
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
                            "(its corrections.face_ids)")
    if "age" not in data:
        raise ApiError(400, "age is missing: send the person's true age in years")
    try:
        return face_id, check_age(data["age"])
    except CorrectionError as exc:
        raise ApiError(exc.status, str(exc)) from None


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64,
                  max_queued_requests=256)
class CorrectionStore:
    """Recent faces in memory, corrections on disk; errors come back as ``{error, status}``."""

    def __init__(self, folder: str, keep_faces: int, keep_s: float):
        self.folder = CorrectionFolder(folder, create=True)
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
        except CorrectionError as exc:
            return {"error": str(exc), "status": exc.status}
        return {"id": row["id"], "age": age, "predicted": face.predicted,
                "age_interval": [face.low, face.high],
                "model": {"name": face.model_name, "version": face.model_version},
                "time": row["time"], "replaced": replaced,
                "stored_in": str(self.folder.root)}

    def info(self) -> dict[str, Any]:
        return {"dir": str(self.folder.root), "keep_faces": self.memory.capacity,
                "keep_s": self.memory.keep_s, "faces_held": len(self.memory)}


def bind_store(folder: Path | None, settings: CorrectionSettings) -> Application | None:
    """The CorrectionStore for ``folder`` (None: corrections are off); a folder that cannot be
    created or written fails the deploy now, with the reason, not in the replica."""
    if folder is None:
        return None
    try:
        CorrectionFolder(folder, create=True)
    except UserError as exc:
        raise UserError(f"serve/config.yaml args.corrections.dir: {exc}") from None
    return CorrectionStore.bind(str(folder), settings.keep_faces, settings.keep_s)
