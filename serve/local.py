"""Run serve/config.yaml on a private Ray instance of its own, with overrides; stop it cleanly.

    python -m serve.local --port 0 --set args.model_path=/tmp/m.pt \\
        --set deployments.Detector.num_replicas=1

Unlike ``serve run``, it never joins a Ray cluster already running on the machine (another
user's, or a test's), picks free ports when asked, and takes down everything it started on
SIGINT/SIGTERM. Tests and ``bench/serve_load.py`` use ``LocalServe``, which runs this as a child
process and waits until the API answers ``/healthz``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "serve" / "config.yaml"
READY = "faceage serve ready:"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_overrides(config: dict, overrides: dict[str, Any], app_name: str | None = None) -> dict:
    """``config`` with dotted overrides: ``args.X``, ``deployments.NAME.X``, ``http_options.X``.

    ``args`` and ``deployments`` address the application (the first, or ``app_name``).
    """
    out = copy.deepcopy(config)
    apps = out["applications"]
    app = next((a for a in apps if a["name"] == app_name), None) if app_name else apps[0]
    if app is None:
        raise KeyError(f"no application {app_name!r} in the config")
    for dotted, value in overrides.items():
        head, *rest = dotted.split(".")
        if head == "http_options":
            target = out.setdefault("http_options", {})
        elif head == "args":
            target = app.setdefault("args", {})
        elif head == "deployments" and rest:
            name, *rest = rest
            deployments = app.setdefault("deployments", [])
            target = next((d for d in deployments if d["name"] == name), None)
            if target is None:
                target = {"name": name}
                deployments.append(target)
        else:
            raise KeyError(f"override {dotted!r}: start with args., deployments.NAME. or "
                           "http_options.")
        if not rest:
            raise KeyError(f"override {dotted!r} names no field")
        for key in rest[:-1]:
            target = target.setdefault(key, {})
        target[rest[-1]] = value
    return out


def _wait_healthy(url: str, deadline: float, app_name: str) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"deploying {app_name} failed: {status.message}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url}/healthz did not answer 200 in time")


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()] if os.path.isdir("/proc") else []


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def kill_children() -> None:
    """SIGKILL this process's children (Linux): what a failed ``ray.init`` leaves running."""
    me = os.getpid()
    _kill([pid for pid in _pids() if _parent_pid(pid) == me])


def kill_session(session: int) -> None:
    """SIGKILL every process left in session ``session`` (Linux), its leader included."""
    members = []
    for pid in _pids():
        try:
            if os.getsid(pid) == session:
                members.append(pid)
        except OSError:
            continue
    _kill(members)


