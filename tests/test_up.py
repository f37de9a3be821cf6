"""``faceage up``: the whole local stack starts, answers, and stops without leaving a process."""

from __future__ import annotations

import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from faceage.cli import main as faceage_main
from faceage.up import READY

REPO = Path(__file__).resolve().parents[1]
# Upper bounds on a loaded 2-core machine; every wait ends as soon as its condition holds.
START_S = 900
STOP_S = 180
URL_LINE = re.compile(r"^\s+(Ray dashboard|Serve API|Streamlit app)\s+(http://\S+)")


def free_ports(count: int) -> list[int]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only, never through a proxy from the environment
    return session


class UpProcess:
    """``faceage up ...`` as a child process; its stdout lines are collected as they come."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]):
        self.log = log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "faceage.cli", "up", *args],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_ready(self, timeout: float) -> dict[str, str]:
        """The printed URLs by name, once the ready line is out; fails if the process ends."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if line.startswith(READY):
                urls = {}
                for earlier in self.lines:
                    match = URL_LINE.match(earlier)
                    if match:
                        urls[match.group(1)] = match.group(2)
                return urls
        self.log.flush()
        raise AssertionError(f"faceage up was not ready (exit code {self.proc.poll()}); "
                             f"stdout: {''.join(self.lines)}\nstderr: "
                             f"{Path(self.log.name).read_text()[-4000:]}")

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def close(self) -> None:
        """Make sure nothing is left, whatever the test did (by PID, never by name)."""
        if self.proc.poll() is None:
            leftovers = self.tree()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                pass
            for p in leftovers:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        self.log.close()


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "PYTHONUNBUFFERED": "1", **extra}
    if "RAY_ADDRESS" not in extra:
        env.pop("RAY_ADDRESS", None)
    return env


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def assert_stops_cleanly(up: UpProcess, ports: list[int]) -> None:
    """SIGTERM: exit code 0, the process and all its descendants gone, the ports free."""
    tree = up.tree()
    assert len(tree) > 2, "faceage up should have started Serve's and Streamlit's processes"
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(STOP_S) == 0
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    for port in ports:
        assert port_is_free(port), f"port {port} still in use after faceage up stopped"


@pytest.mark.timeout(START_S + 2 * STOP_S)
def test_up_starts_the_stack_and_stops_everything(untrained_model_file, astronaut_path,
                                                  tmp_path):
    serve_port, app_port, dashboard_port = free_ports(3)
    up = UpProcess(["--model", str(untrained_model_file), "--serve-port", str(serve_port),
                    "--app-port", str(app_port), "--dashboard-port", str(dashboard_port),
                    "--num-cpus", "2", "--timeout", str(START_S)],
                   tmp_path / "up.stderr.log", child_env())
    try:
        urls = up.wait_ready(START_S)
        assert urls == {"Ray dashboard": f"http://127.0.0.1:{dashboard_port}",
                        "Serve API": f"http://127.0.0.1:{serve_port}",
                        "Streamlit app": f"http://127.0.0.1:{app_port}"}
        client = http()
        serve_url = urls["Serve API"]
        assert client.get(f"{serve_url}/healthz", timeout=60).json() == {"status": "ok"}
        assert client.get(f"{serve_url}/docs", timeout=60).status_code == 200
        result = client.post(f"{serve_url}/predict", data=astronaut_path.read_bytes(),
                             headers={"Content-Type": "image/jpeg"}, timeout=120)
        assert result.status_code == 200, result.text
        faces = result.json()["faces"]
        assert len(faces) == 1 and isinstance(faces[0]["age"], float)
        assert result.json()["model"]["name"] == "faceage-untrained-test"
        assert client.get(f"{urls['Streamlit app']}/_stcore/health", timeout=60).status_code == 200
        # The dashboard's page loads without the token; its API wants it (Ray 2.60 token auth).
        dashboard = client.get(urls["Ray dashboard"], timeout=60)
        assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()

        # A second `faceage up` on this head (RAY_ADDRESS) must not replace the running app.
        (ray_address,) = [line.split()[2] for line in up.lines if "Ray address" in line]
        second = subprocess.run(
            [sys.executable, "-m", "faceage.cli", "up", "--model", str(untrained_model_file),
             "--serve-port", "0", "--no-app"], cwd=REPO, capture_output=True, text=True,
            env=child_env(RAY_ADDRESS=ray_address), timeout=STOP_S)
        # A failed run keeps its log folder for the user; the test removes it.
        for line in second.stdout.splitlines():
            if line.split()[:1] == ["logs"]:
                shutil.rmtree(line.split()[1], ignore_errors=True)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "already runs an application 'faceage'" in second.stderr
        assert client.get(f"{serve_url}/healthz", timeout=60).json() == {"status": "ok"}

        assert_stops_cleanly(up, [serve_port, app_port, dashboard_port])
    finally:
        up.close()


