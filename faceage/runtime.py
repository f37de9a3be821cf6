"""Process and Ray plumbing, written once: environment defaults, starting or joining Ray, free
ports, waits with deadlines, and stopping process trees.

The CLI, ``faceage.serving.local``, ``faceage up``, the benchmarks and the tests all use these;
none of them keeps a copy of its own. A ``ray start --head`` of our own is
``testkit.ray_head.RayHead`` (tests).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from faceage import CHECKOUT

# The source checkout faceage runs from, or None when it is an installed wheel.
REPO_ROOT: Path | None = CHECKOUT
LOOPBACK = "127.0.0.1"

# Set before ``import ray`` in every process that may start Ray:
# - no usage statistics leave the machine;
# - under ``uv run`` Ray would otherwise give every worker a fresh copy of the uv project
#   (a new .venv per worker); the environment the driver runs in already has everything.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    # Ray starts its workers at niceness 15, below every ordinary process: on a small machine
    # the Ray Train worker then yields the CPU to Ray's own daemons, the driver and anything
    # else running, and trains at half the speed of the same loop outside Ray (docs/benchmarks.md).
    # Read by a Ray head as it starts; a cluster started elsewhere keeps its own setting.
    "RAY_worker_niceness": "0",
}

T = TypeVar("T")


def apply_ray_env_defaults(env: dict[str, str] | None = None) -> dict[str, str]:
    """Put ``RAY_ENV_DEFAULTS`` into ``env`` (default: ``os.environ``) where not set; returns it."""
    target: Any = os.environ if env is None else env
    for key, value in RAY_ENV_DEFAULTS.items():
        target.setdefault(key, value)
    return target


def child_env(*, pythonpath: bool = True, ray_address: bool = True, **extra: str
              ) -> dict[str, str]:
    """The environment for a child process of ours: Ray defaults, unbuffered output, and, when
    faceage runs from a checkout, the checkout on PYTHONPATH (so a child, and the Ray workers it
    starts, import this faceage from any working directory even when it is not installed).

    ``pythonpath=False`` leaves PYTHONPATH as it is (a Ray head whose jobs must import from their
    uploaded working_dir, not from here); ``ray_address=False`` drops an inherited
    ``RAY_ADDRESS`` (a child that must start its own Ray, not join the one the caller names).
    """
    env = {**os.environ, **RAY_ENV_DEFAULTS, "PYTHONUNBUFFERED": "1"}
    if pythonpath and REPO_ROOT is not None:  # an installed faceage is importable as it is
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          os.environ.get("PYTHONPATH")]))
    if not ray_address:
        env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


# -- ports ---------------------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (another process may still take it later)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free TCP ports (all held until all are picked, so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# Below Linux's ephemeral range (32768-60999: what bind(0) and outgoing connections get) and above
# Ray's default worker ports (10002-19999): a port picked here is not taken by another Ray
# instance's port-0 processes, workers or connections in the moment before its owner binds it.
QUIET_PORTS = range(20000, 32768)


def quiet_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free ports from ``QUIET_PORTS``, for a process that needs them named
    up front (a port that must be known before the process binds it)."""
    import random

    picked: list[int] = []
    for port in random.sample(QUIET_PORTS, len(QUIET_PORTS)):
        if port_is_free(port, host):
            picked.append(port)
            if len(picked) == count:
                return picked
    raise OSError(f"no {count} free ports in {QUIET_PORTS}")


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on ``host:port`` (TIME_WAIT leftovers do not count).

    Other bind errors (a port below 1024 without the right, an address not on this machine)
    raise: they do not mean "in use" and the caller's message should not say so."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers bind: SO_REUSEADDR ignores TIME_WAIT leftovers, not live listeners.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


