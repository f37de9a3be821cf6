"""The two model deployments of the Serve application: Detector (MTCNN) and AgeRegressor.

Their own module because they load torch, and the Ingress must not: ``faceage/serving/app.py`` (the
Ingress and the HTTP API) imports this module only inside its application builder, so an Ingress
replica, which imports ``faceage.serving.app`` to find its class, never loads torch (about 0.4 GB of
private memory per process). What the Ingress gets back from them is torch-free too: ``Face``
(faceage.inference.detection) and ``AgeEstimates`` (faceage.inference.interval) unpickle without
torch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from faceage.errors import ImageError
from faceage.inference.detection import DetectorConfig, FaceDetector
from faceage.inference.interval import DEFAULT_COVERAGE, AgeEstimates
from faceage.inference.modelfile import load_model_file, read_model_file
from faceage.inference.pipeline import FaceFinder
from faceage.serving.payload import pack, unpack

T = TypeVar("T")


class BatchSettings(BaseModel):
    """AgeRegressor's ``user_config``: changeable on a running deployment without a restart."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1, description="most requests merged into one forward "
                                                      "pass (1 turns batching off)")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="how long the first request waits for others; 0: a batch is "
                               "whatever queued while the previous one ran (no added latency "
                               "for a lone request)")


def replica_device(setting: str) -> str:
    """The torch device for this replica: cuda when Ray gave it a GPU (or when told to)."""
    if setting != "auto":
        return setting
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


class TorchThread:
    """The one thread of a replica that runs torch, with ``threads`` intra-op threads (default:
    what Ray set up, one per whole CPU the replica asked for and at least one).

    Why one: torch's CPU kernels parallelise with (GNU) OpenMP, and each Python thread that runs
    a parallel region gets a team of its own. Once a process's teams hold more threads than it
    has CPUs, OpenMP stops spinning between regions and every region pays for waking its
    threads: on 2 cores, MobileNetV2 on one crop took 26 ms from a second Python thread
    instead of 8 ms, MTCNN 74 ms instead of 51 (docs/serve.md, "Threads"). Serve runs sync
    methods on a thread pool and ``asyncio.to_thread`` on another, so a replica with more than
    one torch thread would hit that; everything that touches torch goes through here instead.
    """

    def __init__(self, threads: int | None = None):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="faceage-torch")
        self.threads = self.run(self._set_threads, threads)

    @staticmethod
    def _set_threads(threads: int | None) -> int:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        return torch.get_num_threads()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the torch thread, waiting for it (constructors)."""
        return self._pool.submit(fn, *args).result()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the torch thread, awaited: the event loop stays free meanwhile."""
        return await asyncio.wrap_future(self._pool.submit(fn, *args))


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=2,
                  max_queued_requests=32)
