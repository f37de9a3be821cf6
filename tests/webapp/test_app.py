"""The Streamlit app in a real Chromium (Debian's, driven by Playwright) against a real Serve.

Needs ``/usr/bin/chromium`` and ``ffmpeg`` (``apt-get install chromium ffmpeg``; ``.ci/run`` does
it). Outside CI they may be missing and the tests skip; with ``CI`` set they must be there.
Screenshots, downloads and the Streamlit log go to ``artifacts/test_app/``
(``$FACEAGE_TEST_ARTIFACTS`` overrides). ``FACEAGE_WEBCAM_REPEAT=N`` runs the webcam test N times
(fresh browser session each time) to check that streaming is stable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import requests
from PIL import Image

from faceage.runtime import free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("FACEAGE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("FACEAGE_TEST_ARTIFACTS", REPO / "artifacts" / "test_app"))
WEBCAM_REPEAT = int(os.environ.get("FACEAGE_WEBCAM_REPEAT", "1"))
# The fake webcam's clip: a 640x480 camera at 30 fps, so the page can show more than a slower
# camera would allow.
CAMERA_FPS = 30
# Every test drives Chromium against the Streamlit app and the session's Serve application.
pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.browser]
# Slow, loaded CI machines: every wait is on a condition, with these as the upper bounds.
STARTUP_S = 180
STEP_MS = 180_000
APP_READY = ('[data-testid="stApp"][data-test-connection-state="CONNECTED"]'
             '[data-test-script-state="notRunning"]')
WEBRTC_IFRAME = 'iframe[title*="webrtc_streamer"]'
# The box colour of faceage.inference.annotate.draw_faces.
BOX_RGB = np.array([0, 220, 90])

# Keeps every RTCPeerConnection a page (or its component iframes) creates, for getStats().
RECORD_PEER_CONNECTIONS = """
(() => {
  const Native = window.RTCPeerConnection;
  if (!Native || Native.__faceageRecorded) return;
  window.__faceagePeerConnections = [];
  function Recorded(...args) {
    const pc = new Native(...args);
    window.__faceagePeerConnections.push(pc);
    return pc;
  }
  Recorded.prototype = Native.prototype;
  Object.setPrototypeOf(Recorded, Native);
  Recorded.__faceageRecorded = true;
  window.RTCPeerConnection = Recorded;
})();
"""
INBOUND_VIDEO_FRAMES_DECODED = """
async () => {
  let decoded = 0;
  for (const pc of window.__faceagePeerConnections || []) {
    const report = await pc.getStats();
    report.forEach((r) => {
      if (r.type === "inbound-rtp" && (r.kind || r.mediaType) === "video") {
        decoded += r.framesDecoded || 0;
      }
    });
  }
  return decoded;
}
"""


def _missing_tool(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must install it (.ci/run)")
    pytest.skip(f"{message} (apt-get install chromium ffmpeg)")


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser_tools() -> None:
    if not Path(CHROMIUM).exists():
        _missing_tool(f"Chromium not found at {CHROMIUM}")
    if shutil.which("ffmpeg") is None:
        _missing_tool("ffmpeg not found")


@pytest.fixture(scope="session")
def fake_camera(browser_tools, astronaut_path, tmp_path_factory) -> Path:
    """A 640x480, 30 fps .y4m of the astronaut photo drifting in a small circle (every frame a
    little different, as from a webcam): Chromium's fake webcam plays it in a loop."""
    path = tmp_path_factory.mktemp("camera") / "astronaut.y4m"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-loop", "1",
                    "-i", str(astronaut_path), "-vf",
                    "scale=520:520,pad=680:520:80:0,"
                    "crop=640:480:'20+20*sin(2*PI*t/2)':'20+20*cos(2*PI*t/2)',format=yuv420p",
                    "-r", str(CAMERA_FPS), "-t", "2", str(path)], check=True, timeout=120)
    return path


@pytest.fixture(scope="session")
def face_video(astronaut_path, tmp_path_factory) -> Path:
    """12 frames (10 fps, 320x320, H.264) of the astronaut photo drifting right by 2 px a frame."""
    photo = np.asarray(Image.open(astronaut_path).convert("RGB").resize((340, 320)))
    path = tmp_path_factory.mktemp("video") / "astronaut.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 320, "yuv420p"
        for i in range(12):
            frame = np.ascontiguousarray(photo[:, 20 - i: 340 - i])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="session")
