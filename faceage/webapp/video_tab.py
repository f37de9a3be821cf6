"""The page's video tab: an uploaded video sent to Serve frame by frame
(``faceage.webapp.video.annotate_video``) with a progress bar, then played back annotated, with
its download, the faces followed and their correction inputs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import streamlit as st

from faceage.webapp.client import ServeClient, ServeError
from faceage.webapp.corrections import correction_form, corrections_settings, privacy_note
from faceage.webapp.serve_status import serve_health, upload_digest
from faceage.webapp.video import VideoError, annotate_video, probe_video, suggested_stride

VIDEO_TYPES = ["mp4", "mov", "m4v", "webm", "mkv", "avi"]
LOGGER = logging.getLogger("faceage.app")  # its handler is set up by faceage.webapp.main


def video_tab(url: str | None) -> None:
    upload = st.file_uploader("Video", type=VIDEO_TYPES, key="video",
                              help="Frames go to Serve; the annotated video plays here.")
    if upload is None:
        st.caption("Upload a video to get it back with faces, boxes and steady ages.")
        return
    data = upload.getvalue()
    digest = upload_digest(data)
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
