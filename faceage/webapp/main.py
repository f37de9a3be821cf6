"""faceage in the browser: photos, videos and a live webcam, aged by the Serve endpoint.

    FACEAGE_SERVE_URL=http://127.0.0.1:8000 \
        streamlit run app/main.py --server.address 127.0.0.1 --browser.gatherUsageStats false

(app/main.py, in a checkout, runs this module's ``main``; ``faceage up`` runs this file.)
A thin client: every face and age comes from Serve over HTTP or WebSocket; this process never
imports torch or loads a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import streamlit as st
from streamlit_webrtc import WebRtcMode, webrtc_streamer

from faceage.errors import ImageError
from faceage.inference.annotate import age_label, scale_faces  # (Pillow only)
from faceage.inference.images import load_photo  # (Pillow only; no torch)
from faceage.webapp.client import ServeClient, ServeError, normalise_url, serve_url_from_env
from faceage.webapp.corrections import (
    correction_form,
    corrections_settings,
    face_ids,
    privacy_note,
)
from faceage.webapp.draw import draw_frame, encode_image, face_thumbnail, interval_text, shrink
from faceage.webapp.live import LiveAnnotator
from faceage.webapp.video import VideoError, annotate_video, probe_video, suggested_stride
from faceage.webapp.webrtc_guard import disarm_orphan_check

PHOTO_TYPES = ["jpg", "jpeg", "png", "webp", "heic", "heif", "avif", "bmp", "gif", "tif", "tiff"]
# Photos are shown, drawn on and offered for download at most this long: a 12 MP phone photo
# would cost seconds to draw and encode, and the page shows it smaller anyway.
DISPLAY_SIDE = 1600
VIDEO_TYPES = ["mp4", "mov", "m4v", "webm", "mkv", "avi"]
WEBCAM_KEY = "webcam"
ICE_SERVERS_ENV = "FACEAGE_ICE_SERVERS"
DEFAULT_ICE_SERVERS = [{"urls": ["stun:stun.l.google.com:19302"]}]
SLOW_HEALTH_S = 1.5
LOGGER = logging.getLogger("faceage.app")
if not LOGGER.handlers:  # Streamlit configures only its own loggers; ours go to stderr too
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(logging.INFO)


# -- Serve ---------------------------------------------------------------------------------------


@st.cache_data(ttl=2, show_spinner=False)
def serve_health(url: str) -> dict:
    """Whether Serve at ``url`` answers, how fast, and its model (cached for 2 s)."""
    with ServeClient(url) as client:
        try:
            seconds = client.health()
            model = client.model()
        except ServeError as exc:
            return {"ok": False, "error": str(exc), "kind": exc.kind}
    return {"ok": True, "seconds": seconds, "model": model}


@st.cache_data(ttl=600, max_entries=64, show_spinner=False)
def predict_photo(url: str, data: bytes, content_type: str) -> dict:
    """Serve's answer for one photo; reruns (every click) reuse it instead of asking again."""
    with ServeClient(url) as client:
        return client.predict(data, content_type)


def interval_coverage(url: str) -> str:
    """``80 % of faces``, from Serve's /model answer (its ``interval``), for the page's note."""
    health = serve_health(url)
    info = ((health.get("model") or {}).get("interval") or {}) if health.get("ok") else {}
    coverage = info.get("coverage")
    return f"{coverage:.0%} of faces" if isinstance(coverage, (int, float)) else "most faces"


@st.fragment(run_every=10)
def serve_status(url: str) -> None:
    """One line on whether Serve is up; refreshes by itself so recovery shows without a click."""
    health = serve_health(url)
    with st.container(key="serve-status"):
        if not health["ok"]:
            st.error(f"{health['error']} The page keeps working and uses Serve again as soon "
                     "as it is back.", icon="🔌")
        elif health["seconds"] > SLOW_HEALTH_S:
            st.warning(f"Serve at {url} is slow: its health check took {health['seconds']:.1f} s. "
                       "Results may take a while.", icon="🐢")
        else:
            model = health["model"]
            st.caption(f"Serve at {url} is up · model {model.get('name', '?')} "
                       f"{model.get('version', '')} · {health['seconds'] * 1000:.0f} ms")


# -- settings ------------------------------------------------------------------------------------


