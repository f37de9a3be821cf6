"""The faceage HTTP API on Ray Serve: Ingress (FastAPI) ─▶ Detector (MTCNN) ─▶ AgeRegressor.

    serve run serve/config.yaml          # from the repository root; http://127.0.0.1:8000/docs
    serve run faceage.serving.app:app    # anywhere faceage is installed: the shipped model

``app`` is the application builder serve/config.yaml names (``import_path:
faceage.serving.app:app``); its ``args`` are ``ServeArgs``. Replicas, resources, queue bounds and
batching come from the config. The model deployments (deployments.py) are thin and call the
library ``faceage predict`` uses: the Detector holds ``faceage.inference.pipeline.FaceFinder``s
(decode, detect, align; a full ``photo`` profile and a cheaper ``stream`` one for video frames),
the AgeRegressor a ``faceage.inference.modelfile.AgeModel`` and ages the crops of concurrent
requests with ``AgeModel.predict_groups``, the call ``FacePipeline`` makes for the faces of
several images, and ``face_record`` writes the JSON. So /predict returns the CLI's faces for the
same photo and model.
This module is the Ingress (its request and response shapes are in schemas.py, the reading of
uploads in uploads.py, /stream's tracking in ``faceage.inference.stream``, corrections (POST
/corrections, the CorrectionStore deployment) in corrections.py): it imports neither torch
(deployments.py is imported only by the builder, ``app``) nor pandas nor the training modules
(Ray Serve itself imports pandas when it is installed; see
tests/inference/test_inference_imports.py).
"""

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ObjectLostError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from faceage import __version__
from faceage.corrections import new_face_id
from faceage.errors import UserError
from faceage.inference.detection import Face
from faceage.inference.interval import AgeEstimates
from faceage.inference.pipeline import face_records
from faceage.inference.stream import NextFrameSearch
from faceage.serving.args import ServeArgs
from faceage.serving.corrections import (
    CORRECTIONS_OFF,
    bind_store,
    corrections_info,
    read_correction,
)
from faceage.serving.payload import pack
from faceage.serving.schemas import (
    BINARY_BODY,
    CORRECTION_ROUTE,
    ERROR_RESPONSES,
    ApiError,
    ErrorOut,
    FramesResult,
    Prediction,
    error_response,
)
from faceage.serving.uploads import (
    MULTIPART,
    RAW_IMAGE_TYPES,
    media_type,
    read_body,
    read_file_parts,
)

LOGGER = logging.getLogger("ray.serve")


# -- the HTTP API ------------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


api = FastAPI(
    title="faceage",
    version=__version__,
    description="Ages of the faces in photos and video frames: MTCNN detection, alignment "
                "and a regression model, served by Ray Serve.",
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, f"invalid request: {exc.errors()}")


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything else that fails in the Ingress: the JSON error form, never Starlette's plain
    text (the traceback goes to the replica's log)."""
    LOGGER.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"the request failed on the server ({type(exc).__name__}); "
                               "it was logged, and a retry may succeed")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32,
                  max_queued_requests=64)
