"""The cluster's Serve on a two-node Ray cluster on one machine: the nearest thing to KubeRay here.

A head with 0 CPUs (as on every cluster in cluster/) and a worker node with 2, both on 127.0.0.1,
started with the Serve settings of ``faceage.serving.environment`` and token auth, as the image
and aws.yaml start them. Serve runs serve/config.yaml with ``proxy_location: EveryNode``.

On one machine both nodes' proxies listen on the same 127.0.0.1 port (Serve sets SO_REUSEPORT),
and the kernel hands each new connection to one of them; the test finds which proxy process
accepted a connection (psutil) and keeps the connections each node's proxy holds, so
"through the worker node's port" means through that node's proxy, as KubeRay's serve Service
reaches a worker pod's :8000.

    python tests/e2e/test_multinode.py     # the cluster on its own, until Ctrl-C (prints its ports)
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
READY = "multinode ready:"
START_S = 240  # upper bound on a loaded 2-core machine; every wait ends as soon as it can


def run_cluster() -> int:
    """Start head + worker, deploy Serve on them, print the ports and proxy PIDs, wait."""
    sys.path.insert(0, str(REPO))
    from faceage.runtime import LOOPBACK, apply_ray_env_defaults, free_port, http_ok, wait_until
    from faceage.serving.environment import apply_serve_env

    apply_ray_env_defaults()
    apply_serve_env()
    # ray.init turns 127.0.0.1 into the machine's outward IP before connecting (services.py,
    # resolve_ip_for_localhost); the nodes listen on loopback only, so it must stay loopback.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import psutil
    import ray
    import yaml
    from ray import serve
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster
    from ray.serve.schema import ServeDeploySchema

    from faceage import compat
    from faceage.serving.local import apply_overrides
    from faceage.serving.local_process import DEFAULT_CONFIG

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    temp_dir = tempfile.mkdtemp(prefix="fa-mn-", dir="/tmp")  # Unix socket paths stay short
    common = {"node_ip_address": LOOPBACK, "temp_dir": temp_dir, "object_store_memory": 200 << 20}
    gcs_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "num_cpus": 0, "gcs_server_port": gcs_port, "include_dashboard": False,
        "dashboard_port": free_port(),
        "ray_client_server_port": free_port(), "metrics_export_port": free_port(),
        "dashboard_agent_listen_port": free_port()})
    worker = cluster.add_node(**common, num_cpus=2, metrics_export_port=free_port())
    # cluster.address names the machine's own IP; the nodes listen on loopback only.
    ray.init(address=f"{LOOPBACK}:{gcs_port}", namespace="serve", log_to_driver=False)
    config = apply_overrides(yaml.safe_load(Path(DEFAULT_CONFIG).read_text()), {
        "http_options.port": free_port(), "http_options.host": LOOPBACK,
        "deployments.Detector.num_replicas": 1})
    schema = ServeDeploySchema.model_validate(config)
    serve.start(http_options=schema.http_options.model_dump(),
                proxy_location=schema.proxy_location)
    compat.deploy_config_nonblocking(compat.serve_client(), schema)
    url = f"http://{LOOPBACK}:{schema.http_options.port}"
    wait_until(lambda: http_ok(f"{url}/healthz", timeout=10), START_S, interval=1.0,
               what=f"{url}/healthz")

    def proxy_pid(node) -> int | None:
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        for proc in psutil.Process(raylet).children(recursive=True):
            try:
                if "ProxyActor" in " ".join(proc.cmdline()):
                    return proc.pid
            except psutil.Error:
                continue
        return None

    pids = {}
    wait_until(lambda: pids.update(head=proxy_pid(cluster.head_node),
                                   worker=proxy_pid(worker)) or all(pids.values()),
               60, what="a proxy process on each node")
    nodes = {"head": cluster.head_node.node_id, "worker": worker.node_id}
    print(f"{READY} {json.dumps({'url': url, 'proxy_pids': pids, 'nodes': nodes})}", flush=True)
    try:
        while not stop:
            time.sleep(0.5)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


def _accepted_by(local_port: int, pids: dict[str, int]) -> str | None:
    """Which node's proxy process holds the server end of our connection from ``local_port``."""
    import psutil

    for node, pid in pids.items():
        if any(c.raddr and c.raddr.port == local_port
               for c in psutil.Process(pid).net_connections("tcp")):
            return node
    return None


def _connection_to(node: str, port: int, pids: dict[str, int], tries: int = 64
                   ) -> http.client.HTTPConnection:
    """A keep-alive connection to 127.0.0.1:port that ``node``'s proxy accepted."""
    for _ in range(tries):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.connect()
        local_port = conn.sock.getsockname()[1]
        deadline, owner = time.monotonic() + 5, None
        while owner is None and time.monotonic() < deadline:
            owner = _accepted_by(local_port, pids)
            time.sleep(0.02)
        if owner == node:
            return conn
        conn.close()
    raise AssertionError(f"no connection to port {port} went to the {node}'s proxy in {tries}")


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
             headers: dict | None = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body or None, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


@pytest.fixture(scope="module")
def two_node_serve(tmp_path_factory):
    from faceage.runtime import child_env, stop_session

    log = (tmp_path_factory.mktemp("multinode") / "cluster.log").open("w+")
    env = child_env(ray_address=False, RAY_AUTH_MODE="token",
                    RAY_AUTH_TOKEN=secrets.token_hex(32))
    env = {k: v for k, v in env.items() if not k.startswith("RAY_SERVE_")}  # the list's own
    proc = subprocess.Popen([sys.executable, __file__], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    started = time.monotonic()
    info = None
    try:
        while info is None and time.monotonic() - started < START_S + 60:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                continue
            line = proc.stdout.readline()
            if not line:  # it exited
                break
            if line.startswith(READY):
                info = json.loads(line[len(READY):])
        if info is None:
            log.seek(0)
            pytest.fail(f"the two-node cluster did not start:\n{log.read()[-4000:]}")
        info["start_s"] = time.monotonic() - started
        yield info
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        stop_session(proc.pid, timeout=10)  # whatever of its Ray is left
        log.close()


@pytest.mark.slow
def test_every_node_proxy_answers_and_a_phone_photo_goes_through_the_worker(two_node_serve):
    from testkit.photos import phone_jpeg

    port = int(two_node_serve["url"].rsplit(":", 1)[1])
    pids = two_node_serve["proxy_pids"]
    assert set(pids) == {"head", "worker"} and pids["head"] != pids["worker"]
    connections = {node: _connection_to(node, port, pids) for node in pids}
    for node, conn in connections.items():  # KubeRay's readiness probe of each pod
        status, body = _request(conn, "GET", "/-/healthz")
        assert (status, body) == (200, b"success"), f"{node}'s proxy: {status} {body[:200]}"
    photo = phone_jpeg(12)
    status, body = _request(connections["worker"], "POST", "/predict", photo,
                            {"Content-Type": "image/jpeg"})
    assert status == 200, body[:500]
    faces = json.loads(body)["faces"]
    assert len(faces) == 1, faces
    for conn in connections.values():
        conn.close()
    print(f"two-node Serve up in {two_node_serve['start_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_cluster())
