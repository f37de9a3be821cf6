"""faceage.runtime: ports, waits, process-tree stops, child environments, start_ray's retry; and
testkit/ray_head.py (RayHead, diagnose_ray_logs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import psutil
import pytest

from faceage import runtime
from testkit import ray_head

# A Python child that ignores SIGTERM (only SIGKILL stops it) and says when it is ready.
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(120)")


def spawn_tree(**popen) -> subprocess.Popen:
    """sh with two ``sleep`` children and one child that ignores SIGTERM; returns once all run."""
    script = f'sleep 120 & sleep 120 & {sys.executable} -c "{STUBBORN}" & wait'
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, **popen)
    assert proc.stdout.readline().strip() == "ready"
    runtime.wait_until(lambda: len(runtime.process_tree(proc.pid)) >= 4, 10, interval=0.05,
                       what="the children starting")
    return proc


# -- ports ----------------------------------------------------------------------------------------


def test_free_ports_are_distinct_and_bindable():
    ports = runtime.free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind((runtime.LOOPBACK, port))
    assert 1024 <= runtime.free_port() < 65536


def test_quiet_ports_are_free_and_below_the_ephemeral_range():
    ports = runtime.quiet_ports(3)
    assert len(set(ports)) == 3 and all(p in runtime.QUIET_PORTS for p in ports)
    assert all(runtime.port_is_free(p) for p in ports)


def test_port_is_free_sees_a_listener_and_not_a_closed_port():
    with socket.socket() as s:
        s.bind((runtime.LOOPBACK, 0))
        s.listen()
        port = s.getsockname()[1]
        assert not runtime.port_is_free(port)
    assert runtime.port_is_free(port)


def test_port_is_free_raises_on_errors_other_than_in_use():
    with pytest.raises(OSError):
        runtime.port_is_free(runtime.free_port(), host="192.0.2.1")  # TEST-NET: not ours


# -- waiting --------------------------------------------------------------------------------------


def test_wait_until_returns_the_first_truthy_value():
    calls = iter([0, None, "", "done"])
    assert runtime.wait_until(lambda: next(calls), 5, interval=0.01) == "done"


def test_wait_until_names_what_did_not_happen():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"the flag did not happen within 0.2 s"):
        runtime.wait_until(lambda: False, 0.2, interval=0.05, what="the flag")
    assert time.monotonic() - start < 2


def test_wait_until_passes_exceptions_through():
    def broken():
        raise RuntimeError("deploy failed")

    with pytest.raises(RuntimeError, match="deploy failed"):
        runtime.wait_until(broken, 5)


def test_http_ok():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer((runtime.LOOPBACK, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://{runtime.LOOPBACK}:{server.server_address[1]}"
        assert runtime.http_ok(f"{base}/ok")
        assert not runtime.http_ok(f"{base}/down")
    finally:
        server.shutdown()
        server.server_close()
    assert not runtime.http_ok(f"http://{runtime.LOOPBACK}:{runtime.free_port()}/", timeout=2)


# -- stopping processes ---------------------------------------------------------------------------


def test_stop_process_tree_stops_every_descendant():
    proc = spawn_tree()
    tree = runtime.process_tree(proc.pid)
    assert len(tree) >= 4
    assert runtime.stop_process_tree(proc.pid, timeout=2) == []  # SIGKILL for the stubborn one
    proc.wait(10)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert runtime.process_tree(proc.pid) == []


def test_stop_process_tree_can_spare_the_root():
    proc = spawn_tree()
    children = runtime.process_tree(proc.pid)[1:]
    runtime.stop_process_tree(proc.pid, timeout=2, include_root=False)
    assert proc.wait(10) is not None  # sh's `wait` returns once its children are gone
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_stop_session_stops_what_the_leader_left_behind():
    proc = spawn_tree(start_new_session=True)
    members = runtime.session_processes(proc.pid)
    assert {p.pid for p in members} >= {p.pid for p in runtime.process_tree(proc.pid)}
    assert runtime.stop_session(proc.pid, timeout=2) == []
    proc.wait(10)
    assert runtime.session_processes(proc.pid) == []


def test_stop_processes_ignores_the_already_gone():
    proc = subprocess.Popen(["sleep", "0"])
    gone = psutil.Process(proc.pid)
    proc.wait(10)
    assert runtime.stop_processes([gone], timeout=1) == []


# -- environments ---------------------------------------------------------------------------------


def test_child_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    env = runtime.child_env(EXTRA="x")
    assert {k: env[k] for k in runtime.RAY_ENV_DEFAULTS} == runtime.RAY_ENV_DEFAULTS
    assert env["PYTHONPATH"].split(os.pathsep) == [str(runtime.REPO_ROOT), "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["EXTRA"] == "x"
    assert env["RAY_ADDRESS"] == "10.0.0.1:6379"
    plain = runtime.child_env(pythonpath=False, ray_address=False)
    assert plain["PYTHONPATH"] == "/elsewhere" and "RAY_ADDRESS" not in plain
    assert runtime.child_env(ray_address=False, RAY_ADDRESS="h:1")["RAY_ADDRESS"] == "h:1"


def test_apply_ray_env_defaults_keeps_what_is_set():
    env = runtime.apply_ray_env_defaults({"RAY_USAGE_STATS_ENABLED": "1"})
    assert env == {**runtime.RAY_ENV_DEFAULTS, "RAY_USAGE_STATS_ENABLED": "1"}


# -- start_ray ------------------------------------------------------------------------------------


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init that fails ``fail`` times (each time leaving a child behind, as a half-started
    node does) and then returns "context"; ray.shutdown counted."""
    import ray

    state = {"fail": 99, "init": [], "shutdown": 0, "children": []}

    def init(**kwargs):
        state["init"].append(kwargs)
        if len(state["init"]) <= state["fail"]:
            state["children"].append(subprocess.Popen(["sleep", "120"]))
            raise ConnectionError("raylet did not start")
        return "context"

    def shutdown():
        state["shutdown"] += 1

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    yield state
    for child in state["children"]:  # whatever start_ray did not stop (a failing test)
        child.kill()
        child.wait(10)