def start_ray(num_cpus: float, init: dict[str, Any], attempts: int = 4):
    """A new local Ray instance (never someone else's: address="local"), retried on a slow start.

    On a loaded machine the raylet can give up waiting for its dashboard agent to start (15 s,
    hard-coded: ray-project/ray#65983) and the node never comes up; another try often succeeds.
    """
    import ray

    for attempt in range(1, attempts + 1):
        try:
            return ray.init(address="local", num_cpus=num_cpus, namespace="serve",
                            log_to_driver=False, **init)
        except Exception as exc:
            ray.shutdown()
            kill_children()  # the half-started node: GCS, raylet, dashboard, monitors
            if attempt == attempts:
                raise
            print(f"Ray did not start ({exc}); trying again", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.local", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--port", type=int, help="HTTP port (0: a free one; default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. args.model_path=m.pt or deployments.Detector."
                        "num_replicas=1 (VALUE is YAML)")
    p.add_argument("--num-cpus", type=float, default=2)
    p.add_argument("--dashboard-port", type=int,
                   help="start the Ray dashboard on this port (0: a free one)")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus metrics endpoint port (0: a free one)")
    p.add_argument("--temp-dir", help="Ray's session folder (default: Ray's)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for /healthz")
    p.add_argument("--address", help="deploy on this running Ray cluster (e.g. $RAY_ADDRESS) "
                                      "instead of starting one; on exit only the application "
                                      "is removed (and Serve, if this process started it)")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Under `uv run` Ray would give every worker a fresh copy of the uv project.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Serve replaces a proxy that does not answer its readiness check in 5 s; on a busy machine
    # its first start can take longer, and start-up then fails. Replicas inherit these.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: use KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    if args.port is not None:
        overrides["http_options.port"] = args.port or free_port()
    config = apply_overrides(yaml.safe_load(Path(args.config).read_text()), overrides)

    import ray
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    init: dict[str, Any] = {"include_dashboard": args.dashboard_port is not None}
    if args.dashboard_port is not None:
        init.update(dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port or free_port())
    if args.metrics_port is not None:
        init["_metrics_export_port"] = args.metrics_port or free_port()
    if args.temp_dir:
        init["_temp_dir"] = args.temp_dir
    stop = threading.Event()

    def on_signal(*_):
        if not stop.is_set():
            stop.set()
            if not ready.is_set():
                raise KeyboardInterrupt  # abandon start-up; `finally` below cleans up

    ready = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    app_name = schema.applications[0].name
    try:
        if args.address:
            context = ray.init(address=args.address, namespace="serve", log_to_driver=False)
            serve_was_running = _prepare_shared_serve(schema, app_name)
        else:
            context = start_ray(args.num_cpus, init)
            serve_was_running = False
    except KeyboardInterrupt:
        ray.shutdown()
        kill_children()
        return 130
    except RuntimeError as exc:  # the cluster's Serve already runs an application of this name
        print(f"error: {exc}", file=sys.stderr, flush=True)
        ray.shutdown()
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):  # ray.init installs its own SIGTERM handler
        signal.signal(sig, on_signal)
    code = 0
    try:
        # What `serve run CONFIG` does: start Serve with the config's proxy options, then hand
        # the whole config to the controller, which applies per-deployment settings.
        client = serve_start(http_options=schema.http_options.model_dump(),
                             proxy_location=schema.proxy_location,
                             controller_options=schema.controller_options)
        http_options = client.http_config  # a Serve already running keeps its own
        client.deploy_apps(schema, _blocking=False)
        host = http_options.host
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http_options.port}"
        _wait_healthy(url, time.monotonic() + args.timeout, app_name)
        info = {"url": url, "pid": os.getpid(), "gcs_address": context.address_info["gcs_address"]}
        if (args.dashboard_port is not None or args.address) and context.dashboard_url:
            info["dashboard"] = f"http://{context.dashboard_url}"
        if "_metrics_export_port" in init:
            info["metrics"] = f"http://127.0.0.1:{init['_metrics_export_port']}/metrics"
        ready.set()
        print(f"{READY} {json.dumps(info)}", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        from ray import serve

        try:
            if serve_was_running:
                serve.delete(app_name)  # the cluster's other applications keep running
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return code


def _prepare_shared_serve(schema, app_name: str) -> bool:
    """Ready ``schema`` for a cluster this process did not start; True if Serve already runs there.

    Deploying a config replaces every application, so the cluster's other applications are put
    into ``schema``; its replicas find ``serve.app`` through PYTHONPATH (this checkout).
    """
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    ours = schema.applications[0]
    runtime_env = dict(ours.runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.setdefault("PYTHONPATH", str(REPO_ROOT))
    ours.runtime_env = {**runtime_env, "env_vars": env_vars}
    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    from ray import serve
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**serve.context._connect().get_serve_details())
    if app_name in details.applications:
        raise RuntimeError(f"Serve on this cluster already runs an application {app_name!r}; "
                           "use it, or remove it first (serve delete / serve shutdown)")
    others = [app.deployed_app_config for app in details.applications.values()
              if app.deployed_app_config is not None]
    schema.applications = others + schema.applications
    return True


class LocalServe:
    """``python -m serve.local`` as a child process: ``with LocalServe(...) as s: s.url``."""

    def __init__(self, overrides: dict[str, Any] | None = None, *, config: str | Path | None = None,
                 num_cpus: float = 2, port: int = 0, dashboard_port: int | None = None,
                 metrics_port: int | None = None, timeout: float = 600,
                 log_path: str | Path | None = None, address: str | None = None):
        self.overrides = dict(overrides or {})
        self.config = Path(config or DEFAULT_CONFIG)
        self.num_cpus, self.port, self.timeout = num_cpus, port, timeout
        self.dashboard_port, self.metrics_port = dashboard_port, metrics_port
        self.log_path = Path(log_path) if log_path else None
        self.address = address
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self._temp_dir: str | None = None
        self._log = None

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> LocalServe:
        # A short path: Ray's Unix sockets live under it and their paths must stay < 108 bytes.
        self._temp_dir = tempfile.mkdtemp(prefix="faceage-ray-", dir="/tmp")
        cmd = [sys.executable, "-m", "serve.local", "--config", str(self.config),
               "--port", str(self.port), "--num-cpus", str(self.num_cpus),
               "--timeout", str(self.timeout), "--temp-dir", self._temp_dir]
        for key, value in self.overrides.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        if self.dashboard_port is not None:
            cmd += ["--dashboard-port", str(self.dashboard_port)]
        if self.metrics_port is not None:
            cmd += ["--metrics-port", str(self.metrics_port)]
        if self.address:
            cmd += ["--address", self.address]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        env.pop("RAY_ADDRESS", None)
        log_path = self.log_path or Path(self._temp_dir) / "serve-local.log"
        self._log = open(log_path, "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, start_new_session=True)
        deadline = time.monotonic() + self.timeout + 60
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:  # the child exited before it was ready
                break
            if line.startswith(READY):
                self.info = json.loads(line[len(READY):])
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self._log.flush()
        self._log.seek(0)
        tail = self._log.read()[-4000:]
        self.stop()
        raise RuntimeError(f"serve/config.yaml did not come up ({line.strip()}):\n{tail}")

    def _drain(self) -> None:
        for _ in self.proc.stdout:  # keep the pipe from filling up
            pass

    def stop(self, timeout: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            # Anything of its Ray instance still running is in the session it leads.
            kill_session(self.proc.pid)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._temp_dir is not None:
            import shutil

            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> LocalServe:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
