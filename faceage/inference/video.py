"""Reading and writing videos with PyAV, torch-free: ``faceage predict --video`` and the web
app's video tab both decode with ``open_video`` / ``rgb_frames`` and encode with
``VideoWriter``."""

from __future__ import annotations

import io
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from faceage.errors import UserError


class VideoError(UserError):
    """An input that is not a readable video; the message says what to do."""


def open_video(source: str | Path | bytes, name: str) -> av.container.InputContainer:
    """An open container with a video stream (a path or the file's bytes), or ``VideoError``."""
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                            mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{name}: not a readable video ({exc}). Use an MP4, MOV, WebM, MKV "
                         "or AVI file.") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name}: has no video stream")
    return container


def frame_rate(container: av.container.InputContainer) -> Fraction:
    """The first video stream's frame rate (25 when the container does not say)."""
    stream = container.streams.video[0]
    return stream.average_rate or stream.guessed_rate or Fraction(25)


def rgb_frames(container: av.container.InputContainer
               ) -> Iterator[tuple[float | None, np.ndarray]]:
    """``(time in seconds, HxWx3 RGB)`` for each frame of the first video stream, decoded on
    FFmpeg's threads; a decoding error is the caller's (``av.error.FFmpegError``)."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    for frame in container.decode(stream):
        yield (float(frame.time) if frame.time is not None else None,
               frame.to_ndarray(format="rgb24"))


def encoder_name() -> str:
    """H.264 when this FFmpeg has an encoder for it (what browsers play in MP4), else MPEG-4
    part 2, so something still comes out."""
    for name in ("libx264", "h264", "libopenh264"):
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
                return name
            except (av.error.FFmpegError, ValueError):
                continue
    return "mpeg4"


class VideoWriter:
    """Frames (HxWx3 RGB) to a video file: yuv420p, sized by the first frame (cut to even
    sides, as yuv420p needs); ``faststart`` puts the MP4 index up front, so a browser starts
    playing before the whole file is in."""

    def __init__(self, path: str | Path, rate: Fraction, faststart: bool = False):
        self.codec = encoder_name()
        options = {"movflags": "+faststart"} if faststart else {}
        self._out = av.open(str(path), mode="w", options=options)
        self._stream = self._out.add_stream(self.codec, rate=rate)
        self._stream.pix_fmt = "yuv420p"
        if self.codec == "libx264":
            self._stream.options = {"preset": "veryfast", "crf": "23"}
        self.frames = 0
        self._sized = False  # PyAV's stream starts at 640x480: the first frame sets the size

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the video: the first frame's, cut to even sides."""
        return self._stream.width, self._stream.height

    def even(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` cut to the video's size (the first frame sets it)."""
        if not self._sized:
            self._stream.width, self._stream.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
            self._sized = True
        return np.ascontiguousarray(rgb[: self._stream.height, : self._stream.width])

    def write(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(self.even(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._out.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        try:
            if self.frames:
                for packet in self._stream.encode():
                    self._out.mux(packet)
        finally:
            self._out.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