def test_start_ray_retries_a_local_start_and_stops_what_each_try_left(fake_ray, capsys):
    with pytest.raises(ConnectionError, match="raylet did not start"):
        runtime.start_ray(None, attempts=3, num_cpus=2)
    assert [kw["address"] for kw in fake_ray["init"]] == ["local"] * 3
    assert fake_ray["init"][0]["num_cpus"] == 2
    assert fake_ray["shutdown"] == 3
    assert len(fake_ray["children"]) == 3
    assert all(c.wait(10) is not None for c in fake_ray["children"])  # stopped, not left
    assert "trying again (2/3)" in capsys.readouterr().err


def test_start_ray_returns_once_a_try_works(fake_ray):
    fake_ray["fail"] = 1
    assert runtime.start_ray("local", attempts=4) == "context"
    assert len(fake_ray["init"]) == 2
    assert fake_ray["children"][0].poll() is not None


def test_start_ray_does_not_retry_joining_a_cluster(fake_ray):
    with pytest.raises(ConnectionError):
        runtime.start_ray("10.0.0.1:6379", attempts=4)
    assert [kw["address"] for kw in fake_ray["init"]] == ["10.0.0.1:6379"]


# -- RayHead (testkit/ray_head.py) --------------------------------------------------------------


def test_diagnose_ray_logs_names_a_port_clash_and_refused_auth(tmp_path):
    logs = tmp_path / "session" / "logs"
    logs.mkdir(parents=True)
    (logs / "runtime_env_agent.log").write_text("OSError: [Errno 98] Address already in use\n")
    why = ray_head.diagnose_ray_logs("Job failed: 403 Invalid authentication token\n",
                                     session_dir=tmp_path / "session")
    assert "a port Ray needed was taken" in why and "runtime_env_agent.log" in why
    assert "token authentication was refused" in why
    assert ray_head.diagnose_ray_logs("all fine\n") == ""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ray_head_reads_back_the_ports_ray_picked_and_stops_everything(tmp_path):
    head = ray_head.RayHead(dashboard=True, log_dir=tmp_path)
    with head:
        host, port = head.gcs_address.rsplit(":", 1)  # the node's IP; the GCS listens on all
        assert host and not runtime.port_is_free(int(port))
        assert head.dashboard_url.startswith(f"http://{runtime.LOOPBACK}:")
        assert not runtime.http_ok(f"{head.dashboard_url}/api/version")  # the token is needed
        assert runtime.http_ok(f"{head.dashboard_url}/api/version",
                               headers={"Authorization": f"Bearer {head.token}"})
        tree = runtime.process_tree(head.proc.pid)
        assert len(tree) > 3
    assert head.proc.poll() is not None
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not head.temp_dir.exists()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_workers_run_at_ordinary_priority(ray_local):
    """Ray's default worker niceness (15 more than the node's) would make a Ray Train worker
    yield to every other process; the Ray that faceage starts runs its workers at the niceness
    of the process that started it (this one, which may itself run under ``nice``)."""
    @ray_local.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray_local.get(niceness.remote()) == os.nice(0)