class Detector:
    """Decode, detect (MTCNN) and align: photo bytes in, faces with crops framed for the model.

    Two detection profiles share one set of MTCNN weights: ``photo`` (full detection, for
    /predict) and ``stream`` (cheaper settings for video frames: /stream and /predict/frames).
    """

    def __init__(self, model_path: str, detector: dict, no_face: str, max_pixels: int,
                 device: str, stream_detector: dict | None = None, threads: int | None = None):
        self.torch = TorchThread(threads)
        self.device = replica_device(device)
        self.max_pixels = max_pixels
        configs = {"photo": DetectorConfig(**detector),
                   "stream": DetectorConfig(**(stream_detector or detector))}
        self.finders = self.torch.run(self._load, model_path, configs, no_face)

    def _load(self, model_path: str, configs: dict[str, DetectorConfig],
              no_face: str) -> dict[str, FaceFinder]:
        metadata, _ = read_model_file(model_path)
        finders = {name: FaceFinder.for_model(metadata, FaceDetector(cfg, device=self.device),
                                              no_face) for name, cfg in configs.items()}
        for finder in finders.values():  # the first call pays torch's setup
            finder.find(np.full((160, 160, 3), 128, np.uint8))
        return finders

    async def find(self, data: Any, name: str = "image", profile: str = "photo",
                   near: list[list[float]] | None = None) -> dict[str, Any]:
        """Faces in an encoded image (bytes, or ``Stored`` bytes: payload.py), or
        ``{"error", "status"}`` for one that cannot be used. ``near``: the previous frame's
        boxes of a stream, searched around first (``FaceFinder.find``).

        The faces come without their crops: those are ``crops``, one (N, S, S, 3) stack (None
        without faces), sent through the object store when large."""
        return await self.torch.call(self._find, await unpack(data), name, profile, near)

    def _find(self, data: bytes, name: str, profile: str,
              near: list[list[float]] | None) -> dict[str, Any]:
        start = time.perf_counter()
        finder = self.finders[profile]
        try:
            photo = finder.load(data, name=name, max_pixels=self.max_pixels)
        except ImageError as exc:
            # Returned, not raised: a bad upload is the client's error, not a replica failure.
            return {"error": str(exc), "status": exc.status}
        decoded = time.perf_counter()
        faces, tracked = finder.find_photo(photo, near)
        crops = np.stack([f.crop for f in faces]) if faces else None
        for f in faces:
            f.crop = None
        return {"faces": faces, "crops": None if crops is None else pack(crops),
                "width": photo.width, "height": photo.height,
                "detection": "near previous faces" if tracked else "whole frame",
                "timings_ms": {"decode": _ms(decoded - start),
                               "detect": _ms(time.perf_counter() - decoded)}}

    def info(self) -> dict[str, Any]:
        photo = self.finders["photo"]
        return {"device": self.device, "threads": self.torch.threads,
                "detector": photo.detector.config.model_dump(),
                "stream_detector": self.finders["stream"].detector.config.model_dump(),
                "engines": photo.detector.engines,
                "no_face": photo.no_face, "crop_size": photo.size,
                "crop_policy": photo.policy.to_metadata(), "max_pixels": self.max_pixels}


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32,
                  max_queued_requests=64)
class AgeRegressor:
    """The exported model; ``@serve.batch`` merges face crops of concurrent requests."""

    def __init__(self, model_path: str, tta: bool | None, device: str,
                 coverage: float = DEFAULT_COVERAGE, threads: int | None = None,
                 engine: str = "auto"):
        self.torch = TorchThread(threads)
        self.engine = engine
        self.path = str(model_path)
        self.tta = tta
        self.coverage = coverage
        self.batching = BatchSettings()
        self.model = self.torch.run(self._load, model_path, replica_device(device))

    def _load(self, model_path: str, device: str):
        model = load_model_file(model_path, device=device, engine=self.engine)
        self.tta = model.resolve_tta(self.tta)
        size = model.input_size
        model.predict([np.zeros((size, size, 3), np.uint8)], tta=self.tta)
        return model

    def reconfigure(self, user_config: dict) -> None:
        """Apply ``user_config`` (``BatchSettings``) from serve/config.yaml."""
        self.batching = BatchSettings(**(user_config or {}))
        self.ages.set_max_batch_size(self.batching.max_batch_size)
        self.ages.set_batch_wait_timeout_s(self.batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def ages(self, crop_stacks: list[Any]) -> list[AgeEstimates]:
        """Ages and intervals for each request's (N, S, S, 3) crops (an array, or a ``Stored``
        one: payload.py); one model call for the whole batch."""
        stacks = list(await asyncio.gather(*(unpack(s) for s in crop_stacks)))
        # On the torch thread, so the event loop keeps queueing the next batch meanwhile.
        return await self.torch.call(self.model.predict_groups, stacks, self.tta,
                                     self.coverage)

    def info(self) -> dict[str, Any]:
        return {"name": self.model.name, "version": self.model.version, "path": self.path,
                "device": str(self.model.device), "threads": self.torch.threads,
                "engine": self.model.engine.info(), "tta": self.tta,
                "interval": self.model.interval_info(self.coverage),
                "batching": self.batching.model_dump(), "metadata": self.model.metadata}