@serve.ingress(api)
class Ingress:
    """The HTTP and WebSocket API; composes Detector and AgeRegressor (and, when corrections
    are on, the CorrectionStore) through their handles."""

    def __init__(self, detector: DeploymentHandle, regressor: DeploymentHandle,
                 settings: dict, corrections: DeploymentHandle | None = None):
        self.detector = detector
        self.regressor = regressor
        self.corrections = corrections
        self.settings = ServeArgs(**settings)
        self._model_ref: dict[str, str] | None = None

    async def _call(self, response) -> Any:
        """Await a handle call; overload and replica failures become 503, and anything else
        that fails downstream a 500, each an ``ApiError`` (the JSON error form)."""
        try:
            return await response
        except BackPressureError:
            raise ApiError(503, "the service is at capacity; retry in a moment") from None
        # ObjectLostError: a payload (payload.py) whose owner, a replica, died in between.
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError,
                ObjectLostError):
            raise ApiError(503, "a model replica is restarting; retry in a moment") from None
        except Exception as exc:  # (a cancelled request's CancelledError is not an Exception)
            LOGGER.exception("a call to a model deployment failed")
            raise ApiError(500, f"a model deployment failed ({type(exc).__name__}); it was "
                                "logged, and a retry may succeed") from None

    async def _model(self) -> dict[str, str]:
        if self._model_ref is None:
            info = await self._call(self.regressor.info.remote())
            self._model_ref = {"name": info["name"], "version": info["version"]}
        return self._model_ref

    async def _remember(self, crops: Any, records: list[dict],
                        model: dict[str, str]) -> dict[str, Any] | None:
        """Hand the faces' crops (the Detector's stack) and answers to the CorrectionStore under
        new ids; the ids, or None when the store fails (the prediction stands without them)."""
        ids = [new_face_id() for _ in records]
        try:
            await self._call(self.corrections.remember.remote(
                ids, crops, [(r["age"], *r["age_interval"]) for r in records], model))
        except Exception as exc:  # a failed store must not fail the prediction
            LOGGER.warning("the CorrectionStore did not take %d faces: %s", len(ids), exc)
            return None
        return {"face_ids": ids, "keep_s": self.settings.corrections.keep_s}

    async def predict_image(self, data: bytes, name: str, profile: str = "photo",
                            near: list[list[float]] | None = None,
                            remember: bool = True) -> dict[str, Any]:
        """One image's result with the ``photo`` or ``stream`` detection profile; raises
        ``ApiError`` for a bad image or an overloaded service. With corrections on and
        ``remember``, ``corrections.face_ids`` names each face for POST /corrections.

        ``timings_ms``: ``decode`` and ``detect`` inside the Detector, ``detect_call`` the whole
        Detector call as the Ingress sees it (those two plus the hops and queueing), ``age`` the
        AgeRegressor call (hops, batching and the model), ``remember`` handing the crops to the
        CorrectionStore (corrections on), ``total`` all of it in the Ingress.
        """
        start = time.perf_counter()
        found = await self._call(self.detector.find.remote(pack(data), name, profile, near))
        if "error" in found:
            raise ApiError(found["status"], found["error"])
        faces: list[Face] = found["faces"]
        aged = time.perf_counter()
        estimates = AgeEstimates.empty()
        if faces:
            # The crops go on as the Detector sent them: the Ingress never unpacks them.
            estimates = await self._call(self.regressor.ages.remote(found["crops"]))
        done = time.perf_counter()
        records, model = face_records(faces, estimates), await self._model()
        timings = {**found["timings_ms"], "detect_call": _ms(aged - start),
                   "age": _ms(done - aged)}
        result = {"faces": records, "image": {"width": found["width"], "height": found["height"]},
                  "model": model, "detection": found["detection"], "timings_ms": timings}
        if self.corrections is not None and remember and faces:
            result["corrections"] = await self._remember(found["crops"], records, model)
            timings["remember"] = _ms(time.perf_counter() - done)
        timings["total"] = _ms(time.perf_counter() - start)
        return result

    async def _frame(self, index: int, data: Any, near: list[list[float]] | None = None,
                     remember: bool = True) -> dict[str, Any]:
        """One video frame (/stream, /predict/frames): the ``stream`` detection profile,
        around ``near`` (the previous frame's boxes) first when given."""
        if not isinstance(data, (bytes, bytearray)):
            return {"frame": index, "error": "send each frame as binary image data (JPEG, PNG)",
                    "status": 415}
        if len(data) > self.settings.max_body_bytes:
            return {"frame": index, "status": 413,
                    "error": f"frame {index} is {len(data)} bytes, above the limit of "
                             f"{self.settings.max_body_bytes}"}
        try:
            return {"frame": index, **await self.predict_image(
                bytes(data), f"frame {index}", "stream", near, remember)}
        except ApiError as exc:
            return {"frame": index, "error": exc.message, "status": exc.status}

    @api.post("/predict", response_model=Prediction, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, openapi_extra={
        "requestBody": {"required": True, "content": {
            **{t: BINARY_BODY for t in ("image/jpeg", "image/png", "image/webp",
                                    "image/heic", "image/heif", "application/octet-stream")},
            MULTIPART: {"schema": {"type": "object", "required": ["file"],
                                   "properties": {"file": {"type": "string",
                                                           "format": "binary"}}}},
        }}})
    async def predict(self, request: Request) -> dict[str, Any]:
        """Ages of the faces in one image: the raw bytes (image/jpeg, image/png, ...) or a
        multipart form with the image in field `file`."""
        media = media_type(request.headers.get("content-type"))
        if media != MULTIPART and media not in RAW_IMAGE_TYPES:
            raise ApiError(415, f"unsupported content type {media or '(none)'!r}; send the "
                                "image bytes as image/jpeg, image/png, ... or a multipart form "
                                "with field 'file'")
        body = await read_body(request, self.settings.max_body_bytes)
        if media == MULTIPART:
            files = [v for k, v in await read_file_parts(request, body, 8)
                     if k == "file" and isinstance(v, bytes)]
            if not files:
                raise ApiError(400, "the multipart form has no file field named 'file'")
            body = files[0]
        return await self.predict_image(body, "image")

    @api.post("/predict/frames", response_model=FramesResult, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, openapi_extra={
        "requestBody": {"required": True, "content": {MULTIPART: {"schema": {
            "type": "object", "required": ["frames"],
            "properties": {"frames": {"type": "array",
                                      "items": {"type": "string", "format": "binary"}}}}}}}})
    async def predict_frames(self, request: Request) -> dict[str, Any]:
        """Several frames (multipart, repeated field `frames`); results in the same order, a
        frame that fails carries its own error and status."""
        media = media_type(request.headers.get("content-type"))
        if media != MULTIPART:
            raise ApiError(415, f"unsupported content type {media or '(none)'!r}; send a "
                                "multipart form with the frames in repeated field 'frames'")
        start = time.perf_counter()
        body = await read_body(request, self.settings.max_body_bytes)
        limit = self.settings.max_frames
        frames = [v for _, v in await read_file_parts(request, body, limit + 1)
                  if isinstance(v, bytes)]
        if not frames:
            raise ApiError(400, "the multipart form has no files; send them in field 'frames'")
        if len(frames) > limit:
            raise ApiError(413, f"{len(frames)} frames, above the limit of {limit} per request")
        gate = asyncio.Semaphore(self.settings.frames_in_flight)

        async def one(index: int, data: bytes) -> dict[str, Any]:
            async with gate:
                return await self._frame(index, data)

        results = await asyncio.gather(*(one(i, f) for i, f in enumerate(frames)))
        return {"frames": results, "timings_ms": {"total": _ms(time.perf_counter() - start)}}

    @api.websocket("/stream")
    async def stream(self, websocket: WebSocket) -> None:
        """Send frames as binary messages (JPEG); each gets one JSON message back, in order.

        Up to ``stream_in_flight`` frames of a socket are worked on at once: a client that sends
        the next frame before the last answer is back (the webcam page keeps two out) has one
        frame in detection while the other is aged and sent back. The answers keep the frames'
        order; a frame starts from the faces of the newest frame already answered."""
        await websocket.accept()
        tracker = NextFrameSearch(self.settings.stream_track_frames)
        slots = asyncio.Semaphore(self.settings.stream_in_flight)
        queued: asyncio.Queue[tuple[int, asyncio.Task] | None] = asyncio.Queue()

        async def answer_in_order() -> None:
            try:
                while (item := await queued.get()) is not None:
                    index, task = item
                    try:
                        result = await task
                    except Exception:  # noqa: BLE001 - the frame fails, the stream goes on
                        LOGGER.exception("/stream frame %d failed", index)
                        result = {"frame": index, "status": 500,
                                  "error": f"frame {index} failed on the server"}
                    if "faces" in result:
                        tracker.update(result["faces"], result["detection"] != "whole frame")
                    await websocket.send_json(result)
                    slots.release()
            finally:
                # Gone (the client left, or a send failed): never leave the reader waiting.
                for _ in range(self.settings.stream_in_flight):
                    slots.release()

        sender = asyncio.create_task(answer_in_order())
        index = 0
        try:
            while not sender.done():
                await slots.acquire()
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                # No face ids here: a live stream's many frames would only churn the store.
                queued.put_nowait((index, asyncio.create_task(self._frame(
                    index, data if data is not None else message.get("text"), tracker.near(),
                    remember=False))))
                index += 1
        except WebSocketDisconnect:
            pass
        finally:
            # The client is gone (or its answers cannot be sent): drop the frames in flight.
            sender.cancel()
            while not queued.empty():
                if (item := queued.get_nowait()) is not None:
                    item[1].cancel()
            # Only to let it finish: a send that failed because the client left is no error.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    @api.get("/healthz", responses={503: {"model": ErrorOut}})
    async def healthz(self) -> dict[str, Any]:
        """200 when the Detector and the AgeRegressor answer, 503 otherwise."""
        try:
            await asyncio.wait_for(
                asyncio.gather(self._call(self.detector.info.remote()), self._model()),
                self.settings.health_timeout_s)
        except (ApiError, asyncio.TimeoutError) as exc:
            detail = exc.message if isinstance(exc, ApiError) else "no answer in time"
            raise ApiError(503, f"not ready: {detail}") from None
        return {"status": "ok"}

    @api.get("/model", responses={503: {"model": ErrorOut}})
    async def model(self) -> dict[str, Any]:
        """The loaded model's metadata, the detector's settings and the request limits."""
        info, detector = await asyncio.gather(self._call(self.regressor.info.remote()),
                                              self._call(self.detector.info.remote()))
        limits = self.settings.model_dump(include={"max_body_bytes", "max_pixels", "max_frames"})
        folder = None if self.corrections is None else self.settings.resolved_corrections_dir()
        return {**info, "detector": detector, "limits": limits,
                "corrections": corrections_info(self.settings.corrections, folder)}

    # /feedback: the deprecated old name of /corrections, the same handler.
    @api.post("/feedback", deprecated=True, **CORRECTION_ROUTE)
    @api.post("/corrections", **CORRECTION_ROUTE)
    async def correct(self, request: Request) -> dict[str, Any]:
        """Store a correction: the true age of a face a recent /predict answer named by its
        face id. Off unless the server has a corrections folder (args.corrections.dir)."""
        if self.corrections is None:
            raise ApiError(404, CORRECTIONS_OFF)
        face_id, age = await read_correction(request)
        stored = await self._call(self.corrections.correct.remote(face_id, age))
        if "error" in stored:
            raise ApiError(stored["status"], stored["error"])
        return stored


def app(args: dict[str, Any]) -> serve.Application:
    """The application ``serve/config.yaml`` runs; ``args`` are validated as ``ServeArgs``."""
    # Here, not at the top: the model deployments load torch, and the Ingress replicas, which
    # import this module, must not (faceage/serving/deployments.py).
    from faceage.inference.modelfile import read_model_file
    from faceage.serving.deployments import AgeRegressor, Detector

    args = ServeArgs.model_validate(args or {})
    path = args.resolved_model_path()
    try:
        read_model_file(path)  # fail the deploy now, with the reason, not in every replica
    except UserError as exc:
        raise UserError(f"serve/config.yaml args.model_path: {exc}") from None
    detector = Detector.bind(str(path), args.detector.model_dump(), args.no_face,
                             args.max_pixels, args.device, args.stream_detector.model_dump(),
                             args.detector_threads)
    regressor = AgeRegressor.bind(str(path), args.tta, args.device, args.interval_coverage,
                                  args.regressor_threads, args.regressor_engine)
    corrections = bind_store(args.resolved_corrections_dir(), args.corrections)  # None: off
    return Ingress.bind(detector, regressor, args.model_dump(), corrections)
