"""The Serve settings every Ray node needs, wherever Serve runs: one list, read by everything.

Serve reads these from the environment of the process that starts Ray on a node (``ray start``,
or ``ray.init`` for a local instance): the controller, the proxies and the replicas inherit it.
A driver's environment never reaches them on a running cluster, so each way of starting Ray
takes them from here:

- ``faceage up`` and ``python -m faceage.serving.local`` (``apply_serve_env``);
- the image (``cluster/Dockerfile``'s ``ENV``), so every KubeRay pod;
- ``ray up`` nodes (``cluster/aws.yaml``'s start commands).

``cluster/generate.py`` writes the last two from ``SERVE_ENV``; tests/e2e/test_cluster.py checks
that they carry it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import MutableMapping

SERVE_ENV: dict[str, str] = {
    # Serve replaces a proxy that does not answer its readiness check in 5 s; on a busy machine
    # its first start can take longer, and start-up then fails.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    # gRPC between proxy and replicas, user code on the replica's own event loop, buffered
    # access logs, a frozen GC after start-up: the Detector hop 8.1 -> 4.3 ms, the age call
    # 25.1 -> 19.1 ms, one /stream socket 1.21x -> 1.54x in-process (docs/serve.md).
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ... but not its direct ingress. Without HAProxy, direct ingress starts a proxy on the head
    # only (serve/_private/controller.py): worker nodes would not answer /-/healthz, which
    # KubeRay's worker readiness probe asks, and all HTTP would pass through the head. Ray's
    # Python proxy on every node takes requests instead; it never used the Ingress replicas'
    # own ports, so nothing measured above depended on them. (HAProxy, which would use them, is
    # left off: see cluster/README.md, "Serve settings".)
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_ENABLE_HA_PROXY": "0",
    # That gRPC stops messages at 4 MiB. Photos and crops above 1 MiB travel through the object
    # store (faceage/serving/payload.py), so this is a margin for the rest (a reply listing
    # many faces), well above the 16 MiB body limit.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(64 * 1024 * 1024),
    # Serve's logs go to its own files only (the throughput mode's choice, stated here so it is
    # one): <session>/logs/serve/ on each node, which the dashboard's Serve and Logs tabs and
    # `ray logs` read. Replica stderr never reached `kubectl logs` anyway: Ray writes worker
    # processes' stderr to files too.
    "RAY_SERVE_LOG_TO_STDERR": "0",
}


def apply_serve_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``SERVE_ENV`` in ``environ`` (default ``os.environ``) where a key is not set yet.

    An explicit value in the environment wins. Returns what the environment now holds for them.
    """
    environ = os.environ if environ is None else environ
    for key, value in SERVE_ENV.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in SERVE_ENV}


def shell_exports() -> str:
    """``export K=V ...`` of ``SERVE_ENV``, for a shell line that then runs ``ray start``."""
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in SERVE_ENV.items())


def dockerfile_env() -> str:
    """An ``ENV`` instruction of ``SERVE_ENV``, one variable a line."""
    lines = [f"{k}={v}" for k, v in SERVE_ENV.items()]
    return "ENV " + " \\\n    ".join(lines)
