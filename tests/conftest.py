"""Shared, session-scoped test fixtures (add yours; do not rewrite others')."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faceage.runtime import apply_ray_env_defaults

# Before anything imports Ray (see faceage.runtime.RAY_ENV_DEFAULTS).
apply_ray_env_defaults()
# Two loaded cores can take more than Ray Train's default 60 s to start a worker group.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared"
UTKFACE = SHARED / "data" / "utkface"


@pytest.fixture(scope="session")
def untrained_model_file(tmp_path_factory) -> Path:
    """A real model file (MobileNetV2, untrained weights, 96 px input): plumbing, not accuracy."""
    from testkit.models import untrained_model_file as make_untrained

    return make_untrained(tmp_path_factory.mktemp("models") / "untrained.pt", "mobilenet_v2",
                          head_hidden=64, input_size=96, name="faceage-untrained-test")


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    """NASA's public-domain portrait of Eileen Collins (512x512, one face)."""
    return TEST_DATA / "astronaut.jpg"


@pytest.fixture(scope="session")
def rocket_path() -> Path:
    """A public-domain launch photo without a face."""
    return TEST_DATA / "rocket.jpg"


# -- training (issue 2) --------------------------------------------------------------------------


def write_utkface_images(folder: Path, count: int, size: int = 40, seed: int = 0) -> list[Path]:
    """JPEGs named like UTKFace files (``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg``), one colour
    per image with a little noise; the shade follows the age, so there is something to learn."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        age = int(rng.integers(1, 91))
        colour = np.array([age * 2.5, 120, 255 - age * 2.5])
        pixels = colour + rng.normal(0, 12, (size, size, 3))
        path = folder / f"{age}_{i % 2}_{i % 5}_20170117{seed:03d}{i:06d}.jpg.chip.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def utkface_images():
    """``write_utkface_images(folder, count, size=40, seed=0)``, for tests that need odd files."""
    return write_utkface_images


@pytest.fixture(scope="session")
def tiny_utkface(tmp_path_factory) -> Path:
    """160 generated UTKFace-named images: enough for a 2-worker run at 32 px in seconds."""
    folder = tmp_path_factory.mktemp("tiny_utkface")
    write_utkface_images(folder, 160)
    return folder


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (2 CPUs, no dashboard), never someone else's."""
    import ray

    from faceage.runtime import start_ray

    if not ray.is_initialized():
        start_ray(None, num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


# -- Serve (issue 4) -----------------------------------------------------------------------------

# serve/config.yaml as the tests run it: their own model, a free port, the body and pixel
# limits `faceage up` runs with (16 MiB, 64 MP: the phone-photo tests work at them), and a frame
# count small enough that the overload cases are cheap to reach. Requests may wait out a replica
# restart on a loaded machine (the fault test) rather than time out at the proxy.
SERVE_TEST_OVERRIDES = {
    "http_options.request_timeout_s": 240,
    "args.max_frames": 8,
    "deployments.Ingress.max_ongoing_requests": 16,
    "deployments.Ingress.max_queued_requests": 16,
}


@pytest.fixture(scope="session")
def serve_model_file(untrained_model_file) -> Path:
    """The model the session's Serve runs: the shipped one (what users get), else untrained."""
    from faceage.inference.modelfile import DEFAULT_MODEL_PATH

    return DEFAULT_MODEL_PATH if DEFAULT_MODEL_PATH.exists() else untrained_model_file


@pytest.fixture(scope="session")
def serve_corrections_dir(tmp_path_factory) -> Path:
    """Where the session's Serve stores corrections (POST /corrections is on in the tests)."""
    return tmp_path_factory.mktemp("corrections")


@pytest.fixture(scope="session")
def serve_app(serve_model_file, serve_corrections_dir, tmp_path_factory):
    """serve/config.yaml on a private Ray instance (2 CPUs) in a child process, for the session.

    Its own process and Ray instance, not the session's ``ray_local``: Serve holds CPUs for the
    whole session, which Ray Train's workers in the same instance would wait for.
    """
    from faceage.serving.local_process import LocalServe

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    service = LocalServe({**SERVE_TEST_OVERRIDES, "args.model_path": str(serve_model_file),
                          "args.corrections.dir": str(serve_corrections_dir)},
                         num_cpus=2, log_path=log, timeout=900)
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def serve_url(serve_app) -> str:
    """Base URL (http://127.0.0.1:PORT, no trailing slash) of the session's Serve application."""
    return serve_app.url


# -- the wheel (issue 22): built once, installed into a fresh venv --------------------------------

# A loaded 2-core machine: installing from uv's cache takes a minute or two.
INSTALL_S = 1200


def run_checked(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float = INSTALL_S):
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """``uv build`` of this checkout: the sdist, then the wheel built from that sdist."""
    import shutil

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    out = tmp_path_factory.mktemp("dist")
    run_checked([uv, "build", "-o", str(out)], cwd=REPO)
    (built,) = out.glob("faceage-*.whl")
    return built


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed by ``uv pip`` (dependencies resolved from the
    index; uv's cache makes torch cheap), and an empty folder, not a checkout, to run in."""
    import shutil
    import sys

    uv = shutil.which("uv")
    root = tmp_path_factory.mktemp("wheel-venv")
    venv = root / "venv"
    run_checked([uv, "venv", "-q", "-p", sys.executable, str(venv)], cwd=root)
    run_checked([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                 str(wheel)], cwd=root)
    work = root / "elsewhere"
    work.mkdir()
    shutil.copy(TEST_DATA / "astronaut.jpg", work / "astronaut.jpg")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return {"venv": venv, "cwd": work, "env": env, "faceage": str(venv / "bin" / "faceage")}
