"""The webcam path: the WebRTC frame callback never waits on the network.

The callback hands its newest frame to a background sender and draws the latest answer it has.
The sender keeps at most ``IN_FLIGHT`` frames out on the WebSocket ``/stream`` (the newest frame
each time an answer comes back), so the video never lags behind the camera: with two out, Serve
detects one frame while the previous one is aged and sent back.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any

import av
import numpy as np

from faceage.inference.annotate import scale_faces
from faceage.webapp.client import ServeError, StreamClient
from faceage.webapp.draw import draw_frame, encode_jpeg, shrink
from faceage.webapp.tracking import AgeSmoother

SEND_MAX_SIDE = 640
# The sender thread exits after this long without frames (the stream stopped) and is started
# again by the next frame, so no stop hook is needed.
IDLE_EXIT_S = 10.0
RETRY_S = 1.0
# Tracks shown without a fresh answer for this long are hidden rather than left floating.
STALE_RESULT_S = 3.0
# Frames out to /stream at once; Serve works on up to args.stream_in_flight (2) of a socket.
# $FACEAGE_STREAM_IN_FLIGHT changes it (1: the next frame only when the answer is back, which
# leaves more CPU to the video when Serve, Streamlit and the browser share a small machine).
IN_FLIGHT_ENV = "FACEAGE_STREAM_IN_FLIGHT"
IN_FLIGHT = 2
# With room for another frame, the sender looks for an answer this often (a camera frame comes
# every 33 ms at 30 fps) ...
POLL_S = 0.01
# ... and gives up on an answer after this long.
ANSWER_TIMEOUT_S = 10.0


def in_flight_from_env() -> int:
    """``$FACEAGE_STREAM_IN_FLIGHT``, else ``IN_FLIGHT``."""
    value = os.environ.get(IN_FLIGHT_ENV, "")
    try:
        return max(1, int(value)) if value.strip() else IN_FLIGHT
    except ValueError:
        raise ValueError(f"${IN_FLIGHT_ENV} must be a whole number of frames, not "
                         f"{value!r}") from None


class RateMeter:
    """Events per second over the last few seconds."""

    def __init__(self, window_s: float = 3.0):
        self.window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self._times.append(now)
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()

    def rate(self, now: float) -> float:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(1e-6, self._times[-1] - self._times[0])


class LiveAnnotator:
    """Per-session webcam state shared by the WebRTC callback thread and the sender thread."""

    def __init__(self, serve_url: str, jpeg_quality: int = 80, in_flight: int | None = None):
        self.serve_url = serve_url
        self.jpeg_quality = jpeg_quality
        self.in_flight = max(1, in_flight_from_env() if in_flight is None else in_flight)
        self.tracker = AgeSmoother(alpha=0.25, max_misses=3)
        self.frames_in = RateMeter()
        self.answers = RateMeter()
        self.latency_ms: float | None = None
        self.error: str | None = None
        self.answered_frames = 0
        self.last_answer_at = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._newest: np.ndarray | None = None
        self._last_frame_at = 0.0
        self._faces: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None

    def set_serve_url(self, url: str) -> None:
        """Use ``url`` from the next frame on (the sender reconnects)."""
        with self._lock:
            self.serve_url = url

    def _ensure_sender(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._send_loop, daemon=True,
                                                name="faceage-webcam-sender")
                self._thread.start()

    def on_frame(self, frame: av.VideoFrame) -> av.VideoFrame:
        """streamlit-webrtc's ``video_frame_callback``: overlay the latest answer, never block."""
        rgb = frame.to_ndarray(format="rgb24")
        now = time.monotonic()
        with self._lock:
            self._newest = rgb
            self._last_frame_at = now
            faces = self._faces if now - self.last_answer_at < STALE_RESULT_S else []
            error = self.error
        self._wake.set()
        self._ensure_sender()
        self.frames_in.tick(now)
        out = draw_frame(rgb, faces, banner=self.banner(now, error), warn=error is not None)
        new = av.VideoFrame.from_ndarray(out, format="rgb24")
        new.pts, new.time_base = frame.pts, frame.time_base
        return new

    def banner(self, now: float, error: str | None = None) -> str:
        if error:
            return "Serve: " + error[:80]
        latency = f"{self.latency_ms:.0f} ms" if self.latency_ms is not None else "-- ms"
        return f"{self.frames_in.rate(now):.1f} fps | {latency} round trip"

    def stats(self) -> dict[str, Any]:
        """Numbers for the page: fps in, answers/s, latency, faces, error."""
        now = time.monotonic()
        with self._lock:
            faces = list(self._faces) if now - self.last_answer_at < STALE_RESULT_S else []
            return {"fps": self.frames_in.rate(now), "answers_per_s": self.answers.rate(now),
                    "latency_ms": self.latency_ms, "faces": faces, "error": self.error,
                    "answered": self.answered_frames,
                    "streaming": now - self._last_frame_at < 2.0}

    def _send_loop(self) -> None:
        client: StreamClient | None = None
        url = None
        out: deque[tuple[float, float]] = deque()  # (sent at, scale) of frames not answered yet
        try:
            while True:
                if len(out) < self.in_flight:  # room for a frame: the newest, if there is one
                    if not out:
                        self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    with self._lock:
                        rgb, self._newest = self._newest, None
                        idle = time.monotonic() - self._last_frame_at
                        if rgb is None and not out and idle > IDLE_EXIT_S:
                            self._thread = None
                            return
                        if url != self.serve_url and client is not None:
                            client.close()
                            client = None
                            out.clear()
                        url = self.serve_url
                    if rgb is not None:
                        if client is None:
                            client = StreamClient(url)
                        small, scale = shrink(rgb, SEND_MAX_SIDE)
                        try:
                            client.send(encode_jpeg(small, self.jpeg_quality))
                        except ServeError as exc:
                            self._failed(exc, client, out)
                            continue
                        out.append((time.monotonic(), scale))
                        continue
                if not out:
                    continue
                room = len(out) < self.in_flight
                try:
                    if room and time.monotonic() - out[0][0] > ANSWER_TIMEOUT_S:
                        raise ServeError(f"Serve did not answer a frame within "
                                         f"{ANSWER_TIMEOUT_S:.0f} s", kind="timeout")
                    result = client.receive(POLL_S if room else ANSWER_TIMEOUT_S, poll=room)
                except ServeError as exc:
                    self._failed(exc, client, out)
                    continue
                if result is None:  # nothing yet: look for a new frame to send
                    continue
                sent, scale = out.popleft()
                now = time.monotonic()
                faces = self.tracker.update(scale_faces(result["faces"], 1 / scale))
                self.answers.tick(now)
                with self._lock:
                    self._faces = faces
                    self.latency_ms = (now - sent) * 1000
                    self.last_answer_at = now
                    self.answered_frames += 1
                    self.error = None
        finally:
            if client is not None:
                client.close()

    def _failed(self, exc: ServeError, client: StreamClient,
                out: deque[tuple[float, float]]) -> None:
        """Show the error. A rejected or shed frame's answer takes that frame off ``out``; any
        other failure closes the socket (what was out is lost) and waits before the next try."""
        with self._lock:
            self.error = str(exc)
        if exc.kind in ("rejected", "overloaded"):  # that frame's answer
            out.popleft()
        if exc.kind != "rejected":
            client.close()
            out.clear()
            time.sleep(RETRY_S)
