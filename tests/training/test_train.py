"""Ray Train end to end on generated images: real TorchTrainer runs with 2 CPU workers.

A worker killed mid-run (SIGKILL) must resume at the right stage and epoch; a crashed run must
resume when started again under the same name; a ``ray job submit`` against a head node we start
ourselves must succeed. Driver-side checks must fail fast with one clear message.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

from faceage.cli import main as cli_main
from faceage.config import load_config
from faceage.errors import TrainingFailed, UserError
from faceage.inference.modelfile import load_model_file
from faceage.training.driver import run_training
from testkit.ray_head import RayHead

REPO = Path(__file__).resolve().parents[2]
TWO_STAGES = "schedule.stages=[{name: head, train: 0, epochs: %d, lr: 0.002}, " \
             "{name: top, train: 2, epochs: %d, lr: 0.001}]"


def tiny_settings(data: Path, storage: Path, name: str, cache: Path) -> list[str]:
    """Overrides for a run that takes seconds: 32 px, a small head, batches of 8."""
    return [
        f"data.path={data}", f"storage_path={storage}", f"name={name}", "data.limit=null",
        f"data.cache_dir={cache}", "model.pretrained=none", "model.input_size=32",
        "model.head_hidden=16", "train.batch_size=8", "train.ray_log_level=INFO",
    ]


def tiny_config(data: Path, storage: Path, name: str, cache: Path, *extra: str):
    return load_config(None, [*tiny_settings(data, storage, name, cache),
                              "scaling.num_workers=2", "scaling.cpus_per_worker=1", *extra])


@pytest.fixture(scope="module")
def decode_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decoded")


def reported_epochs_callback(path: Path):
    """A Ray Train callback (it runs in the controller) that appends each epoch whose checkpoint
    Ray Train has registered to ``path``: a checkpoint folder alone is not yet resumable."""
    import ray.train

    class ReportedEpochs(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                with open(path, "a") as f:
                    f.write(f"{metrics[0]['epoch']}\n")

    return ReportedEpochs()


def registered_epochs(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def train_worker_processes() -> list[psutil.Process]:
    """This session's Ray Train workers: the local Ray instance runs as our child processes."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_a_worker_after(reported: Path, epoch: int, run: threading.Thread) -> int:
    """SIGKILL one training worker once Ray Train registered the checkpoint of ``epoch``.

    Returns the last epoch registered before the kill: the run must resume after it.
    """
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert run.is_alive(), "the run ended before a worker could be killed"
        done = registered_epochs(reported)
        if done and done[-1] >= epoch:
            workers = train_worker_processes()
            if workers:
                workers[-1].send_signal(signal.SIGKILL)
                return done[-1]
        time.sleep(0.05)
    pytest.fail(f"Ray Train registered no checkpoint of epoch {epoch}")


def start_run(cfg, callbacks: list) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["outcome"] = run_training(cfg, callbacks)
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def faces(folder: Path, count: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())[:count]]