# -- waiting -------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], T], timeout: float, *, interval: float = 0.5,
               what: str = "the condition") -> T:
    """Call ``condition`` until it returns something truthy, and return that; ``TimeoutError``
    naming ``what`` after ``timeout`` seconds. Exceptions from ``condition`` propagate."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> bool:
    """True when ``url`` answers a 2xx; False when it cannot be reached or answers otherwise."""
    import urllib.error
    import urllib.request

    # Loopback only: never through an HTTP(S)_PROXY from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}),
                         timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


# -- stopping processes --------------------------------------------------------------------------


def stop_processes(procs: Iterable[Any], timeout: float = 10.0) -> list[Any]:
    """SIGTERM the ``psutil.Process`` objects in ``procs``, SIGKILL what is left after ``timeout``.

    psutil checks PID and start time, so a PID reused by an unrelated process is never hit.
    Returns what still ran after the SIGKILL wait (normally nothing).
    """
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running():
                p.terminate()
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=timeout)
    return alive


def process_tree(pid: int) -> list[Any]:
    """``pid`` and all its descendants as ``psutil.Process`` objects (empty if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_process_tree(pid: int, timeout: float = 10.0, *, include_root: bool = True) -> list[Any]:
    """Stop ``pid`` and its descendants (children first seen now): SIGTERM, then SIGKILL."""
    tree = process_tree(pid)
    if not include_root:
        tree = tree[1:]
    return stop_processes(tree, timeout)


def session_processes(session: int) -> list[Any]:
    """Every process whose session id is ``session`` (a child started with start_new_session)."""
    import psutil

    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == session:
                members.append(p)
        except (OSError, psutil.Error):
            continue
    return members


def stop_session(session: int, timeout: float = 10.0) -> list[Any]:
    """Stop everything left in the session ``session`` leads (its leader included)."""
    return stop_processes(session_processes(session), timeout)


# -- Ray -----------------------------------------------------------------------------------------


def start_ray(address: str | None = None, *, attempts: int = 4, **init_kwargs: Any):
    """``ray.init`` that joins ``address`` or starts a new local instance (never someone else's).

    ``address=None`` means ``"local"``: not ``ray.init()``'s default, which joins any cluster it
    finds on the machine, another user's or another test's too. A new local instance is retried
    when it fails to come up: on a loaded machine the raylet gives up waiting for its dashboard
    agent after a hard-coded 15 s (ray-project/ray#65983, seen with Ray 2.5x-2.60) and the node
    never starts, while the next try usually works. The half-started processes of a failed try
    are stopped before the next one.
    """
    import ray

    apply_ray_env_defaults()
    tries = attempts if address in (None, "local") else 1
    for attempt in range(1, tries + 1):
        before = {p.pid for p in process_tree(os.getpid())[1:]}
        try:
            return ray.init(address=address or "local", **init_kwargs)
        except Exception as exc:
            ray.shutdown()
            # The half-started node (GCS, raylet, dashboard, monitors) are our new children.
            stop_processes([p for p in process_tree(os.getpid())[1:] if p.pid not in before],
                           timeout=5)
            if attempt == tries:
                raise
            print(f"Ray did not start ({type(exc).__name__}: {exc}); trying again "
                  f"({attempt + 1}/{tries})", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while a ``Supervisor``'s process was still starting."""


class Supervisor:
    """SIGINT/SIGTERM for a process that starts services, then waits until told to stop, then
    tears them down (``faceage up``, ``python -m faceage.serving.local``).

    Until ``ready()`` a signal raises ``Interrupted`` in the main thread, abandoning the start;
    after it, a signal only asks ``wait`` to return. ``quiet()`` ignores both while tearing
    down (a late Ctrl-C must not cut the clean-up short), ``restore()`` puts back the handlers
    that were there before.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.is_ready = False
        self.stop_asked: str | None = None
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_asked = signal.Signals(signum).name
        if not self.is_ready:
            raise Interrupted(self.stop_asked)

    def install(self) -> None:
        """Take the signals back: starting Ray (``ray.init``) replaces SIGTERM's handler."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    def ready(self) -> None:
        """The start is done: from now on a signal asks ``wait`` to return."""
        self.is_ready = True
        self.install()

    def wait(self, failed: Callable[[], str | None] = lambda: None,
             interval: float = 0.5) -> str | None:
        """Block until a signal asks to stop (None) or ``failed()`` says what broke."""
        while self.stop_asked is None:
            problem = failed()
            if problem:
                return problem
            time.sleep(interval)
        return None

    def quiet(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