def sidebar() -> tuple[str | None, dict]:
    """The Serve URL (None when unusable) and the WebRTC configuration."""
    st.sidebar.header("Settings")
    raw_url = st.sidebar.text_input(
        "Serve URL", value=serve_url_from_env(), key="serve_url",
        help="Where the Serve API (`faceage up`, `serve run serve/config.yaml`) listens; "
             "defaults to $FACEAGE_SERVE_URL.")
    try:
        url: str | None = normalise_url(raw_url)
    except ValueError as exc:
        st.sidebar.error(str(exc))
        url = None
    use_ice = st.sidebar.toggle(
        "Use STUN/TURN servers", key="use_ice_servers",
        help="Off: the webcam connects directly (same machine or LAN), contacting no outside "
             "server. Turn on for deployments where the browser and this app are behind NAT.")
    ice_servers: list = []
    if use_ice:
        default = os.environ.get(ICE_SERVERS_ENV) or json.dumps(DEFAULT_ICE_SERVERS)
        text = st.sidebar.text_area("ICE servers (JSON list)", value=default, key="ice_servers",
                                    help=f"RTCIceServer objects; default from ${ICE_SERVERS_ENV}")
        try:
            ice_servers = json.loads(text)
            if not isinstance(ice_servers, list):
                raise ValueError("not a list")
        except ValueError as exc:
            st.sidebar.error(f"ICE servers: not a JSON list ({exc}); using none.")
            ice_servers = []
    # A list, even when empty: with None streamlit-webrtc fills in a public STUN server.
    return url, {"iceServers": ice_servers}


# -- image ---------------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]


def face_rows(faces: list[dict]) -> list[dict]:
    return [{"face": i + 1, "age": f"{f['age']:.1f}", "interval": f"({interval_text(f)})",
             "score": f"{f['score']:.3f}", "box": ", ".join(f"{v:.0f}" for v in f["box"])}
            for i, f in enumerate(faces)]


def show_photo(index: int, name: str, data: bytes, content_type: str, url: str) -> None:
    with st.container(border=True, key=f"photo-{index}"):
        try:
            result = predict_photo(url, data, content_type)
            photo = load_photo(data, name=name, reduce_to=DISPLAY_SIDE)
        except ServeError as exc:
            st.error(f"{name}: {exc}")
            return
        except ImageError as exc:
            st.error(f"{name}: {exc}")
            return
        faces = result["faces"]
        if faces:
            ages = ", ".join(f"{f['age']:.1f}" + (f" ({interval_text(f)})"
                                                  if f.get("age_interval") else "")
                             for f in faces)
            st.markdown(f"**{name}**: {len(faces)} face{'s' * (len(faces) != 1)}, "
                        f"age {ages}")
            if any(f.get("age_interval") for f in faces):
                st.caption("In brackets: the range the true age falls in for "
                           f"{interval_coverage(url)} like the model's validation faces.")
        else:
            st.info(f"{name}: no face found.")
        # Serve's boxes are in the original photo's pixels; drawn on a copy at most DISPLAY_SIDE.
        rgb, shrunk = shrink(photo.pixels, DISPLAY_SIDE)
        drawn_faces = scale_faces(faces, shrunk / photo.scale[0])
        annotated = draw_frame(rgb, drawn_faces)
        left, right = st.columns([3, 2])
        left.image(annotated, caption=name, width="stretch")
        with right:
            if faces:
                st.table(face_rows(faces), hide_index=True)
            stem = Path(name).stem or "photo"
            st.download_button("Download annotated image", encode_image(annotated, "PNG"),
                               file_name=f"{stem}-faceage.png", mime="image/png",
                               key=f"download-photo-{index}-{_digest(data)}", on_click="ignore")
            timings = result.get("timings_ms") or {}
            if timings:
                st.caption(" · ".join(f"{k} {v:.0f} ms" for k, v in timings.items()
                                      if isinstance(v, (int, float))))
        photo_corrections(url, f"photo-{_digest(data)}", rgb, drawn_faces, face_ids(result))


def photo_corrections(url: str, key: str, rgb, faces: list[dict], ids: list[str]) -> None:
    """A correction input per face, when Serve takes corrections and named the faces."""
    settings = corrections_settings(serve_health(url))
    if settings is None or not ids:
        return
    privacy_note(settings)
    for i, (face, face_id) in enumerate(zip(faces, ids, strict=True)):
        correction_form(url, f"{key}-{i}", face_id, f"face {i + 1}", face["age"],
                        face_thumbnail(rgb, face["box"]), on_forgotten=predict_photo.clear)


