"""The HTTP API's shapes: the response models (what /docs shows) and the one error form,
``{"error": message, "status": status}``, with ``ApiError`` to raise it."""

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from faceage.config import MAX_AGE


class FaceOut(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in image pixels")
    score: float = Field(description="detection score")
    age: float = Field(description="estimated age in years")
    age_interval: list[float] = Field(
        min_length=2, max_length=2,
        description="[low, high] in years: the central interval (args.interval_coverage, "
                    "default 80 %) the true age falls in, calibrated on validation faces")
    landmarks: list[list[float]] = Field(
        description="eyes, nose, mouth corners as [x, y] (empty for a whole-image face)")


class ImageSize(BaseModel):
    width: int
    height: int


class ModelRef(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str


class CorrectionIds(BaseModel):
    """Present when the server takes corrections (``args.corrections.dir``)."""

    face_ids: list[str] = Field(description="one per face, in order: POST /corrections "
                                            "{face_id, age} to correct that face's age")
    keep_s: float = Field(description="the server forgets a face after this many seconds "
                                      "(or sooner, once it has seen many newer faces)")


class Prediction(BaseModel):
    faces: list[FaceOut]
    image: ImageSize
    model: ModelRef
    timings_ms: dict[str, float] = Field(description="decode, detect, age and total")
    corrections: CorrectionIds | None = None


class FrameResult(BaseModel):
    """One frame of /predict/frames or /stream: a prediction, or an error with its status."""

    model_config = ConfigDict(protected_namespaces=())

    frame: int
    faces: list[FaceOut] | None = None
    image: ImageSize | None = None
    model: ModelRef | None = None
    timings_ms: dict[str, float] | None = None
    corrections: CorrectionIds | None = None
    detection: Literal["whole frame", "near previous faces"] | None = Field(
        None, description="/stream: where the Detector searched (near the previous frame's "
                          "faces, falling back to the whole frame when none is there)")
    error: str | None = None
    status: int | None = None


class FramesResult(BaseModel):
    frames: list[FrameResult]
    timings_ms: dict[str, float]


class CorrectionIn(BaseModel):
    """POST /corrections: the true age of a face a recent /predict answer named."""

    face_id: str = Field(description="from the answer's corrections.face_ids")
    age: float = Field(ge=0, le=MAX_AGE,
                       description=f"the person's true age in years, 0-{MAX_AGE}")


class CorrectionOut(BaseModel):
    """A stored correction: the entry in the corrections folder's manifest."""

    model_config = ConfigDict(protected_namespaces=())

    id: str = Field(description="the entry id (`faceage corrections list/delete`)")
    age: float
    predicted: float = Field(description="the model's answer for this face")
    age_interval: list[float] = Field(description="the model's interval for this face")
    model: ModelRef
    time: str = Field(description="when it was stored, UTC ISO 8601")
    replaced: bool = Field(description="true: it replaced an earlier correction of this face")
    stored_in: str = Field(description="the server's corrections folder")


class ErrorOut(BaseModel):
    error: str
    status: int


class ApiError(Exception):
    """An HTTP error answered as ``{"error": message, "status": status}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    """The JSON answer for an error; a 503 tells the client to retry after a second."""
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


# OpenAPI for the routes: a binary request body, and the errors they answer with.
BINARY_BODY = {"schema": {"type": "string", "format": "binary"}}
ERROR_RESPONSES = {code: {"model": ErrorOut, "description": text} for code, text in {
    400: "not an image, corrupt or truncated",
    413: "body, frame count or pixel count over the limit",
    415: "unsupported content type",
    503: "at capacity or a replica is restarting: retry after a moment",
}.items()}
CORRECTION_ERRORS = {code: {"model": ErrorOut, "description": text} for code, text in {
    400: f"not JSON, no face_id, or an age that is not a number in 0-{MAX_AGE}",
    404: "corrections are off, or the face id is unknown or expired",
    413: "a body over 4 KiB",
    415: "not application/json",
    503: "the store is restarting or the folder is locked: retry after a moment",
    507: "the corrections folder's disk is full; nothing was stored",
}.items()}
# POST /corrections (and /feedback, its deprecated alias): a JSON body, its answer and errors.
CORRECTION_ROUTE = {"response_model": CorrectionOut, "responses": CORRECTION_ERRORS,
                    "openapi_extra": {"requestBody": {"required": True, "content": {
                        "application/json": {"schema": CorrectionIn.model_json_schema()}}}}}
