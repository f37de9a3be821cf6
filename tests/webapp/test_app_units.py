"""The Streamlit app's helpers without a browser: tracking, client errors, video, no torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from faceage.inference.annotate import scale_faces
from faceage.inference.overlap import iou
from faceage.runtime import free_port
from faceage.webapp.client import (
    ServeClient,
    ServeError,
    StreamClient,
    normalise_url,
    websocket_url,
)
from faceage.webapp.draw import draw_frame, encode_jpeg, shrink
from faceage.webapp.tracking import AgeSmoother
from faceage.webapp.video import VideoError, probe_video, suggested_stride

REPO = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A loopback port with nothing listening (bound once, then released)."""
    return free_port()


def face(box, age, score=0.99):
    return {"box": list(box), "score": score, "age": age, "landmarks": []}


def test_iou():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)


def test_tracker_keeps_identity_and_smooths_age():
    tracker = AgeSmoother(alpha=0.5)
    first = tracker.update([face([0, 0, 100, 100], 30), face([200, 0, 300, 100], 60)])
    assert [f["track"] for f in first] == [1, 2]
    # The faces come back in the other order, moved a little: same tracks, ages averaged.
    second = tracker.update([face([205, 2, 305, 102], 70), face([3, 1, 103, 101], 40)])
    assert [f["track"] for f in second] == [2, 1]
    assert [f["age"] for f in second] == [65.0, 35.0]
    assert [f["raw_age"] for f in second] == [70, 40]
    # A face far from any track starts a new one.
    third = tracker.update([face([500, 500, 600, 600], 20)])
    assert third[0]["track"] == 3 and third[0]["age"] == 20
    assert {t["face"] for t in tracker.summary()} == {1, 2, 3}


def test_tracker_moves_each_interval_with_the_smoothed_age():
    tracker = AgeSmoother(alpha=0.5)
    tracker.update([{**face([0, 0, 100, 100], 30), "age_interval": [25, 36]}])
    [f] = tracker.update([{**face([2, 0, 102, 100], 40), "age_interval": [34, 47]}])
    assert f["age"] == 35.0 and f["age_interval"] == [29.0, 42.0]  # 6 below, 7 above
    [old_serve] = tracker.update([face([2, 0, 102, 100], 40)])  # a Serve without intervals
    assert "age_interval" not in old_serve and old_serve["age"] == 37.5


def test_labels_and_table_show_the_interval_and_cope_without_one():
    from faceage.inference.annotate import age_label
    from faceage.webapp.draw import interval_text

    with_interval = {**face([10, 10, 90, 90], 34.4), "age_interval": [29.2, 40.1]}
    old = face([10, 10, 90, 90], 34.4)
    assert age_label(with_interval) == "34 (29-40)" and age_label(old) == "34"
    assert age_label(with_interval, "–") == "34 (29–40)"
    assert interval_text(with_interval) == "29–40" and interval_text(old) == "–"
    rgb = np.zeros((120, 120, 3), np.uint8)
    drawn, plain = draw_frame(rgb, [with_interval]), draw_frame(rgb, [old])
    assert drawn.shape == rgb.shape and (drawn != plain).any()  # the longer label is drawn


def test_tracker_drops_lost_faces_after_max_misses():
    tracker = AgeSmoother(max_misses=2)
    tracker.update([face([0, 0, 10, 10], 30)])
    for _ in range(2):
        tracker.update([])
    assert len(tracker.tracks) == 1 and tracker.visible() == []
    tracker.update([])
    assert tracker.tracks == [] and tracker.summary()[0]["frames"] == 1


def test_urls():
    assert normalise_url(" 127.0.0.1:8000/ ") == "http://127.0.0.1:8000"
    assert websocket_url("https://example.org/faceage") == "wss://example.org/faceage/stream"
    for bad in ("", "ftp://x", "http://"):
        with pytest.raises(ValueError):
            normalise_url(bad)


