"""HTTP and WebSocket client of the faceage Serve API, with errors a person can read."""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

SERVE_URL_ENV = "FACEAGE_SERVE_URL"
DEFAULT_SERVE_URL = "http://127.0.0.1:8000"
# Connect, read (seconds): a refused or unrouted address fails fast; a busy CPU replica may take a
# while to answer one photo.
DEFAULT_TIMEOUT = (3.05, 60.0)
SLOW_HEALTH_S = 1.0
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
# Serve sheds load with a quick 503 and Retry-After (faceage/serving/app.py); a photo or a video
# frame is worth a few seconds' wait, so predict retries that many times, waiting at most that
# long each.
PREDICT_RETRIES = 4
MAX_RETRY_WAIT_S = 2.0


class ServeError(Exception):
    """A request to Serve that did not give a result; ``kind`` says whose problem it is.

    kinds: ``unreachable`` (nothing listening), ``timeout`` (no answer in time), ``overloaded``
    (503), ``rejected`` (4xx: the input), ``server`` (other 5xx), ``protocol`` (not our API).
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status


class ShedLoadRetry(Retry):
    """urllib3's Retry, honouring Retry-After only on 503 and never waiting over
    ``MAX_RETRY_WAIT_S`` (a 413 or 429 with Retry-After is the input's problem, not retried).

    A 500 is retried **once**: the Serve proxy answers a plain 500 for each request an Ingress
    replica held when it died (a model replica's death is a 503 from the Ingress), and Serve
    routes the retry to a live or restarted Ingress (docs/serve.md, "Replica deaths"). The
    application itself answers no 500 on purpose, so a bug's 500 costs one more request."""

    RETRY_AFTER_STATUS_CODES = frozenset({503})

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if status_code == 500:
            return (method.upper() in (self.allowed_methods or ())
                    and not any(h.status == 500 for h in self.history)
                    and bool(self.total is None or self.total > 0))
        return super().is_retry(method, status_code, has_retry_after)

    def get_retry_after(self, response) -> float | None:
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, MAX_RETRY_WAIT_S)


def predict_retry(retries: int = PREDICT_RETRIES) -> Retry:
    """Retry a 503 ``retries`` times after its Retry-After (else a backoff from 0.25 s, capped)
    and a 500 once (``ShedLoadRetry``); POST included, since predicting is idempotent. Nothing
    else is retried: a refused connection or a read timeout is reported at once, and the last
    answer is returned, not raised."""
    return ShedLoadRetry(total=retries, connect=0, read=False, other=0, status=retries,
                         status_forcelist=(503,), allowed_methods=frozenset({"GET", "POST"}),
                         respect_retry_after_header=True, backoff_factor=0.25,
                         backoff_max=MAX_RETRY_WAIT_S, raise_on_status=False)


def serve_url_from_env() -> str:
    """The Serve base URL from ``$FACEAGE_SERVE_URL``, else http://127.0.0.1:8000."""
    return normalise_url(os.environ.get(SERVE_URL_ENV) or DEFAULT_SERVE_URL)


def normalise_url(url: str) -> str:
    """``url`` with a scheme and without a trailing slash; raises ValueError when unusable."""
    url = (url or "").strip()
    if not url:
        raise ValueError("the Serve URL is empty; use e.g. http://127.0.0.1:8000")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL; use e.g. http://127.0.0.1:8000")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def websocket_url(base_url: str, path: str = "/stream") -> str:
    """The ws(s):// URL of ``path`` on the Serve at ``base_url``."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def error_message(response: requests.Response) -> str:
    """The message in a Serve error body (``error``, ``detail`` or ``message``), else the text."""
    try:
        body = response.json()
    except ValueError:
        return (response.text or response.reason or "").strip()[:300]
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message") or json.dumps(value)
            if isinstance(value, list):  # FastAPI validation errors
                value = "; ".join(str(v.get("msg", v)) if isinstance(v, dict) else str(v)
                                  for v in value)
            if value:
                return str(value)[:300]
    return json.dumps(body)[:300]


def _check_result(body: Any, url: str) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("faces"), list):
        raise ServeError(f"{url} answered, but not with a faceage result (no 'faces' list); "
                         "is the Serve URL right?", kind="protocol")
    return body


class ServeClient:
    """Calls one Serve endpoint: ``predict`` for photos and frames, ``correct`` for
    corrections, ``health`` and ``model``.

    ``predict`` rides out Serve's load shedding and a lost Ingress (``predict_retry``: ``retries``
    times on a 503, once on a 500);
    ``health`` and ``model`` are not retried, so a page learns at once that Serve is not ready.
    """

    def __init__(self, base_url: str, timeout: tuple[float, float] = DEFAULT_TIMEOUT,
                 retries: int = PREDICT_RETRIES):
        self.base_url = normalise_url(base_url)
        self.timeout = timeout
        self.session = requests.Session()
        # /predict and /predict/frames only (the longest mounted prefix wins).
        self.session.mount(self.base_url + "/predict",
                           HTTPAdapter(max_retries=predict_retry(retries)))
        # Loopback traffic must never go through an HTTP(S)_PROXY from the environment.
        if urlsplit(self.base_url).hostname in LOOPBACK_HOSTS:
            self.session.trust_env = False

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, timeout=None, **kw) -> requests.Response:
        url = self.base_url + path
        try:
            response = self.session.request(method, url, timeout=timeout or self.timeout, **kw)
        except requests.Timeout:
            raise ServeError(f"Serve at {self.base_url} did not answer in time; it is busy or "
                             "stuck. Try again, or check its replicas in the Ray dashboard.",
                             kind="timeout") from None
        except requests.ConnectionError:
            raise ServeError(f"Cannot reach Serve at {self.base_url}. Start it with `faceage "
                             "up` (or `serve run serve/config.yaml` in a checkout), or fix the "
                             "Serve URL in the sidebar.",
                             kind="unreachable") from None
        if response.status_code == 503:
            raise ServeError(f"Serve at {self.base_url} is overloaded (503): "
                             f"{error_message(response)}. Try again in a moment.",
                             kind="overloaded", status=503)
        if 400 <= response.status_code < 500:
            raise ServeError(f"Serve rejected the input ({response.status_code}): "
                             f"{error_message(response)}", kind="rejected",
                             status=response.status_code)
        if response.status_code >= 500:
            raise ServeError(f"Serve failed ({response.status_code}): {error_message(response)}",
                             kind="server", status=response.status_code)
        return response

    def _json(self, response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ServeError(f"{response.url} did not answer with JSON; is the Serve URL right?",
                             kind="protocol") from None

    def predict(self, image: bytes, content_type: str = "image/jpeg") -> dict:
        """The faces in one encoded image (JPEG, PNG, ...): the ``POST /predict`` result.

        A 503 is retried after its Retry-After (see ``predict_retry``); the last one raises
        ``ServeError`` of kind ``overloaded``.
        """
        response = self._request("POST", "/predict", data=image,
                                 headers={"Content-Type": content_type})
        return _check_result(self._json(response), response.url)

    def correct(self, face_id: str, age: float) -> dict:
        """``POST /corrections``: store ``age`` as the true age of the face ``face_id`` names
        (an id from a /predict answer's ``corrections.face_ids``). Not retried: a correction is
        sent once; a 404 (corrections off, or the face forgotten) raises ``ServeError``."""
        response = self._request("POST", "/corrections", json={"face_id": face_id, "age": age})
        body = self._json(response)
        if not isinstance(body, dict) or "id" not in body:
            raise ServeError(f"{response.url} answered, but not with a stored correction",
                             kind="protocol")
        return body

    def health(self, timeout: float = 3.0) -> float:
        """Seconds ``GET /healthz`` took; raises ServeError when Serve is down or unhealthy."""
        start = time.perf_counter()
        self._request("GET", "/healthz", timeout=(min(timeout, 3.05), timeout))
        return time.perf_counter() - start

    def model(self, timeout: float = 5.0) -> dict:
        """``GET /model``: metadata of the loaded model (at least ``name`` and ``version``)."""
        body = self._json(self._request("GET", "/model", timeout=(3.05, timeout)))
        return body if isinstance(body, dict) else {"name": str(body)}


class StreamClient:
    """One WebSocket to ``/stream``: send JPEG frames, get their results in order.

    ``predict`` sends a frame and waits for its answer. To keep several frames in flight (the
    server works on up to ``stream_in_flight`` of a socket at once), ``send`` them and
    ``receive`` the answers, which come back in the order the frames went out."""

    def __init__(self, base_url: str, open_timeout: float = 5.0):
        self.url = websocket_url(normalise_url(base_url))
        self.open_timeout = open_timeout
        self._ws: ClientConnection | None = None

    def _connect(self) -> ClientConnection:
        if self._ws is None:
            try:
                # Loopback frames must never go through a proxy named in the environment.
                loopback = urlsplit(self.url).hostname in LOOPBACK_HOSTS
                # Entered as websockets asks (a bare connect() is deprecated since 17.1); the
                # socket outlives this call and close() closes it.
                self._ws = connect(self.url, open_timeout=self.open_timeout, max_size=2 ** 22,
                                   compression=None,
                                   proxy=None if loopback else True).__enter__()
            except (OSError, TimeoutError, WebSocketException) as exc:
                raise ServeError(f"Cannot open the Serve stream at {self.url} ({exc}). Is Serve "
                                 "running at that address?", kind="unreachable") from None
        return self._ws

    @property
    def connected(self) -> bool:
        """Whether the socket is open (a failure closes it; the next ``send`` reopens it)."""
        return self._ws is not None

    def predict(self, jpeg: bytes, timeout: float = 10.0) -> dict:
        """The result for one JPEG frame; on any failure the socket is closed and reopened later."""
        self.send(jpeg)
        return self.receive(timeout)

    def send(self, jpeg: bytes) -> None:
        """Send one frame (opening the socket if needed); its answer comes from ``receive``."""
        ws = self._connect()
        try:
            ws.send(jpeg)
        except (OSError, WebSocketException) as exc:
            self.close()
            raise ServeError(f"The Serve stream at {self.url} closed ({exc})",
                             kind="unreachable") from None

    def receive(self, timeout: float = 10.0, *, poll: bool = False) -> dict | None:
        """The next answer, for the oldest frame sent and not yet answered. ``poll``: None when
        none arrives within ``timeout`` (the socket stays open); otherwise waiting that long is
        an error and closes the socket."""
        if self._ws is None:
            raise ServeError(f"No frame is in flight on {self.url}", kind="protocol")
        try:
            message = self._ws.recv(timeout=timeout)
        except TimeoutError:
            if poll:
                return None
            self.close()
            raise ServeError(f"Serve did not answer a frame within {timeout:.0f} s",
                             kind="timeout") from None
        except (OSError, WebSocketException) as exc:
            self.close()
            raise ServeError(f"The Serve stream at {self.url} closed ({exc})",
                             kind="unreachable") from None
        try:
            body = json.loads(message)
        except ValueError:
            self.close()
            raise ServeError(f"{self.url} sent a message that is not JSON",
                             kind="protocol") from None
        if isinstance(body, dict) and "faces" not in body and ("error" in body
                                                               or "detail" in body):
            status = body.get("status") or body.get("code")
            kind = "overloaded" if status == 503 else "rejected"
            raise ServeError(f"Serve rejected a frame: {body.get('error') or body.get('detail')}",
                             kind=kind, status=status if isinstance(status, int) else None)
        return _check_result(body, self.url)

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # closing a broken socket must not raise
                pass
            self._ws = None
