"""``LocalServe``: ``python -m faceage.serving.local`` as a child process, for tests,
benchmarks and ``faceage up``; and what the two sides share, the default config and the line
the child prints once its API answers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from faceage import bundled_path
from faceage.runtime import REPO_ROOT, child_env, process_tree, stop_session

DEFAULT_CONFIG = bundled_path("serve/config.yaml")
READY = "faceage serve ready:"


class LocalServe:
    """``python -m faceage.serving.local`` as a child process:
    ``with LocalServe(...) as s: s.url``."""

    def __init__(self, overrides: dict[str, Any] | None = None, *, config: str | Path | None = None,
                 num_cpus: float = 2, port: int = 0, dashboard_port: int | None = None,
                 metrics_port: int | None = None, timeout: float = 600,
                 log_path: str | Path | None = None, address: str | None = None,
                 env: dict[str, str] | None = None):
        """``env``: more environment variables for the child and the Ray instance it starts
        (Serve's own switches, such as ``RAY_SERVE_THROUGHPUT_OPTIMIZED``, are read there)."""
        self.overrides = dict(overrides or {})
        self.env = dict(env or {})
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

    def replica_processes(self, deployment: str, app_name: str = "faceage") -> list[Any]:
        """The worker processes (``psutil.Process``) of ``deployment``'s replicas, by the title
        Ray gives them (``ray::SERVE_REPLICA::...:ServeReplica:<app>:<deployment>[.method]``)."""
        import psutil

        found = []
        for proc in process_tree(self.pid)[1:]:
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::") and f"ServeReplica:{app_name}:{deployment}" in title:
                found.append(proc)
        return found

    def ready_replicas(self, deployment: str, app_name: str = "faceage") -> list[Any]:
        """``replica_processes`` past their constructor (Ray drops ``.__init__`` from the
        title then)."""
        import psutil

        out = []
        for proc in self.replica_processes(deployment, app_name):
            try:
                if "__init__" not in " ".join(proc.cmdline()):
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def start(self) -> LocalServe:
        # A short path: Ray's Unix sockets live under it and their paths must stay < 108 bytes.
        self._temp_dir = tempfile.mkdtemp(prefix="faceage-ray-", dir="/tmp")
        cmd = [sys.executable, "-m", "faceage.serving.local", "--config", str(self.config),
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
        env = child_env(ray_address=False, **self.env)
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
        raise RuntimeError(f"{self.config} did not come up ({line.strip()}):\n{tail}")

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
            stop_session(self.proc.pid, timeout=10)
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