def test_client_says_plainly_when_serve_is_down():
    url = f"http://127.0.0.1:{closed_port()}"
    with ServeClient(url) as client:
        with pytest.raises(ServeError) as down:
            client.predict(b"\xff\xd8 not sent anyway")
    assert down.value.kind == "unreachable" and "Cannot reach Serve" in str(down.value)
    with pytest.raises(ServeError) as stream_down:
        StreamClient(url, open_timeout=2).predict(b"frame")
    assert stream_down.value.kind == "unreachable"


class _ScriptedServe:
    """A real HTTP server on 127.0.0.1 answering from a script: (status, headers, body) in turn,
    the last one repeated. Records every request as (method, path, body, time)."""

    def __init__(self, script: list[tuple[int, dict, dict]]):
        import http.server
        import threading
        import time

        self.script, self.requests = list(script), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append((self.command, self.path, body, time.monotonic()))
                status, headers, payload = (outer.script.pop(0) if len(outer.script) > 1
                                            else outer.script[0])
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json",
                                   "Content-Length": str(len(data)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted_serve():
    servers = []

    def start(*script):
        servers.append(_ScriptedServe(list(script)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


SHED = (503, {"Retry-After": "1"}, {"error": "the service is at capacity; retry in a moment",
                                     "status": 503})
FACES = (200, {}, {"faces": [face([1, 2, 3, 4], 30)], "image": {"width": 8, "height": 8}})


def test_predict_waits_out_a_503_for_its_retry_after(scripted_serve):
    import time

    serve = scripted_serve(SHED, FACES)
    start = time.monotonic()
    with ServeClient(serve.url) as client:
        result = client.predict(b"jpeg bytes")
    assert result["faces"][0]["age"] == 30
    assert [(m, p, b) for m, p, b, _ in serve.requests] == [("POST", "/predict", b"jpeg bytes")] * 2
    waited = serve.requests[1][3] - serve.requests[0][3]
    assert 0.9 <= waited < 1.9 and time.monotonic() - start < 10


def test_predict_gives_up_after_bounded_retries(scripted_serve):
    import time

    serve = scripted_serve(SHED)
    start = time.monotonic()
    with ServeClient(serve.url, retries=2) as client, pytest.raises(ServeError) as shed:
        client.predict(b"jpeg bytes")
    elapsed = time.monotonic() - start
    assert shed.value.kind == "overloaded" and shed.value.status == 503
    assert "overloaded (503): the service is at capacity" in str(shed.value)
    assert len(serve.requests) == 3 and 1.8 <= elapsed < 10


def test_retry_after_is_capped_and_only_503_is_retried(scripted_serve, monkeypatch):
    import time

    from faceage.webapp import client as client_module

    monkeypatch.setattr(client_module, "MAX_RETRY_WAIT_S", 0.2)
    serve = scripted_serve((503, {"Retry-After": "3600"}, {"error": "busy", "status": 503}))
    start = time.monotonic()
    with ServeClient(serve.url, retries=2) as client, pytest.raises(ServeError):
        client.predict(b"x")
    assert len(serve.requests) == 3 and time.monotonic() - start < 5
    # The input's fault (413, even with Retry-After), and health checks: asked once.
    too_big = scripted_serve((413, {"Retry-After": "1"}, {"error": "too big", "status": 413}))
    with ServeClient(too_big.url) as client, pytest.raises(ServeError) as rejected:
        client.predict(b"x")
    assert rejected.value.kind == "rejected" and len(too_big.requests) == 1
    down = scripted_serve(SHED)
    with ServeClient(down.url) as client, pytest.raises(ServeError):
        client.health()
    assert len(down.requests) == 1


def test_a_500_is_retried_once(scripted_serve):
    """An Ingress replica that dies answers its requests with the proxy's plain 500; the retry
    reaches a live one. A second 500 is reported, not retried again."""
    lost = (500, {}, "Internal Server Error")
    serve = scripted_serve(lost, FACES)
    with ServeClient(serve.url) as client:
        assert client.predict(b"jpeg")["faces"][0]["age"] == 30
    assert len(serve.requests) == 2
    broken = scripted_serve(lost)
    with ServeClient(broken.url) as client, pytest.raises(ServeError) as failed:
        client.predict(b"jpeg")
    assert failed.value.status == 500 and len(broken.requests) == 2
    # A 500 after a 503 (a shed request, then a lost Ingress) still gets its one retry.
    mixed = scripted_serve(SHED, lost, FACES)
    with ServeClient(mixed.url) as client:
        assert client.predict(b"jpeg")["faces"][0]["age"] == 30
    assert len(mixed.requests) == 3


class _ScriptedStream:
    """A real WebSocket server on 127.0.0.1 standing in for /stream: it answers each frame after
    ``work_s``, in order, with one face aged by the frame's number, and records the most frames
    it held at once (received, not yet answered)."""

    def __init__(self, work_s: float):
        import queue
        import threading

        from websockets.sync.server import serve

        self.work_s, self.most_held, self.received, self.answered = work_s, 0, 0, 0
        lock = threading.Lock()

        def handler(ws):
            frames: queue.Queue = queue.Queue()

            def read():
                try:
                    for message in ws:
                        with lock:
                            self.received += 1
                            self.most_held = max(self.most_held, self.received - self.answered)
                        frames.put(message)
                except Exception:  # the client left
                    pass
                frames.put(None)

            threading.Thread(target=read, daemon=True).start()
            index = 0
            while frames.get() is not None:
                time.sleep(self.work_s)
                try:
                    ws.send(json.dumps({"frame": index, "faces": [face([10, 10, 60, 60], 30)]}))
                except Exception:  # the client left
                    return
                with lock:
                    self.answered += 1
                index += 1

        import time

        self.server = serve(handler, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_webcam_sender_keeps_two_frames_in_flight_and_reads_answers_in_order():
    """The webcam path (``LiveAnnotator``) against a stand-in /stream that takes 60 ms a frame:
    the sender keeps two frames out (never more), so answers come back about every 60 ms rather
    than every round trip, and each answer's boxes are scaled back by its own frame's scale."""
    import time
    from fractions import Fraction

    from faceage.webapp.live import LiveAnnotator

    stream = _ScriptedStream(work_s=0.06)
    annotator = LiveAnnotator(stream.url)
    try:
        rgb = np.full((720, 1280, 3), 100, np.uint8)  # sent at 640x360: boxes come back halved
        start = time.monotonic()
        while time.monotonic() - start < 2.0:  # a 100 fps camera for 2 s
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.time_base = Fraction(1, 90_000)
            frame.pts = int((time.monotonic() - start) * 90_000)
            assert annotator.on_frame(frame).width == 1280
            time.sleep(0.01)
        stats = annotator.stats()
    finally:
        stream.close()
    assert stream.most_held == 2, stream.most_held
    assert stats["error"] is None and stats["answered"] >= 15, stats
    assert [f["box"] for f in stats["faces"]] == [[20, 20, 120, 120]], stats
    # One at a time would be one answer per 60 ms of work plus the round trip; two in flight
    # keep the stand-in busy.
    assert stats["answers_per_s"] > 12, stats


def test_frames_in_flight_come_from_the_environment(monkeypatch):
    from faceage.webapp.live import IN_FLIGHT_ENV, LiveAnnotator

    assert LiveAnnotator("http://127.0.0.1:1").in_flight == 2
    monkeypatch.setenv(IN_FLIGHT_ENV, "1")
    assert LiveAnnotator("http://127.0.0.1:1").in_flight == 1
    monkeypatch.setenv(IN_FLIGHT_ENV, "two")
    with pytest.raises(ValueError, match="FACEAGE_STREAM_IN_FLIGHT must be a whole number"):
        LiveAnnotator("http://127.0.0.1:1")


def test_drawing_helpers():
    rgb = np.full((100, 200, 3), 128, np.uint8)
    out = draw_frame(rgb, [face([10, 10, 60, 60], 42)], banner="12 fps")
    assert out.shape == rgb.shape and not np.array_equal(out, rgb)
    assert encode_jpeg(rgb)[:2] == b"\xff\xd8"
    small, scale = shrink(rgb, 100)
    assert small.shape[:2] == (50, 100) and scale == 0.5
    assert scale_faces([face([1, 2, 3, 4], 5)], 2.0)[0]["box"] == [2, 4, 6, 8]


def _tiny_video(frames: int = 6) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            rgb = np.full((48, 64, 3), i * 30, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_probe_video_and_stride():
    info = probe_video(_tiny_video(6))
    assert (info.width, info.height, info.frames) == (64, 48, 6)
    assert info.fps == pytest.approx(5)
    with pytest.raises(VideoError, match="not a readable video"):
        probe_video(b"this is not a video", "notes.mp4")
    assert suggested_stride(None) == 1 and suggested_stride(300) == 1
    assert suggested_stride(301) == 2 and suggested_stride(3000) == 10


def test_app_never_imports_torch():
    """The app modules, and a whole script run of app/main.py, leave torch unimported."""
    code = """
import json, sys
import faceage.webapp.client, faceage.webapp.draw, faceage.webapp.live
import faceage.webapp.tracking, faceage.webapp.video, faceage.webapp.webrtc_guard
from streamlit.testing.v1 import AppTest
at = AppTest.from_file("app/main.py", default_timeout=60).run()
print(json.dumps({
    "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.",
                                                                            "facenet_pytorch"))),
    "exceptions": [e.value for e in at.exception],
    "errors": [e.value for e in at.error],
}))
"""
    env = {**os.environ, "FACEAGE_SERVE_URL": f"http://127.0.0.1:{closed_port()}"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["torch"] == []
    assert report["exceptions"] == []
    # Serve is down in this run: the page says so in words.
    assert any("Cannot reach Serve" in e for e in report["errors"]), report


class _Worker:
    """Stands in for a WebRtcWorker: the orphan check only calls ``stop``."""

    stopped = False

    def stop(self):
        self.stopped = True


def _signalling_with_a_stale_run_count(monkeypatch, guard: bool) -> _Worker:
    """Three script runs as seen by streamlit-webrtc 0.79's ``_get_or_create_context``.

    Run A renders the component at run count 1 and gets a worker. Run B starts before A's
    ``script_finished`` was sent, so it reads 1 again (really 2). Once both finishes are sent
    the count is 3, and run C (ICE connected, the browser reports playing) reads 3.
    """
    import streamlit as st
    from streamlit_webrtc import component

    from faceage.webapp import webrtc_guard

    session = type("Session", (), {"script_run_count": 1})()
    for module in (component, webrtc_guard):
        monkeypatch.setattr(module, "get_this_session_info", lambda: session)
        monkeypatch.setattr(module, "get_script_run_count", lambda s: s.script_run_count)
    key = f"webcam-{guard}"
    st.session_state.pop(key, None)
    worker = _Worker()
    for run, count in (("A", 1), ("B", 1), ("C", 3)):
        session.script_run_count = count
        if guard:
            webrtc_guard.disarm_orphan_check(key)
        context = component._get_or_create_context(key)
        if run == "A":
            context._set_worker(worker)
    st.session_state.pop(key, None)
    return worker


def test_webrtc_orphan_check_race_and_our_guard(monkeypatch):
    """The race faceage/webapp/webrtc_guard.py works around: a stale run count stops a live worker.

    If a streamlit-webrtc release fixes the check, the first assert fails: drop the guard then.
    """
    assert _signalling_with_a_stale_run_count(monkeypatch, guard=False).stopped
    assert not _signalling_with_a_stale_run_count(monkeypatch, guard=True).stopped