def image_tab(url: str | None) -> None:
    files = st.file_uploader("Photos", type=PHOTO_TYPES, accept_multiple_files=True,
                             key="photos", help="One or more photos; each face gets a box "
                             "and an age.")
    shots = []
    if st.toggle("Take a photo with the camera", key="use_camera_photo"):
        shot = st.camera_input("Camera", key="camera_photo")
        if shot is not None:
            shots.append(shot)
    uploads = list(files or []) + shots
    if not uploads:
        st.caption("Upload photos (or take one) to see the faces and their ages.")
        return
    if url is None:
        st.error("Set a valid Serve URL in the sidebar first.")
        return
    for index, upload in enumerate(uploads):
        # A browser that does not know the type (HEIC on some systems) sends none: Serve sniffs.
        show_photo(index, upload.name, upload.getvalue(),
                   upload.type or "application/octet-stream", url)


# -- video ---------------------------------------------------------------------------------------


def video_tab(url: str | None) -> None:
    upload = st.file_uploader("Video", type=VIDEO_TYPES, key="video",
                              help="Frames go to Serve; the annotated video plays here.")
    if upload is None:
        st.caption("Upload a video to get it back with faces, boxes and steady ages.")
        return
    data = upload.getvalue()
    digest = _digest(data)
    try:
        info = probe_video(data, upload.name)
    except VideoError as exc:
        st.error(str(exc))
        return
    length = f"{info.frames} frames" if info.frames else "unknown length"
    if info.duration_s:
        length += f", {info.duration_s:.1f} s"
    st.caption(f"{upload.name}: {info.width}x{info.height}, {info.fps:.1f} frames/s, {length}")
    left, right = st.columns(2)
    every_nth = int(left.number_input(
        "Analyse every Nth frame", min_value=1, max_value=1000,
        value=suggested_stride(info.frames), key=f"every-nth-{digest}",
        help="Long videos are sampled: frames in between keep the boxes and ages of the last "
             "analysed frame. 1 analyses every frame."))
    in_flight = int(right.slider(
        "Frames in flight", min_value=1, max_value=16, value=4, key="frames-in-flight",
        help="How many frames wait on Serve at once; more uses more replicas."))
    if info.frames:
        st.caption(f"{-(-info.frames // every_nth)} of {info.frames} frames go to Serve.")
    job = (digest, every_nth, url)
    if st.button("Annotate video", type="primary", key="annotate-video",
                 disabled=url is None):
        result = run_annotation(url, data, upload.name, every_nth, in_flight)
        if result is None:
            return
        st.session_state["video-result"] = (job, upload.name, result)
    stored = st.session_state.get("video-result")
    if stored and stored[0] == job:
        show_video_result(url, digest, *stored[1:])


def run_annotation(url: str, data: bytes, name: str, every_nth: int, in_flight: int):
    """``annotate_video`` with a progress bar; the ``VideoResult``, or None after saying on the
    page why it failed."""
    bar = st.progress(0.0, text="Sending frames to Serve…")
    last_update = [0.0]

    def progress(done: int, total: int | None, fps: float) -> None:
        now = time.monotonic()
        if now - last_update[0] < 0.2:
            return
        last_update[0] = now
        fraction = min(1.0, done / total) if total else 0.0
        bar.progress(fraction, text=f"{done}/{total or '?'} frames · {fps:.1f} frames/s")

    try:
        with ServeClient(url) as client:
            result = annotate_video(data, client, every_nth=every_nth, max_in_flight=in_flight,
                                    name=name, progress=progress)
    except (ServeError, VideoError) as exc:
        bar.empty()
        st.error(f"{name}: {exc}")
        return None
    except Exception as exc:  # a codec or container failure: a message, not a traceback
        LOGGER.exception("annotating %s failed", name)
        bar.empty()
        st.error(f"{name}: annotating the video failed ({type(exc).__name__}: {exc}).")
        return None
    bar.progress(1.0, text=f"{result.frames}/{result.frames} frames · "
                           f"{result.frames_per_second:.1f} frames/s")
    return result