def streamlit_url(serve_url, artifacts):
    """``streamlit run app/main.py`` on a free loopback port, talking to ``serve_url``."""
    port = free_port()
    log = open(artifacts / "streamlit.log", "wb")  # noqa: SIM115 - closed at teardown
    env = {**os.environ, "FACEAGE_SERVE_URL": serve_url, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "main.py"),
         "--server.address", "127.0.0.1", "--server.port", str(port),
         "--browser.gatherUsageStats", "false", "--server.headless", "true",
         "--server.fileWatcherType", "none", "--global.developmentMode", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}; see {log.name}")
            try:
                if requests.get(url + "/_stcore/health", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not answer within {STARTUP_S} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="session")
def browser(browser_tools, fake_camera, tmp_path_factory):
    """Debian's Chromium with a fake webcam, kept on loopback (no mDNS, no DNS, no STUN)."""
    from playwright.sync_api import sync_playwright

    args = [
        "--headless=new", "--no-sandbox", "--disable-gpu",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={fake_camera}",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-quic", "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ]
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
            args=args, headless=True, accept_downloads=True,
            viewport={"width": 1280, "height": 1100})
        context.set_default_timeout(STEP_MS)
        context.add_init_script(RECORD_PEER_CONNECTIONS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser, streamlit_url, artifacts, request):
    """A fresh tab (a new Streamlit session) with the app loaded and idle; its last look is
    saved as ``artifacts/end-<test>.png`` (what a failure looked like)."""
    tab = browser.new_page()
    tab.goto(streamlit_url)
    wait_idle(tab)
    try:
        yield tab
    finally:
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        try:
            tab.screenshot(path=str(artifacts / f"end-{name}.png"), full_page=True, timeout=30_000)
        finally:
            tab.close()


# -- helpers -------------------------------------------------------------------------------------


def wait_idle(page) -> None:
    """Connected and no script run in progress: safe to upload or click."""
    page.wait_for_selector(APP_READY, timeout=STEP_MS)


def upload(page, container_key: str, paths: Path | list[Path]) -> None:
    """Put ``paths`` on the uploader with ``key`` and wait until the server has received them."""
    paths = paths if isinstance(paths, list) else [paths]
    received = []

    def on_response(response) -> None:
        if "/_stcore/upload_file" in response.url and response.request.method == "PUT":
            received.append(response)

    wait_idle(page)
    page.on("response", on_response)
    try:
        page.locator(f".st-key-{container_key} input[type=file]").set_input_files(
            [str(p) for p in paths])
        deadline = time.monotonic() + STEP_MS / 1000
        while len(received) < len(paths):
            assert time.monotonic() < deadline, f"{len(received)} of {len(paths)} uploads arrived"
            page.wait_for_timeout(100)
    finally:
        page.remove_listener("response", on_response)
    assert all(r.ok for r in received), [r.status for r in received]


def serve_faces(serve_url: str, path: Path) -> list[dict]:
    answer = requests.post(serve_url + "/predict", data=path.read_bytes(),
                           headers={"Content-Type": "image/jpeg"}, timeout=120)
    answer.raise_for_status()
    return answer.json()["faces"]


def serve_ages(serve_url: str, path: Path) -> list[float]:
    return [face["age"] for face in serve_faces(serve_url, path)]


def green_box_pixels(rgb: np.ndarray) -> int:
    """Pixels close to the overlay's box colour (video compression shifts it a little)."""
    return int((np.abs(rgb[..., :3].astype(int) - BOX_RGB).max(axis=-1) < 45).sum())


def inbound_frames(frame) -> int:
    return int(frame.evaluate(INBOUND_VIDEO_FRAMES_DECODED))


def wait_inbound_frames(frame, at_least: int, timeout_s: float = STEP_MS / 1000) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        decoded = inbound_frames(frame)
        if decoded >= at_least:
            return decoded
        if time.monotonic() > deadline:
            raise AssertionError(f"only {decoded} inbound video frames decoded "
                                 f"(waited for {at_least})")
        frame.page.wait_for_timeout(250)


