"""Annotate an uploaded video through Serve: frames go out concurrently (a bounded number in
flight), faces are tracked so each keeps a smoothed age, and the result is H.264 MP4 (PyAV)."""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np

from faceage.inference.annotate import scale_faces
from faceage.webapp.client import ServeClient, ServeError
from faceage.webapp.draw import draw_frame, encode_jpeg, face_thumbnail, shrink
from faceage.webapp.tracking import AgeSmoother

# Frames above this many pixels on the long side are scaled down for the output video, and
# frames sent to Serve are smaller still: MTCNN time grows with the pixel count.
OUTPUT_MAX_SIDE = 1280
ANALYSE_MAX_SIDE = 640
# Up to this many frames a video is analysed frame by frame by default; longer ones are sampled.
FULL_ANALYSIS_FRAMES = 300


class VideoError(ValueError):
    """An upload that is not a readable video; the message says what to do."""


@dataclass
class VideoInfo:
    """What the container says about its first video stream."""

    frames: int | None
    fps: float
    width: int
    height: int
    duration_s: float | None


@dataclass
class VideoResult:
    """An annotated video and what happened while making it."""

    mp4: bytes
    frames: int
    analysed: int
    width: int
    height: int
    seconds: float
    codec: str
    rejected_frames: int = 0
    faces: list[dict[str, Any]] = field(default_factory=list)
    # One per followed face Serve named (corrections on): track, face_id, age, thumb.
    corrections: list[dict[str, Any]] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def _open(data: bytes, name: str) -> av.container.InputContainer:
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{name}: not a readable video ({exc}). Upload an MP4, MOV, WebM, MKV "
                         "or AVI file.") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: has no video stream")
    return container


def probe_video(data: bytes, name: str = "the upload") -> VideoInfo:
    """Frame count, rate and size of the first video stream in ``data``."""
    with _open(data, name) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        duration = (float(stream.duration * stream.time_base) if stream.duration
                    else container.duration / 1e6 if container.duration else None)
        frames = stream.frames or (round(duration * float(rate)) if duration else None)
        return VideoInfo(frames or None, float(rate), stream.codec_context.width,
                         stream.codec_context.height, duration)


def suggested_stride(frames: int | None, budget: int = FULL_ANALYSIS_FRAMES) -> int:
    """Analyse every Nth frame so that about ``budget`` frames go to Serve."""
    return max(1, math.ceil(frames / budget)) if frames else 1


def _encoder_name() -> str:
    # Browsers play H.264 in MP4; MPEG-4 part 2 is only a last resort so something still comes out.
    for name in ("libx264", "h264", "libopenh264"):
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
                return name
            except (av.error.FFmpegError, ValueError):
                continue
    return "mpeg4"


def annotate_video(data: bytes, client: ServeClient, *, every_nth: int = 1,
                   max_in_flight: int = 4, name: str = "the upload",
                   progress: Callable[[int, int | None, float], None] | None = None,
                   output_max_side: int = OUTPUT_MAX_SIDE,
                   analyse_max_side: int = ANALYSE_MAX_SIDE) -> VideoResult:
    """Every frame of ``data`` with tracked faces and smoothed ages drawn on it, as MP4.

    Every ``every_nth`` frame goes to Serve (at most ``max_in_flight`` at a time); frames in
    between show the boxes of the last analysed frame. ``progress(done, total, frames_per_s)``
    is called as frames are written. Raises ServeError when Serve is down or keeps failing.
    """
    every_nth = max(1, int(every_nth))
    max_in_flight = max(1, int(max_in_flight))
    info = probe_video(data, name)
    tracker = AgeSmoother()
    codec = _encoder_name()
    start = time.perf_counter()
    written = analysed = rejected = 0
    visible: list[dict[str, Any]] = []
    thumbs: dict[int, tuple[str, np.ndarray]] = {}  # track -> (face_id, picture of that face)
    # A real file, not BytesIO: +faststart (the index up front, so browsers start playing before
    # the whole file is in) rewrites the file after encoding by reopening it by name.
    fd, out = tempfile.mkstemp(suffix=".mp4", prefix="faceage-video-")
    os.close(fd)

    def analyse(rgb: np.ndarray) -> dict:
        small, scale = shrink(rgb, analyse_max_side)
        result = client.predict(encode_jpeg(small))
        faces = scale_faces(result["faces"], 1 / scale)
        ids = (result.get("feedback") or {}).get("face_ids") or []
        if len(ids) == len(faces):  # corrections on: each face's id, for its track
            for face, face_id in zip(faces, ids, strict=True):
                face["face_id"] = face_id
        return {**result, "faces": faces}

    pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="faceage-video")
    pending: deque[tuple[np.ndarray, Future | None]] = deque()
    in_flight = 0
    try:
        with _open(data, name) as inp, av.open(out, mode="w", format="mp4",
                                                 options={"movflags": "+faststart"}) as outc:
            vin = inp.streams.video[0]
            vin.thread_type = "AUTO"
            rate = vin.average_rate or vin.guessed_rate or Fraction(25)
            vout = outc.add_stream(codec, rate=rate)
            vout.pix_fmt = "yuv420p"
            if codec == "libx264":
                vout.options = {"preset": "veryfast", "crf": "23"}

            def finish(rgb: np.ndarray, future: Future | None) -> None:
                nonlocal visible, written, analysed, rejected
                if future is not None:
                    try:
                        visible = tracker.update(future.result()["faces"])
                        analysed += 1
                        for face in visible:
                            best = tracker.best(face["track"])
                            if best and best["face_id"] == face.get("face_id"):
                                thumbs[face["track"]] = (best["face_id"],
                                                         face_thumbnail(rgb, face["box"]))
                    except ServeError as exc:
                        if exc.kind != "rejected":
                            raise
                        rejected += 1  # one undecodable frame must not end the whole video
                frame = av.VideoFrame.from_ndarray(draw_frame(rgb, visible), format="rgb24")
                for packet in vout.encode(frame):
                    outc.mux(packet)
                written += 1
                if progress:
                    progress(written, info.frames, written / (time.perf_counter() - start))

            try:
                for index, frame in enumerate(inp.decode(vin)):
                    rgb, _ = shrink(frame.to_ndarray(format="rgb24"), output_max_side)
                    if index == 0:
                        # yuv420p needs even sides
                        vout.width, vout.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
                    rgb = np.ascontiguousarray(rgb[: vout.height, : vout.width])
                    future = pool.submit(analyse, rgb) if index % every_nth == 0 else None
                    pending.append((rgb, future))
                    in_flight += future is not None
                    while in_flight >= max_in_flight:
                        rgb_done, future_done = pending.popleft()
                        in_flight -= future_done is not None
                        finish(rgb_done, future_done)
            except av.error.FFmpegError as exc:
                if not written and not pending:
                    raise VideoError(f"{name}: decoding failed ({exc})") from None
                # A truncated tail: keep what decoded.
            while pending:
                finish(*pending.popleft())
            if not written:
                raise VideoError(f"{name}: no frames could be decoded")
            for packet in vout.encode():
                outc.mux(packet)
            width, height = vout.width, vout.height
        mp4 = open(out, "rb").read()  # noqa: SIM115 - read at once
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        os.unlink(out)
    corrections = [{"track": track, "face_id": face_id, "thumb": thumb,
                    "age": tracker.best(track)["age"]}
                   for track, (face_id, thumb) in sorted(thumbs.items())]
    return VideoResult(mp4, written, analysed, width, height, time.perf_counter() - start,
                       codec, rejected, tracker.summary(), corrections)