def show_video_result(url: str | None, digest: str, name: str, result) -> None:
    """The annotated video, its download, the faces followed and their correction inputs."""
    with st.container(key="video-result"):
        st.success(f"{result.frames} frames ({result.analysed} analysed by Serve) in "
                   f"{result.seconds:.1f} s: {result.frames_per_second:.1f} frames/s.")
        if result.rejected_frames:
            st.warning(f"Serve rejected {result.rejected_frames} frames; they show the last "
                       "known faces.")
        st.video(result.mp4, format="video/mp4")
        st.download_button("Download annotated video", result.mp4,
                           file_name=f"{Path(name).stem}-faceage.mp4", mime="video/mp4",
                           key=f"download-video-{digest}", on_click="ignore")
        if result.faces:
            st.markdown("Faces followed across frames (smoothed age):")
            st.table([{k: f"{v:.1f}" if isinstance(v, float) else v for k, v in row.items()}
                      for row in result.faces], hide_index=True)
        else:
            st.info("No face found in the analysed frames.")
        settings = corrections_settings(serve_health(url)) if url else None
        if settings is not None and result.corrections:
            privacy_note(settings)
            st.caption("Each face is sent as it was in the frame where it was detected most "
                       "surely (its picture below).")
            for face in result.corrections:
                correction_form(url, f"video-{digest}-{face['track']}", face["face_id"],
                                f"face {face['track']}", face["age"], face["thumb"])


# -- webcam --------------------------------------------------------------------------------------


@st.fragment(run_every=1)
def live_stats(annotator: LiveAnnotator) -> None:
    stats = annotator.stats()
    with st.container(key="live-stats"):
        if stats["error"]:
            st.error(f"{stats['error']} The video keeps playing; ages come back when Serve does.")
        latency = f"{stats['latency_ms']:.0f} ms" if stats["latency_ms"] is not None else "–"
        ages = ", ".join(age_label(f, "–") for f in stats["faces"]) or "none"
        st.markdown(f"**Live**: {stats['fps']:.1f} frames/s · round trip {latency} · "
                    f"{stats['answers_per_s']:.1f} answers/s · faces: {len(stats['faces'])} · "
                    f"ages: {ages}")


def webcam_tab(url: str | None, rtc_configuration: dict) -> None:
    annotator: LiveAnnotator | None = st.session_state.get("live-annotator")
    if annotator is None:
        try:
            annotator = LiveAnnotator(url or serve_url_from_env())
        except ValueError as exc:  # a bad $FACEAGE_STREAM_IN_FLIGHT
            st.error(str(exc))
            return
        st.session_state["live-annotator"] = annotator
    if url is not None:
        annotator.set_serve_url(url)
    st.caption("Press START; each frame goes to Serve without holding the video up. Frames/s "
               "and round-trip latency are drawn on the video.")
    # See webrtc_guard.py: streamlit-webrtc 0.79 can stop the stream right after it connects.
    disarm_orphan_check(WEBCAM_KEY)
    try:
        context = webrtc_streamer(
            key=WEBCAM_KEY,
            mode=WebRtcMode.SENDRECV,
            rtc_configuration=rtc_configuration,
            media_stream_constraints={"video": True, "audio": False},
            video_frame_callback=annotator.on_frame,
            async_processing=True,
        )
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass
        LOGGER.exception("webrtc_streamer failed")
        st.error(f"The webcam component failed: {exc}. Reload the page to try again.")
        return
    if context.state.playing:
        live_stats(annotator)


# -- page ----------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="faceage", page_icon="🎂", layout="wide")
    url, rtc_configuration = sidebar()
    st.title("faceage")
    status_slot = st.container()
    tab_image, tab_video, tab_webcam = st.tabs(["Image", "Video", "Webcam"])
    # The webcam component is rendered first in every run, before anything slow or fallible
    # (even the Serve health check), so no run ends without it (see webrtc_guard.py).
    with tab_webcam:
        webcam_tab(url, rtc_configuration)
    if url is not None:
        with status_slot:
            serve_status(url)
    with tab_image:
        image_tab(url)
    with tab_video:
        video_tab(url)


if __name__ == "__main__":  # `streamlit run faceage/webapp/main.py` (what `faceage up` runs)
    main()