def test_up_names_a_port_in_use(untrained_model_file, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = faceage_main(["up", "--model", str(untrained_model_file), "--serve-port", "0",
                             "--dashboard-port", "0", "--app-port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"port {port} (--app-port) is already in use" in err
    assert "Traceback" not in err


def test_up_without_a_model_file_says_so(tmp_path, capsys):
    missing = tmp_path / "nothing.pt"
    assert faceage_main(["up", "--model", str(missing), "--serve-port", "0"]) == 2
    assert f"--model {missing}: no such file" in capsys.readouterr().err


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM ``ray start --block``, then SIGKILL what is left of its session (only its own)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


@pytest.fixture
def ray_head(tmp_path):
    """A ``ray start --head --block`` of this test's own (free ports, no dashboard, token auth)."""
    bin_dir = Path(sys.executable).parent
    temp_dir = Path(f"/tmp/fa-{secrets.token_hex(3)}")  # short: Ray's sockets live in it
    env = child_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    head = None
    try:
        # On a loaded machine the raylet can miss its start-up deadline (ray-project/ray#65983)
        # and `ray start` gives up; another try usually works.
        for attempt in range(3):
            gcs, node_manager, object_manager, runtime_env, metrics, agent_grpc, agent_http, \
                client = free_ports(8)
            log_path = tmp_path / f"ray_start_{attempt}.log"
            with log_path.open("w") as log:
                head = subprocess.Popen(
                    [str(bin_dir / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                     "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
                     f"--port={gcs}", "--include-dashboard=false",
                     f"--node-manager-port={node_manager}",
                     f"--object-manager-port={object_manager}",
                     f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                     f"--dashboard-agent-grpc-port={agent_grpc}",
                     f"--dashboard-agent-listen-port={agent_http}",
                     f"--ray-client-server-port={client}",
                     "--min-worker-port=0", "--max-worker-port=0"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 300
            while "Ray runtime started" not in log_path.read_text():
                if head.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(1)
            else:
                break
            stop_head(head)
            assert attempt < 2, f"no Ray head: {log_path.read_text()[-3000:]}"
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "proc": head}
    finally:
        if head is not None:
            stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(START_S + 2 * STOP_S)
def test_up_deploys_on_the_cluster_ray_address_names(ray_head, untrained_model_file,
                                                     astronaut_path, tmp_path):
    head_tree = [psutil.Process(ray_head["proc"].pid),
                 *psutil.Process(ray_head["proc"].pid).children(recursive=True)]
    (serve_port,) = free_ports(1)
    up = UpProcess(["--model", str(untrained_model_file), "--serve-port", str(serve_port),
                    "--no-app", "--timeout", str(START_S)], tmp_path / "up.stderr.log",
                   # RAY_AUTH_MODE left for `faceage up` to set: a token is at hand.
                   {**without(ray_head["env"], "RAY_AUTH_MODE"),
                    "RAY_ADDRESS": ray_head["address"]})
    try:
        urls = up.wait_ready(START_S)
        assert urls["Serve API"] == f"http://127.0.0.1:{serve_port}"
        assert "Streamlit app" not in urls
        assert any("on the Ray cluster at " + ray_head["address"] in line for line in up.lines)
        assert any("using Ray token auth" in line for line in up.lines)
        result = http().post(f"{urls['Serve API']}/predict", data=astronaut_path.read_bytes(),
                             headers={"Content-Type": "image/jpeg"}, timeout=120)
        assert result.status_code == 200, result.text
        assert len(result.json()["faces"]) == 1

        tree = up.tree()
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(STOP_S) == 0
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
        # It started Serve on that cluster, so it shut Serve down; the cluster itself lives on.
        deadline = time.monotonic() + 60
        while not port_is_free(serve_port):
            assert time.monotonic() < deadline, f"Serve still listens on {serve_port}"
            time.sleep(1)
        assert ray_head["proc"].poll() is None
        assert all(p.is_running() for p in head_tree)
    finally:
        up.close()
