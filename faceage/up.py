"""``faceage up``: a Ray head and its dashboard, the Serve API and the Streamlit app, at once.

Serve runs through ``faceage.serving.local`` (serve/config.yaml on a Ray instance of its own, or on
the cluster ``$RAY_ADDRESS`` names); Streamlit runs ``faceage/webapp/main.py`` pointed at it. Both
come with the package, so this works from a checkout and from an installed wheel alike. Each child
leads its own session, so Ctrl-C or SIGTERM here stops all of them and whatever they started.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from faceage import DEFAULT_MODEL_PATH
from faceage.errors import UserError
from faceage.runtime import (
    LOOPBACK,
    REPO_ROOT,
    Interrupted,
    Supervisor,
    child_env,
    free_port,
    http_ok,
    port_is_free,
    process_tree,
    stop_processes,
    stop_session,
    wait_until,
)

DEFAULT_MODEL = DEFAULT_MODEL_PATH
# The Streamlit script; run as a file (Streamlit reruns it on every interaction).
WEBAPP_SCRIPT = Path(__file__).resolve().parent / "webapp" / "main.py"
HOST = LOOPBACK
READY = "faceage up: ready"
STREAMLIT_START_S = 300


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="FILE", type=Path, default=DEFAULT_MODEL,
                   help="model file to serve (default: the shipped models/faceage-default.pt)")
    p.add_argument("--serve-port", type=int, default=8000, help="Serve API port (0: a free one)")
    p.add_argument("--app-port", type=int, default=8501, help="Streamlit port (0: a free one)")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="Ray dashboard port (0: a free one; unused with $RAY_ADDRESS)")
    p.add_argument("--no-app", action="store_true", help="start Ray and Serve only")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs of the local Ray head (default: all of the machine's)")
    p.add_argument("--timeout", type=float, default=900,
                   help="seconds to wait for Serve to answer /healthz")
    p.add_argument("--corrections-dir", metavar="DIR", type=Path,
                   help="take corrections from users (POST /corrections, the app's correction "
                        "inputs) and store them in DIR: face crops and a manifest.csv for "
                        "`faceage train` (default: off)")
    # The deprecated old name of --corrections-dir; not in --help.
    p.add_argument("--feedback-dir", dest="corrections_dir", type=Path, help=argparse.SUPPRESS)


def check_port(port: int, option: str) -> None:
    """Raise UserError when something already listens on ``HOST:port``."""
    if not port_is_free(port, HOST):
        raise UserError(f"port {port} ({option}) is already in use on {HOST}; stop what "
                        f"listens there or pick another port, e.g. {option} 0 for a free one")


def _resolve_ports(args: argparse.Namespace, attach: bool) -> dict[str, int]:
    wanted = {"--serve-port": args.serve_port}
    if not args.no_app:
        wanted["--app-port"] = args.app_port
    if not attach:
        wanted["--dashboard-port"] = args.dashboard_port
    ports = {}
    for option, port in wanted.items():
        if not 0 <= port < 65536:
            raise UserError(f"{option} {port}: use a port from 1 to 65535 (0: a free one)")
        if port:
            check_port(port, option)
        ports[option] = port or free_port(HOST)
    taken = [o for o in ports if list(ports.values()).count(ports[o]) > 1]
    if taken:
        raise UserError(f"{' and '.join(taken)} name the same port {ports[taken[0]]}; "
                        "give each its own")
    return ports


def start_streamlit(port: int, serve_url: str, log_path: Path) -> subprocess.Popen:
    """``streamlit run faceage/webapp/main.py`` on ``HOST:port`` using ``serve_url``, in its own
    group."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child holds it; closed here right after
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(WEBAPP_SCRIPT),
             "--server.address", HOST, "--server.port", str(port),
             "--browser.gatherUsageStats", "false", "--server.headless", "true",
             "--server.fileWatcherType", "none", "--global.developmentMode", "false"],
            # A checkout's .streamlit/config.toml applies when run there.
            cwd=REPO_ROOT, env=child_env(FACEAGE_SERVE_URL=serve_url),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def wait_streamlit(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    """Wait until Streamlit at ``url`` answers its health check; UserError if it exits first or
    does not answer within ``STREAMLIT_START_S``."""
    def answers() -> bool:
        if proc.poll() is not None:
            raise UserError(f"Streamlit exited with code {proc.returncode}; see {log_path}")
        return http_ok(url + "/_stcore/health")

    try:
        wait_until(answers, STREAMLIT_START_S, what="Streamlit answering")
    except TimeoutError:
        raise UserError(f"Streamlit did not answer {url} within {STREAMLIT_START_S} s; "
                        f"see {log_path}") from None


def _auth_for_cluster() -> str | None:
    """Turn on Ray token auth for ``$RAY_ADDRESS`` when a token is at hand; a note saying so.

    Ray 2.60 starts local clusters with token auth, but a driver given an explicit address only
    sends a token when RAY_AUTH_MODE=token; without it the connection is refused.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return None
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        return None
    os.environ["RAY_AUTH_MODE"] = "token"
    return ("using Ray token auth with the token `ray get-auth-token` prints "
            "(RAY_AUTH_MODE=disabled for a cluster without it)")


def _machine_addresses() -> set[str]:
    import psutil

    found = {"localhost", "::1", "0.0.0.0", socket.gethostname()}
    for addresses in psutil.net_if_addrs().values():
        found.update(a.address.split("%")[0] for a in addresses)
    return found


def check_address_is_on_this_machine(address: str) -> None:
    """UserError unless ``address`` (``$RAY_ADDRESS``) is a Ray cluster on this machine.

    ``faceage up`` deploys this machine's model file and waits for Serve on 127.0.0.1, and the
    cluster's Serve reads its settings where ``ray start`` ran, so a remote cluster is refused
    with what to run instead.
    """
    if address in ("auto", "local"):
        return
    host = re.sub(r"^[a-z]+://", "", address).rsplit(":", 1)[0].strip("[]")
    if host.startswith("127.") or host in _machine_addresses():
        return
    raise UserError(
        f"RAY_ADDRESS={address} is a Ray cluster on another machine; `faceage up` runs Serve "
        "only on this machine's Ray (it deploys a model file from here and waits for Serve on "
        "127.0.0.1). On a cluster, deploy Serve there: `ray exec cluster/aws.yaml 'cd ~/faceage "
        "&& serve deploy cluster/serve.yaml'` (ray up) or `kubectl apply -f "
        "cluster/kuberay/rayservice.yaml` (KubeRay), see cluster/README.md; then run only the web "
        "app here, pointed at it: FACEAGE_SERVE_URL=http://127.0.0.1:8000 streamlit run "
        "app/main.py (after a port-forward of the cluster's port 8000). Unset RAY_ADDRESS for a "
        "local stack.")


def run_up(args: argparse.Namespace) -> int:
    """Start Ray, Serve and Streamlit; block until Ctrl-C or SIGTERM; stop all of them."""
    from faceage.serving.local_process import LocalServe

    model = _model_path(args)
    address = os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address_is_on_this_machine(address)
    ports = _resolve_ports(args, attach=address is not None)
    log_dir = Path(tempfile.mkdtemp(prefix="faceage-up-"))
    overrides = {"args.model_path": str(model)}
    if args.corrections_dir is not None:
        overrides["args.corrections.dir"] = str(args.corrections_dir.expanduser().resolve())
    serve_url, app_url = _say_plan(args, model, address, ports, overrides, log_dir)
    supervisor = Supervisor()
    service = LocalServe(overrides, port=ports["--serve-port"],
                         dashboard_port=None if address else ports["--dashboard-port"],
                         num_cpus=args.num_cpus or os.cpu_count() or 1, timeout=args.timeout,
                         log_path=log_dir / "serve.log", address=address)
    streamlit: subprocess.Popen | None = None
    code = 0
    try:
        if app_url:
            streamlit = start_streamlit(ports["--app-port"], serve_url, log_dir / "streamlit.log")
        try:
            service.start()
        except RuntimeError as exc:
            print(f"error: Serve did not start: {exc}", file=sys.stderr, flush=True)
            code = 1
            return code
        _say_started(service, serve_url, address)
        if streamlit is not None:
            wait_streamlit(streamlit, app_url, log_dir / "streamlit.log")
        supervisor.ready()
        print(f"{READY}: Serve answers {service.url}/healthz"
              + (f", the app is at {app_url}" if app_url else "")
              + ". Ctrl-C stops everything.", flush=True)
        problem = supervisor.wait(lambda: _stopped(service, streamlit, log_dir))
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            code = 1
    except Interrupted:
        code = 130
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 2
    finally:
        _tear_down(supervisor, service, streamlit, log_dir, code)
    return code


def _model_path(args: argparse.Namespace) -> Path:
    model = args.model.expanduser().resolve()
    if not model.is_file():
        if model == DEFAULT_MODEL.resolve():
            raise UserError(f"the shipped model {DEFAULT_MODEL} does not exist; train one "
                            "(`faceage train`) and pass it with --model FILE")
        raise UserError(f"--model {args.model}: no such file; pass a model file `faceage train` "
                        "exported")
    return model


def _say_plan(args: argparse.Namespace, model: Path, address: str | None, ports: dict[str, int],
              overrides: dict[str, str], log_dir: Path) -> tuple[str, str | None]:
    """Print what is about to start and where; the Serve URL and the app's (None: no app)."""
    from faceage.serving.local_process import DEFAULT_CONFIG

    serve_url = f"http://{HOST}:{ports['--serve-port']}"
    app_url = None if args.no_app else f"http://{HOST}:{ports['--app-port']}"
    where = f"the Ray cluster at {address}" if address else "a new local Ray head"
    print(f"faceage up: Serve ({DEFAULT_CONFIG}, model {model}) on {where}"
          + ("" if args.no_app else ", and the Streamlit app"), flush=True)
    if not address:
        print(f"  Ray dashboard  http://{HOST}:{ports['--dashboard-port']}   (log in with the "
              "token `ray get-auth-token` prints)", flush=True)
    print(f"  Serve API      {serve_url}   (docs: {serve_url}/docs)", flush=True)
    if "args.corrections.dir" in overrides:
        print(f"  corrections    {overrides['args.corrections.dir']}   (`faceage corrections list` "
              "shows them)", flush=True)
    if app_url:
        print(f"  Streamlit app  {app_url}", flush=True)
    print(f"  logs           {log_dir}", flush=True)
    auth_note = _auth_for_cluster() if address else None
    if auth_note:
        print(f"  ({auth_note})", flush=True)
    print("Waiting for Serve to answer /healthz (the first start can take minutes) ...", flush=True)
    return serve_url, app_url


def _say_started(service, serve_url: str, address: str | None) -> None:
    if service.url != serve_url:  # a Serve already running on RAY_ADDRESS keeps its port
        print(f"  Serve API      {service.url}   (the cluster's Serve port)", flush=True)
    if address and service.info.get("dashboard"):
        print(f"  Ray dashboard  {service.info['dashboard']}", flush=True)
    if not address:
        print(f"  Ray address    {service.info['gcs_address']}   (RAY_ADDRESS for "
              "`ray status` or another `faceage up`)", flush=True)


def _stopped(service, streamlit: subprocess.Popen | None, log_dir: Path) -> str | None:
    """What stopped by itself, if anything: Serve or Streamlit, with where its log is."""
    if service.proc.poll() is not None:
        return (f"Serve stopped (exit code {service.proc.returncode}); see "
                f"{log_dir / 'serve.log'}")
    if streamlit is not None and streamlit.poll() is not None:
        return (f"Streamlit stopped (exit code {streamlit.returncode}); see "
                f"{log_dir / 'streamlit.log'}")
    return None


def _tear_down(supervisor: Supervisor, service, streamlit: subprocess.Popen | None,
               log_dir: Path, code: int) -> None:
    """Stop Streamlit, Serve and anything else this process started; keep the logs on failure."""
    supervisor.quiet()  # late signals must not cut the clean-up short
    print("faceage up: stopping ...", flush=True)
    descendants = process_tree(os.getpid())[1:]
    if streamlit is not None:
        # Its own session (start_new_session): it and whatever it started.
        stop_session(streamlit.pid, timeout=20)
        streamlit.wait(10)
    service.stop()
    stop_processes(descendants)
    supervisor.restore()
    if code == 0:
        shutil.rmtree(log_dir, ignore_errors=True)
        print("faceage up: stopped; nothing left running.", flush=True)
    else:
        print(f"faceage up: stopped; logs kept in {log_dir}", flush=True)
