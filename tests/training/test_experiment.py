"""faceage.training.experiment, MLflow tracking (issue 13): a training run is an MLflow run with
its config as parameters, one value per epoch of each metric, and the model as an artifact; a bad
tracking URI stops the run before Ray starts. (``tracking.mlflow=false`` creating no store is
checked in tests/training/test_train.py's ``test_split_csv_is_exactly_what_trained``.)"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from test_train import tiny_config

from faceage.errors import UserError
from faceage.training.driver import run_training
from faceage.training.experiment import flatten, tracking_uri

EPOCHS = "schedule.stages=[{name: head, train: 0, epochs: 1, lr: 0.002}, " \
         "{name: top, train: 2, epochs: 1, lr: 0.001}]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_flatten_gives_dotted_keys():
    flat = flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2], "f": None})
    assert flat == {"a.b": "1", "a.c.d": "x", "e": "[1, 2]", "f": "None"}


def test_default_store_is_sqlite_in_storage_path(tiny_utkface, tmp_path):
    cfg = tiny_config(tiny_utkface, tmp_path, "t", tmp_path / "cache")
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "nosuchscheme://somewhere"])
def test_bad_tracking_uri_fails_before_training(tiny_utkface, tmp_path, monkeypatch, uri):
    import ray

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(port=free_port()))
    cfg = tiny_config(tiny_utkface, tmp_path, "bad", tmp_path / "cache")
    # Earlier tests of the session may have left the shared ray_local instance up: what counts
    # is that this run did not start one.
    ray_before = ray.is_initialized()
    with pytest.raises(UserError, match="MLflow tracking URI") as err:
        run_training(cfg)
    assert "MLFLOW_TRACKING_URI" in str(err.value)
    assert ray.is_initialized() == ray_before
    assert not list((tmp_path / "bad").glob("checkpoint_*"))


@pytest.mark.slow
@pytest.mark.ray
def test_training_run_is_logged(tiny_utkface, tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tiny_utkface, tmp_path, "tracked", tmp_path / "cache", EPOCHS,
                      "tracking.experiment=tiny")
    outcome = run_training(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.input_size"] == "32"
    assert run.data.params["train.batch_size"] == "8"
    assert run.data.params["tracking.experiment"] == "tiny"
    for key in ("val_mae", "train_loss", "images_per_s", "val_interval_width"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key
    maes = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_mae"),
                                    key=lambda m: m.step)]
    assert maes == pytest.approx([h["val_mae"] for h in outcome.history])
    assert any(k.startswith("lr_") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "curves.png", "summary.json"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "model.pt", str(tmp_path / "dl")))
    assert local.stat().st_size == outcome.model_path.stat().st_size
    assert str(tmp_path.resolve() / "mlartifacts") in run.info.artifact_uri

    # `faceage evaluate` adds its report and figures to the run named in the model file.
    from faceage.cli import main as cli_main
    from faceage.inference.modelfile import load_model_file

    assert load_model_file(outcome.model_path).metadata["mlflow"]["run_id"] == run.info.run_id
    report = tmp_path / "eval" / "val.json"
    assert cli_main(["evaluate", "--model", str(outcome.model_path), "--data",
                     str(tiny_utkface), "--split", "val", "--report", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval_val_mae"] == pytest.approx(evaluated["metrics"]["mae"])
    assert {"evaluate/val.json", "evaluate/val.png", "evaluate/val.csv"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
