"""``RayHead``: a ``ray start --head`` of our own with token auth, for tests that need a real
cluster address (``ray job submit``, ``faceage up`` joining ``$RAY_ADDRESS``), and
``diagnose_ray_logs``, which says in words why a Ray start or job failed.

Plumbing like ``faceage.runtime``, whose ports, waits and process stoppers it uses.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from faceage.runtime import (
    child_env,
    http_ok,
    process_tree,
    quiet_ports,
    session_processes,
    stop_processes,
    wait_until,
)

# What `ray start` prints (Ray 2.60, ray/scripts/scripts.py `start`): the address other nodes
# join with, and the one for `ray job submit`.
_GCS_LINE = re.compile(r"ray start --address='([^']+)'")
_DASHBOARD_LINE = re.compile(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'")
# What Ray's logs say when a port was taken, when token auth failed, and when the raylet gave up
# waiting for an agent's port file (ray-project/ray#65983).
_PORT_TAKEN = re.compile(r"address already in use|already occupied|failed to bind|errno 98",
                         re.I)
_AUTH_FAILED = re.compile(r"invalid authentication token|unauthenticated|401 unauthorized", re.I)
_AGENT_DEADLINE = re.compile(r"timed out waiting for file|node timed out during startup", re.I)
# The logs of the processes whose ports matter: the dashboard's and the autoscaler monitor's own
# metrics servers use fixed ports (44227, 44217), clash with every other Ray on the machine, and
# carry on without them, so their logs are left out.
_CRITICAL_LOGS = ("raylet", "gcs_server", "runtime_env_agent", "dashboard_agent",
                  "ray_client_server", "python-core-driver", "job-driver")


def diagnose_ray_logs(*texts: str, session_dir: Path | None = None, limit: int = 6) -> str:
    """Why a Ray start or job failed, in words: a port taken, token auth refused, or the raylet's
    start-up deadline; with the log lines that say so (from ``texts`` and ``session_dir/logs``).
    Empty when none of these shows."""
    sources = [("output", t) for t in texts]
    logs = session_dir / "logs" if session_dir else None
    if logs and logs.is_dir():
        for f in sorted(logs.glob("*")):
            if (f.is_file() and f.suffix in (".log", ".out", ".err")
                    and f.name.startswith(_CRITICAL_LOGS)):
                with f.open("rb") as fh:
                    fh.seek(max(0, f.stat().st_size - 200_000))
                    sources.append((f.name, fh.read().decode(errors="replace")))
    found: dict[str, list[str]] = {}
    for what, pattern in (("a port Ray needed was taken", _PORT_TAKEN),
                          ("token authentication was refused", _AUTH_FAILED),
                          ("the raylet gave up waiting for an agent (ray-project/ray#65983)",
                           _AGENT_DEADLINE)):
        lines = [f"{name}: {line.strip()[:300]}" for name, text in sources
                 for line in text.splitlines() if pattern.search(line)]
        if lines:
            found[what] = lines[:limit]
    return "\n".join(f"{what}:\n  " + "\n  ".join(lines) for what, lines in found.items())


class RayHead:
    """``ray start --head --block`` of our own, with token auth, for what needs a real cluster
    address (``ray job submit``, ``faceage up`` with ``RAY_ADDRESS``): ``with RayHead() as head``.

    Ports picked with ``free_ports`` and released before ``ray start`` binds them can be taken
    in between by another Ray instance on the machine (its port-0 processes get the same
    ephemeral ports); a raylet whose runtime-env agent lost its port then asks *that* instance's
    agent, which refuses our token (``403 Invalid authentication token`` in a job's runtime-env
    setup, seen in CI). So Ray picks its own ports where it can (port 0: GCS, dashboard, node
    and object managers, agent HTTP, metrics export; read back from what ``ray start`` prints).
    Three are named up front from ``QUIET_PORTS``, where no port-0 process lands: Ray Client's
    server takes no 0, and for the dashboard agent's gRPC port and the runtime-env agent's a 0
    makes the raylet wait for their port files with a hard-coded 15 s deadline (Ray 2.60,
    ray-project/ray#65983) that a loaded machine misses. A clash that still happens shows in
    the agents' logs and is retried, as is a missed start-up deadline; token auth refused is not.
    """

    def __init__(self, *, num_cpus: int = 2, dashboard: bool = False,
                 log_dir: str | Path | None = None, timeout: float = 300, attempts: int = 3):
        self.num_cpus, self.dashboard, self.timeout, self.attempts = (num_cpus, dashboard,
                                                                      timeout, attempts)
        self.log_dir = Path(log_dir) if log_dir else None
        self.token = secrets.token_hex(16)
        bin_dir = Path(sys.executable).parent
        self.ray = str(bin_dir / "ray")
        # Its jobs import from their uploaded working_dir, so PYTHONPATH stays as it is; `python`
        # in a job's entrypoint is this environment's.
        # RAY_gcs_server_port_wait_time_s: how long `ray start` waits for a port-0 GCS to
        # report its port (30 s by default; ray/_private/node.py start_gcs_server).
        self.env = child_env(pythonpath=False, ray_address=False, RAY_AUTH_MODE="token",
                             RAY_AUTH_TOKEN=self.token, RAY_gcs_server_port_wait_time_s="120",
                             PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        self.proc: subprocess.Popen | None = None
        self.gcs_address: str | None = None
        self.dashboard_url: str | None = None
        self.temp_dir: Path | None = None
        self.log_path: Path | None = None

    @property
    def session_dir(self) -> Path | None:
        return self.temp_dir / "session_latest" if self.temp_dir else None

    def diagnose(self, *texts: str) -> str:
        """``diagnose_ray_logs`` over this head's output, its session logs and ``texts``."""
        output = self.log_path.read_text(errors="replace") if self.log_path else ""
        return diagnose_ray_logs(output, *texts, session_dir=self.session_dir)

    def start(self) -> RayHead:
        for attempt in range(1, self.attempts + 1):
            problem = self._start_once(attempt)
            if problem is None:
                return self
            why = self.diagnose() or "no port clash, auth or raylet error in its logs"
            tail = self.log_path.read_text(errors="replace")[-3000:]
            self.stop()
            if attempt == self.attempts or (_AUTH_FAILED.search(why) and
                                            not _PORT_TAKEN.search(why)):
                raise RuntimeError(f"no Ray head after {attempt} tries: {problem}\n{why}\n"
                                   f"`ray start` output ({self.log_path}):\n{tail}")
            print(f"Ray head did not start ({problem}; {why.splitlines()[0]}); trying again "
                  f"({attempt + 1}/{self.attempts})", file=sys.stderr, flush=True)
        raise AssertionError("unreachable")

    def _start_once(self, attempt: int) -> str | None:
        # Short: Ray's Unix sockets live in it and their paths must stay under 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fa-", dir="/tmp"))
        log_dir = self.log_dir or self.temp_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"ray_start_{attempt}.log"
        agent_grpc, runtime_env_agent, client = quiet_ports(3)
        cmd = [self.ray, "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}",
               f"--temp-dir={self.temp_dir}", "--port=0",
               f"--include-dashboard={str(self.dashboard).lower()}",
               "--dashboard-host=127.0.0.1", "--dashboard-port=0",
               "--dashboard-agent-listen-port=0", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env_agent}",
               f"--ray-client-server-port={client}",
               "--min-worker-port=0", "--max-worker-port=0"]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

        def started() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with code {self.proc.returncode}")
            return "Ray runtime started" in self.log_path.read_text(errors="replace")

        try:
            wait_until(started, self.timeout, interval=1, what="`ray start`")
            output = self.log_path.read_text(errors="replace")
            gcs = _GCS_LINE.search(output)
            if not gcs:
                return "`ray start` printed no address to join"
            self.gcs_address = gcs.group(1)
            if self.dashboard:
                found = _DASHBOARD_LINE.search(output)
                if not found:
                    return "`ray start` printed no dashboard address"
                self.dashboard_url = found.group(1)
                auth = {"Authorization": f"Bearer {self.token}"}
                wait_until(lambda: http_ok(f"{self.dashboard_url}/api/version", headers=auth),
                           self.timeout, interval=1, what="the dashboard answering")
        except (RuntimeError, TimeoutError) as exc:
            return str(exc)
        clash = diagnose_ray_logs(session_dir=self.session_dir)
        if _PORT_TAKEN.search(clash):
            return "a port of this head was taken by another process"
        return None

    def stop(self, timeout: float = 90) -> None:
        """SIGTERM ``ray start --block`` (it stops its node), then whatever of it is left."""
        if self.proc is not None:
            tree = process_tree(self.proc.pid)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            stop_processes([*tree, *session_processes(self.proc.pid)], timeout=10)
            self.proc.wait(10)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
