"""Run the Serve config on a private Ray instance of its own, with overrides; stop it cleanly.

    python -m faceage.serving.local --port 0 --set args.model_path=/tmp/m.pt \\
        --set deployments.Detector.num_replicas=1

The config is serve/config.yaml: the checkout's file, or the copy an installed wheel carries.

Unlike ``serve run``, it never joins a Ray cluster already running on the machine (another
user's, or a test's), picks free ports when asked, and takes down everything it started on
SIGINT/SIGTERM. Tests and ``bench/serve_load.py`` use ``LocalServe``
(``faceage.serving.local_process``), which runs this as a child process and waits until the API
answers ``/healthz``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from faceage import compat
from faceage.arguments import add_set_argument
from faceage.errors import UserError
from faceage.runtime import (
    REPO_ROOT,
    Interrupted,
    Supervisor,
    apply_ray_env_defaults,
    free_port,
    http_ok,
    start_ray,
    stop_process_tree,
    wait_until,
)
from faceage.serving.environment import apply_serve_env
from faceage.serving.local_process import DEFAULT_CONFIG, READY
from faceage.yaml_settings import parse_override


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


def _wait_healthy(url: str, timeout: float, app_name: str) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    def healthy() -> bool:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"deploying {app_name} failed: {status.message}")
        return http_ok(f"{url}/healthz", timeout=10)

    wait_until(healthy, timeout, interval=1.0, what=f"{url}/healthz answering 200")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m faceage.serving.local",
                                description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--port", type=int, help="HTTP port (0: a free one; default: the config's)")
    add_set_argument(p, help="override, e.g. args.model_path=m.pt or deployments.Detector."
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
    return p


def _serve_config(args: argparse.Namespace) -> dict:
    """The Serve config file with the command line's overrides; ``UserError`` or ``KeyError``
    for a bad one."""
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        parts, value = parse_override(item)
        overrides[".".join(parts)] = value
    if args.port is not None:
        overrides["http_options.port"] = args.port or free_port()
    return apply_overrides(yaml.safe_load(Path(args.config).read_text()), overrides)


def _ray_init_kwargs(args: argparse.Namespace, metrics_port: int | None) -> dict[str, Any]:
    init: dict[str, Any] = {"include_dashboard": args.dashboard_port is not None}
    if args.dashboard_port is not None:
        # Port 0 goes to Ray as it is: the dashboard binds a free port itself (no window in
        # which another process could take one picked here) and ray.init reports it.
        init.update(dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port)
    init.update(compat.ray_init_private_kwargs(temp_dir=args.temp_dir,
                                               metrics_export_port=metrics_port))
    return init


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    apply_ray_env_defaults()
    # Set before Ray starts: the controller, proxies and replicas read them when they start.
    apply_serve_env()
    try:
        config = _serve_config(args)
    except (UserError, KeyError) as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr, flush=True)
        return 2
    import ray
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    metrics_port = None if args.metrics_port is None else (args.metrics_port or free_port())
    app_name = schema.applications[0].name
    supervisor = Supervisor()
    try:
        if args.address:
            context = start_ray(args.address, namespace="serve", log_to_driver=False)
            serve_was_running = _prepare_shared_serve(schema, app_name)
        else:
            context = start_ray(None, num_cpus=args.num_cpus, namespace="serve",
                                log_to_driver=False, **_ray_init_kwargs(args, metrics_port))
            serve_was_running = False
    except Interrupted:
        supervisor.quiet()
        ray.shutdown()
        # Interrupted mid-start: our children are the half-started node (GCS, raylet, ...).
        stop_process_tree(os.getpid(), timeout=5, include_root=False)
        return 130
    except RuntimeError as exc:  # the cluster's Serve already runs an application of this name
        print(f"error: {exc}", file=sys.stderr, flush=True)
        ray.shutdown()
        return 1
    supervisor.install()
    return _serve_until_stopped(args, schema, context, metrics_port, serve_was_running,
                                supervisor)


def _serve_until_stopped(args: argparse.Namespace, schema, context, metrics_port: int | None,
                         serve_was_running: bool, supervisor: Supervisor) -> int:
    """Deploy ``schema`` on the Ray of ``context``, print the READY line once /healthz answers,
    wait for SIGINT/SIGTERM, and take the application (or all of Serve) and Ray down."""
    import ray
    from ray import serve

    app_name = schema.applications[0].name
    code = 0
    try:
        # What `serve run CONFIG` does: start Serve with the config's proxy options, then hand
        # the whole config to the controller, which applies per-deployment settings.
        serve.start(http_options=schema.http_options.model_dump(),
                    proxy_location=schema.proxy_location,
                    controller_options=schema.controller_options)
        client = compat.serve_client()
        http_options = client.http_config  # a Serve already running keeps its own
        compat.deploy_config_nonblocking(client, schema)
        host = http_options.host
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http_options.port}"
        _wait_healthy(url, args.timeout, app_name)
        info = {"url": url, "pid": os.getpid(), "gcs_address": context.address_info["gcs_address"]}
        if (args.dashboard_port is not None or args.address) and context.dashboard_url:
            info["dashboard"] = f"http://{context.dashboard_url}"
        if metrics_port is not None:
            info["metrics"] = f"http://127.0.0.1:{metrics_port}/metrics"
        supervisor.ready()
        print(f"{READY} {json.dumps(info)}", flush=True)
        supervisor.wait()
    except Interrupted:
        code = 130
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        supervisor.quiet()
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
    into ``schema``. Its replicas import ``faceage.serving.app`` from the cluster's faceage; when
    this faceage is a checkout, from this checkout (PYTHONPATH), as a cluster on this machine can.
    """
    ours = schema.applications[0]
    if REPO_ROOT is not None:
        runtime_env = dict(ours.runtime_env or {})
        env_vars = dict(runtime_env.get("env_vars") or {})
        env_vars.setdefault("PYTHONPATH", str(REPO_ROOT))
        ours.runtime_env = {**runtime_env, "env_vars": env_vars}
    if not compat.serve_controller_running():
        return False
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**compat.serve_details(compat.serve_client()))
    if app_name in details.applications:
        raise RuntimeError(f"Serve on this cluster already runs an application {app_name!r}; "
                           "use it, or remove it first (serve delete / serve shutdown)")
    others = [app.deployed_app_config for app in details.applications.values()
              if app.deployed_app_config is not None]
    schema.applications = others + schema.applications
    return True


if __name__ == "__main__":
    sys.exit(main())