def assert_epochs_once_in_order(history: list[dict], stages: list[int]) -> None:
    assert [h["epoch"] for h in history] == list(range(len(stages)))
    assert [h["stage"] for h in history] == stages


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_killed_worker_resumes_at_the_right_epoch_and_exports(ray_local, tiny_utkface,
                                                              decode_cache, tmp_path):
    # A checkpoint every epoch: the kill must fall between two of them, mid-stage.
    cfg = tiny_config(tiny_utkface, tmp_path, "fault", decode_cache,
                      "max_failures=1", TWO_STAGES % (1, 4), "train.checkpoint_every=1")
    reported = tmp_path / "reported.txt"
    run, box = start_run(cfg, [reported_epochs_callback(reported)])
    last_saved = kill_a_worker_after(reported, epoch=1, run=run)
    run.join(timeout=900)
    assert "error" not in box, box.get("error")
    outcome = box["outcome"]

    # Every epoch exactly once, each in its stage; one resume, mid-stage, with the optimizer.
    assert_epochs_once_in_order(outcome.history, [0, 1, 1, 1, 1])
    assert len(outcome.resumes) == 1
    resume = outcome.resumes[0]
    assert last_saved + 1 <= resume["epoch"] <= 4
    assert resume["stage"] == 1 and resume["workers"] == 2
    assert resume["optimizer_restored"] is True
    assert set(outcome.history[0]) >= {"lr_head"} and "lr_block6" not in outcome.history[0]
    assert {"lr_block5", "lr_block6", "lr_head"} <= set(outcome.history[-1])

    # Both workers' validation shards were gathered: each epoch saw every val image once.
    split = pd.read_csv(outcome.run_dir / "split.csv")
    n_train, n_val = (split["split"] == "train").sum(), (split["split"] == "val").sum()
    assert all(h["val_images"] == n_val for h in outcome.history)
    assert all(h["train_images"] == n_train // 16 * 16 for h in outcome.history)

    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["resumes"] == outcome.resumes and len(summary["history"]) == 5
    assert (outcome.run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (outcome.run_dir / "config.yaml").is_file()

    model = load_model_file(outcome.model_path)
    assert model.metadata["metrics"]["val_mae"] == pytest.approx(outcome.best["val_mae"])
    assert model.metadata["data"]["train"] == n_train and model.input_size == 32
    assert model.metadata["config"]["name"] == "fault"
    ages = model.predict(faces(tiny_utkface, 5))
    assert ages.shape == (5,) and np.isfinite(ages).all()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_crashed_run_fails_readably_and_resumes_when_run_again(ray_local, tiny_utkface,
                                                                decode_cache, tmp_path, capsys):
    cfg = tiny_config(tiny_utkface, tmp_path, "rerun", decode_cache,
                      "max_failures=0", TWO_STAGES % (2, 3), "train.checkpoint_every=1")
    reported = tmp_path / "reported.txt"
    run, box = start_run(cfg, [reported_epochs_callback(reported)])
    last_saved = kill_a_worker_after(reported, epoch=1, run=run)
    run.join(timeout=900)
    error = box.get("error")
    assert isinstance(error, TrainingFailed), error
    message = str(error)
    assert "worker" in message and "run the same command again to resume" in message
    assert str(tmp_path / "rerun") in message and len(message.splitlines()) <= 3

    capsys.readouterr()
    outcome = run_training(cfg)
    assert "has checkpoints of an earlier run: resuming it" in capsys.readouterr().out
    assert_epochs_once_in_order(outcome.history, [0, 0, 1, 1, 1])
    assert len(outcome.resumes) == 1
    resume = outcome.resumes[0]
    assert last_saved + 1 <= resume["epoch"] <= 4 and resume["stage"] == 1
    # Resuming at a stage's first epoch builds that stage's optimizer afresh, as a full run does.
    assert resume["optimizer_restored"] is (resume["epoch"] != 2)


@pytest.mark.parametrize("override, message", [
    ("model.backbone=vgg11", "unknown backbone 'vgg11'"),
    ("schedule.stages=[{train: 12}]", "stage train=12: this backbone has 7 groups"),
    ("schedule.stages=[{train: [block9]}]", "unknown groups ['block9']"),
    ("model.pretrained=/nowhere/weights.pth", "pretrained weights file not found"),
    ("train.batch_size=4096", "fewer than one step needs"),
    ("data.split.val=0.0", "no images fell into the validation split"),
    ("storage_path=s3://bucket/runs", "object storage is not supported"),
])
def test_preflight_stops_bad_runs_with_one_message(tiny_utkface, tmp_path, override, message):
    cfg = tiny_config(tiny_utkface, tmp_path, "bad", tmp_path / "cache", override)
    with pytest.raises(UserError) as err:
        run_training(cfg)
    assert message in str(err.value)


def test_preflight_names_missing_or_empty_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, message in ((tmp_path / "missing", "data directory not found"),
                            (empty, "no UTKFace images found")):
        with pytest.raises(UserError, match=f"{message}.*{folder}"):
            run_training(tiny_config(folder, tmp_path, "x", tmp_path / "cache"))


def test_rerun_with_another_model_is_refused(tiny_utkface, tmp_path):
    earlier = tiny_config(tiny_utkface, tmp_path, "taken", tmp_path / "cache")
    run_dir = tmp_path / "taken"
    (run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        "model: {backbone: resnet50, input_size: 32, head_hidden: 16}\n")
    with pytest.raises(UserError, match="model.backbone='resnet50'.*cannot be resumed"):
        run_training(earlier)


def test_cli_prints_the_message_without_a_traceback(tiny_utkface, tmp_path, capsys):
    code = cli_main(["train", "--set", *tiny_settings(tiny_utkface, tmp_path, "x", tmp_path),
                     "model.backbone=alexnet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown backbone 'alexnet'")
    assert "Traceback" not in err


def test_python_m_faceage_train_goes_through_the_cli():
    """``python -m faceage.train ARGS`` is ``faceage train ARGS`` (its help, which loads no
    torch: a fresh interpreter that imports the training code takes 10-25 s here)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "faceage.train", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: faceage train ") and "--config" in proc.stdout


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_split_csv_is_exactly_what_trained(ray_local, utkface_images, tmp_path, capsys):
    """Read and split once, on the driver: an unreadable file is in neither split.csv nor the
    run's data summary, and the workers train on the very same table. With
    ``tracking.mlflow=false`` no MLflow store appears."""
    data = tmp_path / "faces"
    images = utkface_images(data, 60, seed=7)
    broken = images[5]
    broken.write_bytes(broken.read_bytes()[:300])  # a truncated JPEG
    cfg = load_config(None, [*tiny_settings(data, tmp_path, "skip", tmp_path / "cache"),
                             "scaling.num_workers=1", "scaling.cpus_per_worker=1",
                             "train.max_steps_per_epoch=2", "train.eval_tta=false",
                             "schedule.stages=[{name: head, train: 0, epochs: 1}]",
                             "tracking.mlflow=false"])
    outcome = run_training(cfg)
    out = capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()
    assert not (outcome.run_dir / "mlflow_run.json").exists()

    split = pd.read_csv(outcome.run_dir / "split.csv")
    assert len(split) == 59 and str(broken) not in set(split["path"])
    counts = split["split"].value_counts()
    data_summary = json.loads((outcome.run_dir / "summary.json").read_text())["data"]
    assert data_summary["images"] == len(split)
    for part in ("train", "val", "test"):
        assert data_summary[part] == counts.get(part, 0), part
    assert data_summary["skipped"] == {"unreadable or truncated files": 1}
    model = load_model_file(outcome.model_path)
    assert model.metadata["data"]["train"] == counts["train"]
    assert outcome.history[0]["val_images"] == counts["val"]
    # A new run's head predicts a scale; the interval is calibrated on every val image.
    assert model.metadata["uncertainty"] == "laplace" and model.net.uncertainty == "laplace"
    cal = model.metadata["interval_calibration"]
    assert cal["method"] == "scaled-residual" and cal["samples"] == counts["val"]
    assert model.calibration.samples == counts["val"]
    metrics = model.metadata["metrics"]
    assert 0 <= metrics["val_interval_coverage"] <= 1 and metrics["val_interval_width"] > 0
    best = json.loads((outcome.run_dir / "summary.json").read_text())["best"]
    assert best["val_interval_width"] == pytest.approx(metrics["val_interval_width"])
    assert "age interval (80 %, calibrated on the val split): covers" in out
    est = model.estimate([np.asarray(Image.open(p).convert("RGB")) for p in images[:3]])
    assert ((0 <= est.low) & (est.low <= est.age) & (est.age <= est.high)).all()
    assert out.count("skipped 1 unreadable or truncated files") == 1
    assert out.count(f"[faceage] split: train {counts['train']}, val {counts['val']}") == 1


def test_relative_paths_in_a_ray_job_get_a_clear_message(tiny_utkface, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"storage_path 'runs' is relative.*=\$PWD/runs"):
        run_training(tiny_config(tiny_utkface, Path("runs"), "job", tmp_path))
    with pytest.raises(UserError, match=r"data.path '../data' not found.*data.path=\$PWD/../data"):
        run_training(tiny_config(Path("../data"), tmp_path, "job", tmp_path))


# -- `ray job submit` against a head node of our own -------------------------------------------


@pytest.fixture
def ray_head(tmp_path_factory):
    """``ray start --head --block`` with the dashboard and token auth on, on ports Ray picks.

    Ports picked here and released before `ray start` bound them once let another Ray instance
    of the session take the runtime-env agent's, and the job failed with "403 Invalid
    authentication token" (testkit/ray_head.py)."""
    with RayHead(dashboard=True, log_dir=tmp_path_factory.mktemp("ray_head")) as head:
        yield {"address": head.dashboard_url, "token": head.token, "env": head.env}
        # Shown with a failed test's output: a port clash or a refused token, in Ray's words.
        if why := head.diagnose():
            print(f"Ray head diagnosis:\n{why}", file=sys.stderr)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_ray_job_submit_against_a_local_head(ray_head, tiny_utkface, decode_cache, tmp_path):
    import requests

    storage = tmp_path / "runs"
    submission = f"faceage-test-{secrets.token_hex(4)}"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit",
           "--address", ray_head["address"], "--working-dir", str(REPO),
           "--submission-id", submission, "--",
           "python", "-m", "faceage.train", "--config", "configs/train.yaml", "--set",
           *tiny_settings(tiny_utkface, storage, "job", decode_cache),
           "scaling.num_workers=1", "scaling.cpus_per_worker=1", "max_failures=0",
           "train.eval_tta=false", TWO_STAGES % (1, 1)]
    for _ in range(20):  # the head answers before its node's job agent has registered
        done = subprocess.run(cmd, env=ray_head["env"], cwd=REPO, capture_output=True,
                              text=True, timeout=1100)
        logs = done.stdout + done.stderr
        if "No available agent to submit job" not in logs:
            break
        time.sleep(5)
    assert done.returncode == 0, logs[-4000:]

    headers = {"Authorization": f"Bearer {ray_head['token']}"}
    job = requests.get(f"{ray_head['address']}/api/jobs/{submission}", headers=headers,
                       timeout=30).json()
    assert job["status"] == "SUCCEEDED", job
    assert "[faceage] epoch 1/2 [head]" in logs and "[faceage] epoch 2/2 [top]" in logs
    assert "best val MAE" in logs
    run_dir = storage / "job"
    assert load_model_file(run_dir / "model.pt").metadata["config"]["name"] == "job"
    assert (run_dir / "curves.png").stat().st_size > 10_000

    # The dashboard's Train page has the run, finished.
    runs = requests.get(f"{ray_head['address']}/api/train/v2/runs/v1", headers=headers,
                        timeout=30).json()["train_runs"]
    mine = [r for r in runs if r["name"] == "job"]
    assert mine and mine[0]["status"] == "FINISHED", runs