LIVE_STATS = re.compile(r"([\d.]+) frames/s · round trip (\d+) ms · ([\d.]+) answers/s")


def page_live_stats(text: str) -> dict[str, float]:
    """The numbers the webcam tab shows under the video: the camera frames/s the page gets,
    the round trip of the latest answer and the answers/s from Serve."""
    found = LIVE_STATS.search(text)
    assert found, f"no live numbers in {text!r}"
    return {"frames_per_s": float(found[1]), "round_trip_ms": float(found[2]),
            "answers_per_s": float(found[3])}


# -- tests ---------------------------------------------------------------------------------------


def test_photo_shows_the_age_serve_gives(page, serve_url, astronaut_path, artifacts, tmp_path):
    faces = serve_faces(serve_url, astronaut_path)
    expected = [f["age"] for f in faces]
    assert len(expected) == 1
    low, high = faces[0]["age_interval"]
    assert 0 <= low <= expected[0] <= high
    interval = f"({low:.0f}–{high:.0f})"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(astronaut_path.read_bytes()[:3000])
    upload(page, "photos", [astronaut_path, broken])
    # Serve's 400 for the truncated photo is a message on the page, not a traceback.
    page.locator(".st-key-photo-1").filter(has_text="Serve rejected the input (400)").wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
    result = page.locator(".st-key-photo-0")
    result.locator("table").wait_for()
    text = result.inner_text()
    shown = [float(a) for a in re.findall(r"age (\d+\.\d)", text)]
    assert len(shown) == 1 and abs(shown[0] - expected[0]) <= 0.051, (shown, expected, text)
    assert f"{expected[0]:.1f}" in result.locator("table").inner_text()
    # The interval, e.g. "34.2 (29–40)", next to the age and in the table.
    assert f"{expected[0]:.1f} {interval}" in text, (interval, text)
    assert interval in result.locator("table").inner_text()
    with page.expect_download() as download:
        result.get_by_role("button", name="Download annotated image").click()
    saved = artifacts / "astronaut-annotated.png"
    download.value.save_as(saved)
    annotated = np.asarray(Image.open(saved).convert("RGB"))
    assert annotated.shape == (512, 512, 3) and green_box_pixels(annotated) > 200
    page.screenshot(path=str(artifacts / "photo.png"), full_page=True)


def test_phone_photos_in_the_image_tab(page, serve_url, artifacts, tmp_path):
    """A 12 MP JPEG and a 12 MP HEIC (as iPhones save them) dropped on the image tab: each shows
    Serve's age for the photo, drawn on a copy at most 1600 px long."""
    from testkit.photos import phone_heic, phone_jpeg

    photos = [tmp_path / "phone.jpg", tmp_path / "phone.heic"]
    photos[0].write_bytes(phone_jpeg(12))
    photos[1].write_bytes(phone_heic())
    upload(page, "photos", photos)
    for index, path in enumerate(photos):
        [face] = serve_faces(serve_url, path)
        result = page.locator(f".st-key-photo-{index}")
        result.locator("table").wait_for()
        text = result.inner_text()
        assert f"{path.name}: 1 face, age {face['age']:.1f}" in text, (face, text)
        assert page.locator('[data-testid="stException"]').count() == 0
        with page.expect_download() as download:
            result.get_by_role("button", name="Download annotated image").click()
        saved = artifacts / f"{path.stem}-{path.suffix[1:]}-annotated.png"
        download.value.save_as(saved)
        annotated = np.asarray(Image.open(saved).convert("RGB"))
        assert max(annotated.shape[:2]) == 1600 and green_box_pixels(annotated) > 200
    page.screenshot(path=str(artifacts / "phone-photos.png"), full_page=True)


