"""The wheel is the whole product: built from the sdist, installed into a fresh venv, and run from
a folder that is not a checkout, `faceage --version`, `predict` and `up` work on what it carries."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import requests

from faceage import __version__
from faceage.runtime import port_is_free, process_tree, stop_processes
from faceage.up import READY

REPO = Path(__file__).resolve().parents[1]
# A loaded 2-core machine: installing from uv's cache takes a minute or two, `up` several.
INSTALL_S = 1200
START_S = 900
STOP_S = 180
URL_LINE = re.compile(r"^\s+(Ray dashboard|Serve API|Streamlit app)\s+(http://\S+)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(INSTALL_S + START_S + 2 * STOP_S)]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = INSTALL_S) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``uv build`` of this checkout: the sdist, then the wheel built from that sdist."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    out = tmp_path_factory.mktemp("dist")
    run([uv, "build", "-o", str(out)], cwd=REPO)
    (built,) = out.glob("faceage-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed by ``uv pip`` (dependencies resolved from the
    index; uv's cache makes torch cheap), and an empty folder, not a checkout, to run in."""
    uv = shutil.which("uv")
    root = tmp_path_factory.mktemp("wheel-venv")
    venv = root / "venv"
    run([uv, "venv", "-q", "-p", sys.executable, str(venv)], cwd=root)
    run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(wheel)],
        cwd=root)
    work = root / "elsewhere"
    work.mkdir()
    shutil.copy(REPO / "tests" / "data" / "astronaut.jpg", work / "astronaut.jpg")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return {"venv": venv, "cwd": work, "env": env, "faceage": str(venv / "bin" / "faceage")}


def test_the_wheel_carries_the_apps_the_model_configs_and_licences(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("faceage/serving/app.py", "faceage/serving/local.py", "faceage/webapp/main.py",
                 "faceage/_bundled/models/faceage-default.pt",
                 "faceage/_bundled/models/MODEL_CARD.md", "faceage/_bundled/configs/train.yaml",
                 "faceage/_bundled/configs/tune.yaml", "faceage/_bundled/serve/config.yaml",
                 "faceage/inference/mtcnn/pnet.pt", "faceage/inference/mtcnn/onet.pt",
                 "faceage/inference/mtcnn/LICENSE-facenet-pytorch",
                 f"faceage-{__version__}.dist-info/licenses/LICENSE",
                 f"faceage-{__version__}.dist-info/licenses/NOTICE"):
        assert name in names, f"{name} is not in {wheel.name}"
    assert not [n for n in names if n.startswith(("tests/", "serve/", "app/", "bench/"))]
    assert wheel.name == f"faceage-{__version__}-py3-none-any.whl"


def test_version_names_the_package_and_the_default_model(installed):
    out = run([installed["faceage"], "--version"], installed["cwd"], installed["env"]).stdout
    package, model = out.strip().splitlines()
    assert package.startswith(f"faceage {__version__} (") and str(installed["venv"]) in package
    assert re.match(r"default model faceage-\S+ \S+\+[0-9a-f]{12} \(", model), model
    assert "_bundled/models/faceage-default.pt" in model


def test_predict_answers_with_an_interval_from_the_shipped_model(installed):
    out = run([installed["faceage"], "predict", "astronaut.jpg", "--json"], installed["cwd"],
              installed["env"]).stdout
    (face,) = json.loads(out.strip().splitlines()[-1])["faces"]
    low, high = face["age_interval"]
    assert low < face["age"] < high


def test_up_serves_from_the_wheel_and_stops_cleanly(installed):
    proc = subprocess.Popen(
        [installed["faceage"], "up", "--serve-port", "0", "--app-port", "0",
         "--dashboard-port", "0", "--num-cpus", "2", "--timeout", str(START_S)],
        cwd=installed["cwd"], env=installed["env"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + START_S + 60
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            if line.startswith(READY):
                break
        assert seen and seen[-1].startswith(READY), "".join(seen)[-4000:]
        urls = {m.group(1): m.group(2) for s in seen if (m := URL_LINE.match(s))}
        assert "_bundled/serve/config.yaml" in seen[0], seen[0]
        http = requests.Session()
        http.trust_env = False  # loopback only
        assert http.get(f"{urls['Serve API']}/healthz", timeout=60).json() == {"status": "ok"}
        answer = http.post(f"{urls['Serve API']}/predict", timeout=120,
                           data=(installed["cwd"] / "astronaut.jpg").read_bytes(),
                           headers={"Content-Type": "image/jpeg"}).json()
        assert len(answer["faces"]) == 1 and len(answer["faces"][0]["age_interval"]) == 2
        assert http.get(f"{urls['Streamlit app']}/_stcore/health", timeout=60).status_code == 200

        tree = process_tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_S) == 0
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
        for url in urls.values():
            assert port_is_free(int(url.rsplit(":", 1)[1])), f"{url} still listens"
    finally:
        if proc.poll() is None:
            leftovers = process_tree(proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                pass
            stop_processes(leftovers, timeout=10)
