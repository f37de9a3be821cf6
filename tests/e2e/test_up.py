"""``faceage up``: the whole local stack starts, answers, and stops without leaving a process."""

from __future__ import annotations

import queue
import re
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

from faceage import runtime
from faceage.cli import main as faceage_main
from faceage.runtime import free_ports, port_is_free
from faceage.up import READY
from testkit.ray_head import RayHead

REPO = Path(__file__).resolve().parents[2]
# Upper bounds on a loaded 2-core machine; every wait ends as soon as its condition holds.
START_S = 900
STOP_S = 180
URL_LINE = re.compile(r"^\s+(Ray dashboard|Serve API|Streamlit app)\s+(http://\S+)")


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only, never through a proxy from the environment
    return session


class UpProcess:
    """``faceage up ...`` as a child process; its stdout lines are collected as they come."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str],
                 faceage: list[str] | None = None, cwd: Path = REPO):
        """``faceage``: the command (default: this checkout's, ``python -m faceage.cli``)."""
        self.log = log_path.open("w")
        command = faceage or [sys.executable, "-m", "faceage.cli"]
        self.proc = subprocess.Popen([*command, "up", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
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
        return runtime.process_tree(self.proc.pid)

    def close(self) -> None:
        """Make sure nothing is left, whatever the test did (by PID, never by name)."""
        if self.proc.poll() is None:
            leftovers = self.tree()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                pass
            runtime.stop_processes(leftovers, timeout=10)
        self.log.close()


def child_env(**extra: str) -> dict[str, str]:
    """``faceage up`` as a user starts it: Ray defaults, no PYTHONPATH, RAY_ADDRESS if given."""
    return runtime.child_env(pythonpath=False, ray_address=False, **extra)


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


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(START_S + 2 * STOP_S)
def test_up_starts_the_stack_and_stops_everything(installed, untrained_model_file, tmp_path):
    """`faceage up` as a user gets it: the wheel installed in a fresh venv (the ``installed``
    fixture), run from a folder that is not a checkout, with the model and serve config the wheel
    carries. One start covers the wheel's stack and `up`'s own promises (the ports asked for,
    the dashboard, no second application on the same head, a clean stop)."""
    serve_port, app_port, dashboard_port = free_ports(3)
    up = UpProcess(["--serve-port", str(serve_port), "--app-port", str(app_port),
                    "--dashboard-port", str(dashboard_port), "--num-cpus", "2",
                    "--timeout", str(START_S)],
                   tmp_path / "up.stderr.log", installed["env"], [installed["faceage"]],
                   installed["cwd"])
    try:
        urls = up.wait_ready(START_S)
        assert "_bundled/serve/config.yaml" in up.lines[0], up.lines[0]
        assert urls == {"Ray dashboard": f"http://127.0.0.1:{dashboard_port}",
                        "Serve API": f"http://127.0.0.1:{serve_port}",
                        "Streamlit app": f"http://127.0.0.1:{app_port}"}
        client = http()
        serve_url = urls["Serve API"]
        assert client.get(f"{serve_url}/healthz", timeout=60).json() == {"status": "ok"}
        assert client.get(f"{serve_url}/docs", timeout=60).status_code == 200
        result = client.post(f"{serve_url}/predict", timeout=120,
                             data=(installed["cwd"] / "astronaut.jpg").read_bytes(),
                             headers={"Content-Type": "image/jpeg"})
        assert result.status_code == 200, result.text
        (face,) = result.json()["faces"]
        assert isinstance(face["age"], float) and len(face["age_interval"]) == 2
        assert result.json()["model"]["name"].startswith("faceage-")  # the shipped model
        assert client.get(f"{urls['Streamlit app']}/_stcore/health", timeout=60).status_code == 200
        # The dashboard's page loads without the token; its API wants it (Ray 2.60 token auth).
        dashboard = client.get(urls["Ray dashboard"], timeout=60)
        assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()

        # A second `faceage up` on this head (RAY_ADDRESS) must not replace the running app.
        (ray_address,) = [line.split()[2] for line in up.lines if "Ray address" in line]
        second = subprocess.run(
            [installed["faceage"], "up", "--model", str(untrained_model_file),
             "--serve-port", "0", "--no-app"], cwd=installed["cwd"], capture_output=True,
            text=True, env={**installed["env"], "RAY_ADDRESS": ray_address}, timeout=STOP_S)
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


@pytest.mark.parametrize("address", ["10.20.30.40:6379", "ray://head.example.com:10001"])
def test_up_refuses_a_remote_cluster_and_says_what_to_run(untrained_model_file, address,
                                                          monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert faceage_main(["up", "--model", str(untrained_model_file), "--serve-port", "0",
                         "--app-port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"RAY_ADDRESS={address} is a Ray cluster on another machine" in err
    assert "serve deploy cluster/serve.yaml" in err and "cluster/kuberay/rayservice.yaml" in err
    assert "FACEAGE_SERVE_URL=" in err and "Traceback" not in err


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "localhost:6379", "auto"])
def test_up_takes_a_cluster_on_this_machine(address):
    from faceage.up import check_address_is_on_this_machine

    check_address_is_on_this_machine(address)


@pytest.fixture
def ray_head(tmp_path):
    """A ``ray start --head --block`` of this test's own (Ray's ports, no dashboard, token auth)."""
    with RayHead(dashboard=False, log_dir=tmp_path) as head:
        yield {"address": head.gcs_address, "env": head.env, "proc": head.proc}
        # Shown with a failed test's output: a port clash or a refused token, in Ray's words.
        if why := head.diagnose():
            print(f"Ray head diagnosis:\n{why}", file=sys.stderr)


@pytest.mark.slow
@pytest.mark.ray
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
