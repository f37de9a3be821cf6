"""Correction inputs under the results: corrections sent to Serve's ``POST /corrections``.

Shown only when Serve takes corrections (its /model answer says ``corrections.enabled``, which it
does when started with a corrections folder) and the answer named its faces
(``corrections.face_ids``).
The image tab offers one per face; the video tab one per face followed across frames, sent as
that face in the frame where it was detected most surely. The live webcam has none: its frames
go over /stream, which names no faces (a correction there would be of a moving target).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import streamlit as st

from faceage.config import MAX_AGE
from faceage.webapp.client import ServeClient, ServeError


def corrections_settings(health: dict) -> dict | None:
    """Serve's /model ``corrections`` block when it takes corrections, else None."""
    info = (health.get("model") or {}).get("corrections") if health.get("ok") else None
    return info if isinstance(info, dict) and info.get("enabled") else None


def face_ids(result: dict) -> list[str]:
    """The face ids of a /predict answer, one per face ([] when it named none)."""
    ids = (result.get("corrections") or {}).get("face_ids") or []
    return ids if len(ids) == len(result.get("faces") or []) else []


def privacy_note(settings: dict) -> None:
    hours = float(settings.get("keep_s") or 0) / 3600
    st.caption(
        "**Know the age?** Send it and it becomes training data. The server stores, in "
        f"`{settings.get('dir', '?')}`: the face's aligned crop (a small JPEG, not your photo), "
        "the age you give, the model's answer and version, and the time (UTC). Nothing is "
        f"stored unless you press Send; a face can be corrected for {hours:.0f} h after its "
        "answer. The server's operator can delete entries (`faceage corrections delete`).")


def correction_form(url: str, key: str, face_id: str, label: str, model_age: float,
                    thumb: np.ndarray | None = None,
                    on_forgotten: Callable[[], None] | None = None) -> None:
    """One face's correction: its age input and Send button, and what came of the last send.

    ``on_forgotten``: called when Serve no longer knows the face (404), e.g. to drop a cached
    answer so the next run asks again."""
    state_key = f"correction-{key}"
    with st.container(key=f"correct-{key}"):
        with st.form(key=f"form-{key}", border=False, enter_to_submit=True):
            pic, field, button = st.columns([1, 3, 1], vertical_alignment="bottom")
            if thumb is not None:
                pic.image(thumb, caption=label)
            age = field.number_input(f"Correct the age of {label}", min_value=0,
                                     max_value=MAX_AGE,
                                     value=None, step=1, placeholder=f"model: {model_age:.0f}",
                                     key=f"age-{key}")
            sent = button.form_submit_button("Send")
        if sent:
            st.session_state[state_key] = send_correction(url, face_id, age, label, model_age,
                                                          on_forgotten)
        outcome = st.session_state.get(state_key)
        if outcome:
            (st.success if outcome[0] == "ok" else st.error)(outcome[1])


def send_correction(url: str, face_id: str, age: float | None, label: str, model_age: float,
                    on_forgotten: Callable[[], None] | None = None) -> tuple[str, str]:
    """``("ok" | "error", message)`` for one correction sent to Serve."""
    if age is None:
        return "error", f"Type the correct age of {label} first."
    try:
        with ServeClient(url) as client:
            stored: dict[str, Any] = client.correct(face_id, float(age))
    except ServeError as exc:
        if exc.status != 404:
            return "error", str(exc)
        if on_forgotten is None:
            return "error", f"{exc} Annotate the video again to correct its faces."
        on_forgotten()  # the next run asks Serve again, for fresh face ids
        return "error", f"{exc} The page has asked Serve again: press Send once more."
    again = " (it replaces the one sent before)" if stored.get("replaced") else ""
    return "ok", (f"Stored{again}: {label} is {float(age):g}; the model said {model_age:.1f}. "
                  f"Entry {stored['id']}. Thank you!")
