"""Serve as the page sees it outside the webcam: its health (cached 2 s) and the status line
that refreshes itself, a photo's prediction (cached per upload), the interval's coverage for the
notes, and ``upload_digest``, the short hash that keys an upload's widgets."""

from __future__ import annotations

import hashlib

import streamlit as st

from faceage.webapp.client import ServeClient, ServeError

SLOW_HEALTH_S = 1.5


def upload_digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]


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