def test_video_comes_back_annotated(page, face_video, artifacts):
    page.get_by_role("tab", name="Video").click()
    upload(page, "video", face_video)
    button = page.get_by_role("button", name="Annotate video")
    button.wait_for()
    assert "12 frames" in page.get_by_text(re.compile(r"320x320")).first.inner_text()
    wait_idle(page)
    button.click()
    result = page.locator(".st-key-video-result")
    result.wait_for(timeout=STEP_MS * 2)
    assert "12 frames" in result.inner_text()
    # The browser can decode the H.264 it was given.
    page.wait_for_function(
        "() => { const v = document.querySelector('.st-key-video-result video');"
        " return v && v.readyState >= 1 && v.videoWidth > 0; }")
    assert result.locator("video").evaluate("v => [v.videoWidth, v.videoHeight]") == [320, 320]
    with page.expect_download() as download:
        result.get_by_role("button", name="Download annotated video").click()
    saved = artifacts / "astronaut-annotated.mp4"
    download.value.save_as(saved)
    with av.open(str(saved)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 12 and frames[0].shape == (320, 320, 3)
    assert all(green_box_pixels(f) > 100 for f in frames), "a frame without the face box"
    # One face followed through the clip: one row in the tracks table, seen in all 12 frames.
    rows = result.locator("table tbody tr")
    assert rows.count() == 1 and "12" in rows.first.inner_text()
    page.screenshot(path=str(artifacts / "video.png"), full_page=True)


@pytest.mark.parametrize("attempt", range(WEBCAM_REPEAT))
def test_webcam_frames_come_back_with_ages(page, artifacts, astronaut_path, rocket_path,
                                           attempt):
    page.get_by_role("tab", name="Webcam").click()
    component = page.frame_locator(WEBRTC_IFRAME)
    start = component.get_by_role("button", name=re.compile(r"^start$", re.I))
    start.wait_for()
    wait_idle(page)
    start.click()
    frame = page.locator(WEBRTC_IFRAME).element_handle().content_frame()
    wait_inbound_frames(frame, at_least=10)
    stats = page.locator(".st-key-live-stats").filter(has_text=re.compile(r"faces: [1-9]"))
    stats.wait_for()
    assert re.search(r"round trip \d+ ms", stats.inner_text())
    # Full script runs while streaming (a photo in the Image tab): with streamlit-webrtc's
    # orphan-check race (faceage/webapp/webrtc_guard.py) this is where a live stream gets stopped.
    page.get_by_role("tab", name="Image").click()
    upload(page, "photos", rocket_path)
    page.locator(".st-key-photo-0").filter(has_text="no face found").wait_for()
    page.get_by_role("tab", name="Webcam").click()
    # Still streaming well after ICE connected and after those runs; a few seconds of it, so
    # the page's rates (3-second windows) describe a steady stream.
    decoded = inbound_frames(frame)
    wait_inbound_frames(frame, at_least=decoded + 5 * CAMERA_FPS)
    stats.wait_for()
    shown = page_live_stats(stats.inner_text())
    record = {**shown, "camera_fps": CAMERA_FPS, "attempt": attempt,
              "load_average": round(os.getloadavg()[0], 2)}
    print(f"\nwebcam page: {record}")
    (artifacts / f"webcam-{attempt}.json").write_text(json.dumps(record))
    assert shown["frames_per_s"] > 0 and shown["answers_per_s"] > 0
    video = component.locator("video").first
    shot = artifacts / f"webcam-{attempt}.png"
    video.screenshot(path=str(shot))
    baseline = green_box_pixels(np.asarray(Image.open(astronaut_path).convert("RGB")))
    assert green_box_pixels(np.asarray(Image.open(shot).convert("RGB"))) > baseline + 200
    component.get_by_role("button", name=re.compile(r"^stop$", re.I)).click()


def test_serve_down_is_said_plainly_and_recovery_is_picked_up(page, serve_url, astronaut_path):
    down_url = f"http://127.0.0.1:{free_port()}"
    box = page.locator(".st-key-serve_url input")
    box.fill(down_url)
    box.press("Enter")
    page.locator(".st-key-serve-status").filter(has_text="Cannot reach Serve").wait_for()
    upload(page, "photos", astronaut_path)
    failed = page.locator(".st-key-photo-0").filter(has_text="Cannot reach Serve")
    failed.wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
    # Serve is back: the same page picks it up, with no reload.
    box.fill(serve_url)
    box.press("Enter")
    page.locator(".st-key-serve-status").filter(has_text="is up").wait_for()
    page.locator(".st-key-photo-0 table").wait_for()
    assert page.locator('[data-testid="stException"]').count() == 0
