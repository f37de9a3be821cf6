"""Work around a race in streamlit-webrtc 0.79's orphaned-context check (no site-packages patch).

``streamlit_webrtc.component._get_or_create_context`` (added by upstream PR #2478 for multi-page
apps) resets the context, and stops its worker, when Streamlit's
``session_info.script_run_count`` has grown by more than one since the component last rendered:
it takes that to mean the iframe was unmounted and remounted. But ``script_run_count`` is raised
on the event-loop thread when a run's ``script_finished`` message is *sent*, and the runtime
yields between sent messages. While WebRTC signals, the browser answers each run at once (SDP
offer, then ICE candidates, then ``playing``), so the next run's script thread often reads the
count before the previous run's ``script_finished`` went out. That run records a stale, one-too-low
count; one run later the count has "jumped" by two, the check fires, and the worker is stopped
just after ICE connected: the stream dies at random, more often on a loaded machine.

Our app renders the component in every run (it sits in a tab, filled first in the script), so
the iframe is never orphaned between runs and the check can only misfire. ``disarm_orphan_check``
clears the context's recorded run count just before ``webrtc_streamer`` runs; with ``None`` there
the check is skipped and the library records the current count again. Everything else (workers,
signalling, STOP/START) stays the library's. The private attribute itself is read and cleared
only in faceage.compat (with a canary in tests/test_compat.py); if a later streamlit-webrtc drops
it this is a no-op.
"""

from __future__ import annotations

import logging

import streamlit as st
from streamlit_webrtc.session_info import get_script_run_count, get_this_session_info

from faceage.compat import (
    forget_webrtc_rendered_run_count,
    is_webrtc_context,
    webrtc_rendered_run_count,
)

LOGGER = logging.getLogger("faceage.app.webrtc_guard")


def disarm_orphan_check(key: str) -> bool:
    """Skip streamlit-webrtc's run-count orphan check for ``key`` in this run; True if it did."""
    context = st.session_state.get(key)
    if not is_webrtc_context(context):
        return False
    last = webrtc_rendered_run_count(context)
    session = get_this_session_info()
    now = get_script_run_count(session) if session is not None else None
    if last is not None and now is not None and now > last + 1:
        # Logged so the workaround's effect can be counted: the library would have stopped the
        # worker here although the component was rendered in every run.
        LOGGER.info("kept webrtc context %r: its orphan check would have reset it "
                    "(run count %d, last rendered at %d)", key, now, last)
    forget_webrtc_rendered_run_count(context)
    return True
