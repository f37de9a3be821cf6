"""faceage in the browser: photos, videos and a live webcam, aged by the Serve endpoint.

    FACEAGE_SERVE_URL=http://127.0.0.1:8000 \
        streamlit run app/main.py --server.address 127.0.0.1 --browser.gatherUsageStats false

(app/main.py, in a checkout, runs this module's ``main``; ``faceage up`` runs this file.)
A thin client: every face and age comes from Serve over HTTP or WebSocket; this process never
imports torch or loads a model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import streamlit as st
from streamlit_webrtc import WebRtcMode, webrtc_streamer

from faceage.errors import ImageError
from faceage.inference.annotate import age_label, scale_faces  # (Pillow only)
from faceage.inference.images import load_photo  # (Pillow only; no torch)
from faceage.webapp.client import ServeError, normalise_url, serve_url_from_env
from faceage.webapp.corrections import (
    correction_form,
    corrections_settings,
    face_ids,
    privacy_note,
)
from faceage.webapp.draw import draw_frame, encode_image, face_thumbnail, interval_text, shrink
from faceage.webapp.live import LiveAnnotator
from faceage.webapp.serve_status import (
    interval_coverage,
    predict_photo,
    serve_health,
    serve_status,
    upload_digest,
)
from faceage.webapp.video_tab import video_tab
from faceage.webapp.webrtc_guard import disarm_orphan_check

PHOTO_TYPES = ["jpg", "jpeg", "png", "webp", "heic", "heif", "avif", "bmp", "gif", "tif", "tiff"]
# Photos are shown, drawn on and offered for download at most this long: a 12 MP phone photo
# would cost seconds to draw and encode, and the page shows it smaller anyway.
DISPLAY_SIDE = 1600
WEBCAM_KEY = "webcam"
ICE_SERVERS_ENV = "FACEAGE_ICE_SERVERS"
DEFAULT_ICE_SERVERS = [{"urls": ["stun:stun.l.google.com:19302"]}]
LOGGER = logging.getLogger("faceage.app")
if not LOGGER.handlers:  # Streamlit configures only its own loggers; ours go to stderr too
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(logging.INFO)


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
                               key=f"download-photo-{index}-{upload_digest(data)}",
                               on_click="ignore")
            timings = result.get("timings_ms") or {}
            if timings:
                st.caption(" · ".join(f"{k} {v:.0f} ms" for k, v in timings.items()
                                      if isinstance(v, (int, float))))
        photo_corrections(url, f"photo-{upload_digest(data)}", rgb, drawn_faces, face_ids(result))


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
