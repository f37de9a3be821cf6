"""Annotate an uploaded video through Serve: frames go out concurrently (a bounded number in
flight), faces are tracked so each keeps a smoothed age, and the result is H.264 MP4 (PyAV)."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from faceage.inference.annotate import scale_faces
from faceage.inference.video import (
    VideoError,
    VideoWriter,
    frame_rate,
    open_video,
    rgb_frames,
)
from faceage.webapp.client import ServeClient, ServeError
from faceage.webapp.draw import draw_frame, encode_jpeg, face_thumbnail, shrink
from faceage.webapp.tracking import AgeSmoother

# Frames above this many pixels on the long side are scaled down for the output video, and
# frames sent to Serve are smaller still: MTCNN time grows with the pixel count.
OUTPUT_MAX_SIDE = 1280
ANALYSE_MAX_SIDE = 640
# Up to this many frames a video is analysed frame by frame by default; longer ones are sampled.
FULL_ANALYSIS_FRAMES = 300


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


def probe_video(data: bytes, name: str = "the upload") -> VideoInfo:
    """Frame count, rate and size of the first video stream in ``data``."""
    with open_video(data, name) as container:
        stream = container.streams.video[0]
        rate = frame_rate(container)
        duration = (float(stream.duration * stream.time_base) if stream.duration
                    else container.duration / 1e6 if container.duration else None)
        frames = stream.frames or (round(duration * float(rate)) if duration else None)
        return VideoInfo(frames or None, float(rate), stream.codec_context.width,
                         stream.codec_context.height, duration)


def suggested_stride(frames: int | None, budget: int = FULL_ANALYSIS_FRAMES) -> int:
    """Analyse every Nth frame so that about ``budget`` frames go to Serve."""
    return max(1, math.ceil(frames / budget)) if frames else 1


class FaceFollower:
    """What the analysed frames say, frame after frame: the faces to draw (tracked, each with
    its smoothed age), a picture of each face Serve named for corrections, and the counts."""

    def __init__(self):
        self.smoother = AgeSmoother()
        self.visible: list[dict[str, Any]] = []
        self.thumbs: dict[int, tuple[str, np.ndarray]] = {}  # track -> (face_id, its picture)
        self.analysed = self.rejected = 0

    def take(self, rgb: np.ndarray, future: Future) -> None:
        """Serve's answer for ``rgb``; a frame Serve rejected keeps the last faces."""
        try:
            self.visible = self.smoother.update(future.result()["faces"])
        except ServeError as exc:
            if exc.kind != "rejected":
                raise
            self.rejected += 1  # one undecodable frame must not end the whole video
            return
        self.analysed += 1
        for face in self.visible:
            best = self.smoother.best(face["track"])
            if best and best["face_id"] == face.get("face_id"):
                self.thumbs[face["track"]] = (best["face_id"], face_thumbnail(rgb, face["box"]))

    def corrections(self) -> list[dict[str, Any]]:
        return [{"track": track, "face_id": face_id, "thumb": thumb,
                 "age": self.smoother.best(track)["age"]}
                for track, (face_id, thumb) in sorted(self.thumbs.items())]


def analyse_frame(client: ServeClient, rgb: np.ndarray, max_side: int) -> dict:
    """Serve's answer for a frame sent at most ``max_side`` long, its boxes back in the frame's
    pixels and each face with its ``face_id`` when corrections are on."""
    small, scale = shrink(rgb, max_side)
    result = client.predict(encode_jpeg(small))
    faces = scale_faces(result["faces"], 1 / scale)
    ids = (result.get("corrections") or {}).get("face_ids") or []
    if len(ids) == len(faces):
        for face, face_id in zip(faces, ids, strict=True):
            face["face_id"] = face_id
    return {**result, "faces": faces}


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
    every_nth, max_in_flight = max(1, int(every_nth)), max(1, int(max_in_flight))
    info = probe_video(data, name)
    follower = FaceFollower()
    start = time.perf_counter()
    # A real file, not BytesIO: +faststart rewrites the file after encoding by reopening it.
    fd, out = tempfile.mkstemp(suffix=".mp4", prefix="faceage-video-")
    os.close(fd)
    pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="faceage-video")
    pending: deque[tuple[np.ndarray, Future | None]] = deque()
    in_flight = 0
    try:
        with open_video(data, name) as inp, VideoWriter(out, frame_rate(inp),
                                                       faststart=True) as writer:

            def finish(rgb: np.ndarray, future: Future | None) -> None:
                if future is not None:
                    follower.take(rgb, future)
                writer.write(draw_frame(rgb, follower.visible))
                if progress:
                    progress(writer.frames, info.frames,
                             writer.frames / (time.perf_counter() - start))

            try:
                for index, (_, frame) in enumerate(rgb_frames(inp)):
                    rgb = writer.even(shrink(frame, output_max_side)[0])
                    future = (pool.submit(analyse_frame, client, rgb, analyse_max_side)
                              if index % every_nth == 0 else None)
                    pending.append((rgb, future))
                    in_flight += future is not None
                    while in_flight >= max_in_flight:
                        rgb_done, future_done = pending.popleft()
                        in_flight -= future_done is not None
                        finish(rgb_done, future_done)
            except av.error.FFmpegError as exc:
                if not writer.frames and not pending:
                    raise VideoError(f"{name}: decoding failed ({exc})") from None
                # A truncated tail: keep what decoded.
            while pending:
                finish(*pending.popleft())
            if not writer.frames:
                raise VideoError(f"{name}: no frames could be decoded")
            written, codec, (width, height) = writer.frames, writer.codec, writer.size
        mp4 = open(out, "rb").read()  # noqa: SIM115 - read at once
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        os.unlink(out)
    return VideoResult(mp4, written, follower.analysed, width, height,
                       time.perf_counter() - start, codec, follower.rejected,
                       follower.smoother.summary(), follower.corrections())
