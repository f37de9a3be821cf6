"""Experiment tracking with MLflow: every training run (so every Tune trial) is an MLflow run.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (a team's server), else a SQLite file per
storage path, ``sqlite:///<storage_path>/mlflow.db``, with artifacts under
``<storage_path>/mlartifacts``, so runs of one project are compared in one place.
``tracking.mlflow: false`` turns it off.

How metrics get there: a Ray Train ``UserCallback`` (``MLflowEpochLogger``), which Ray Train
calls in its controller after every ``ray.train.report``, logs rank 0's metrics of that epoch as
they happen. The training loop stays unaware of MLflow, nothing is logged twice however many
workers there are, and the driver owns the run from start to end: it checks the store and opens
the run before Ray starts (a bad URI is one ``UserError`` up front), logs the config as
parameters, and at the end ``model.pt``, ``curves.png`` and ``summary.json`` as artifacts.
Ray's ``setup_mlflow`` would log from the worker instead, and ``MLflowLoggerCallback`` only
works for Tune; both open their own runs, so a plain ``faceage train`` is simpler this way.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from faceage.config import Config
from faceage.errors import UserError

RUN_FILE = "mlflow_run.json"  # in the run folder: the MLflow run a resumed run continues
ENV_URI = "MLFLOW_TRACKING_URI"


def tracking_uri(cfg: Config) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the storage path."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get(ENV_URI):
        return os.environ[ENV_URI]
    return f"sqlite:///{storage_root(cfg) / 'mlflow.db'}"


def storage_root(cfg: Config) -> Path:
    return Path(cfg.storage_path).expanduser().resolve()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists (stages, sources) as JSON text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value)
        else:
            out[name] = str(value)
    return out


def epoch_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of one epoch's report (``stage_name`` and the epoch index itself left out)."""
    return {k: float(v) for k, v in metrics.items()
            if k not in ("epoch", "stage_name") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(float(v))}


def _where(uri: str) -> str:
    return (f"MLflow tracking URI {uri!r} (from {ENV_URI} or tracking.uri; "
            "tracking.mlflow=false turns tracking off)")


@contextmanager
def _no_retries():
    """Fail fast while checking: MLflow's HTTP client otherwise retries for minutes."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                             "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_reachable(uri: str) -> None:
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "localhost", port), timeout=5).close()
    except OSError as exc:
        raise UserError(f"{_where(uri)}: nothing answers at {parsed.hostname}:{port} ({exc}). "
                        "Start the tracking server or fix the URI.") from None


@dataclass
class TrackedRun:
    """The MLflow run of one training run, opened on the driver."""

    uri: str
    run_id: str
    experiment_id: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def callback(self):
        return MLflowEpochLogger(self.uri, self.run_id)

    def log_artifacts(self, *paths: Path) -> None:
        try:
            client = self.client()
            for p in paths:
                if Path(p).is_file():
                    client.log_artifact(self.run_id, str(p))
        except Exception as exc:  # the model is on disk already: say so, do not fail the run
            print(f"[faceage] MLflow: could not store the artifacts of run {self.run_id}: {exc}")

    def finish(self, status: str) -> None:
        """End the run as FINISHED, FAILED or KILLED (interrupted)."""
        try:
            self.client().set_terminated(self.run_id, status)
        except Exception as exc:
            print(f"[faceage] MLflow: could not close run {self.run_id}: {exc}")


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _artifact_root(uri: str) -> str | None:
    """A SQLite store keeps artifacts beside it (MLflow's default is ./mlruns of the cwd)."""
    db = _sqlite_file(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except Exception:  # created meanwhile by a concurrent trial
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _run_name(cfg: Config, uri: str) -> str:
    """The run folder relative to a SQLite store's folder (``<tune>/<trial>/train`` for a trial),
    else the run's name."""
    db = _sqlite_file(uri)
    if db is not None:
        try:
            return str(cfg.run_dir().relative_to(db.parent))
        except ValueError:
            pass
    return cfg.name


@contextmanager
def _store_errors(cfg: Config, uri: str):
    try:
        with _no_retries():
            yield
    except UserError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserError(f"{_where(uri)}: cannot reach or create experiment "
                        f"{cfg.tracking.experiment!r}: {type(exc).__name__}: {first}") from None


def check_store(cfg: Config) -> str | None:
    """Reach the store and find or create the experiment; returns the tracking URI (None when
    tracking is off). Every way the store can be wrong is one ``UserError``."""
    if not cfg.tracking.mlflow:
        return None
    uri = tracking_uri(cfg)
    _check_reachable(uri)
    with _store_errors(cfg, uri):
        from mlflow.tracking import MlflowClient

        _experiment_id(MlflowClient(tracking_uri=uri), cfg.tracking.experiment, uri)
    return uri


def open_run(cfg: Config) -> TrackedRun | None:
    """Check the store, find or create the experiment and open this run's MLflow run.

    ``cfg`` has absolute paths and its run folder exists (after ``preflight`` and
    ``open_run_folder``). A run folder
    with an MLflow run of an earlier attempt (a resume) continues that run.
    """
    if not cfg.tracking.mlflow:
        return None
    uri = tracking_uri(cfg)
    _check_reachable(uri)
    earlier = run_reference(cfg.run_dir())
    with _store_errors(cfg, uri):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, cfg.tracking.experiment, uri)
        if earlier is not None and earlier["uri"] == uri:
            try:
                run = client.get_run(earlier["run_id"])
            except Exception:  # deleted from the store: start a new one
                run = None
            if run is not None and run.info.experiment_id == exp_id:
                client.update_run(run.info.run_id, status="RUNNING")
                return TrackedRun(uri, run.info.run_id, exp_id)
        run = client.create_run(exp_id, run_name=_run_name(cfg, uri),
                                tags={"faceage.run_dir": str(cfg.run_dir())})
        items = [Param(k, v[:6000]) for k, v in flatten(cfg.to_dict()).items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i:i + 100])
    (cfg.run_dir() / RUN_FILE).write_text(json.dumps({"uri": uri, "run_id": run.info.run_id}))
    return TrackedRun(uri, run.info.run_id, exp_id)


def _user_callback_base():
    import ray.train

    return ray.train.UserCallback


class MLflowEpochLogger(_user_callback_base()):
    """A Ray Train callback (it runs in the controller): each epoch's metrics to MLflow as
    they are reported, with the epoch as the step."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self._client = uri, run_id, None

    def after_report(self, run_context, metrics, checkpoint):
        from mlflow.entities import Metric

        if not metrics:
            return
        report = metrics[0]
        step = int(report.get("epoch", 0))
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in epoch_metrics(report).items()]
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri)
            self._client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:  # tracking must not stop training
            print(f"[faceage] MLflow: could not log epoch {step + 1}: {exc}")


# -- after the run: trials Tune stopped, evaluation reports ---------------------------------------


def run_reference(run_dir: Path) -> dict | None:
    """``{"uri", "run_id"}`` of the MLflow run of a run folder (None when it was not tracked)."""
    try:
        ref = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {"uri": ref["uri"], "run_id": ref["run_id"]} if "run_id" in ref else None


def close_run(run_dir: Path, status: str, replace: tuple[str, ...] = ("RUNNING",)) -> None:
    """Set a run folder's MLflow run to ``status`` (KILLED, FAILED) if it is in ``replace``.

    When ASHA stops a Tune trial, Tune ends the trial's actor: ``run_training`` either never
    gets to close its run, or sees the stop as an error and closes it as FAILED; the search's
    driver, which knows why the trial ended, closes it afterwards."""
    ref = run_reference(run_dir)
    if ref is None:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=ref["uri"])
        if client.get_run(ref["run_id"]).info.status in replace:
            client.set_terminated(ref["run_id"], status)
    except Exception as exc:
        print(f"[faceage] MLflow: could not close run {ref['run_id']}: {exc}")


def attach_report(metadata: dict, files: list[Path], metrics: dict[str, float],
                  say=print) -> str | None:
    """Add an evaluation's report files (under ``evaluate/``) and its metrics to the MLflow run
    that trained the model, when the model file names one and its store answers; returns the run
    id, or None. Never fails the evaluation: the report is on disk either way."""
    ref = metadata.get("mlflow") or {}
    if not ref.get("run_id"):
        return None
    uri = ref["uri"]
    try:
        if (db := _sqlite_file(uri)) is not None and not db.is_file():
            return None  # a model file from another machine: its store is not here
        _check_reachable(uri)
        with _no_retries():
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            client.get_run(ref["run_id"])
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and math.isfinite(float(v))]
            if batch:
                client.log_batch(ref["run_id"], metrics=batch)
            for f in files:
                if Path(f).is_file():
                    client.log_artifact(ref["run_id"], str(f), artifact_path="evaluate")
    except Exception as exc:
        say(f"[faceage] MLflow: the report was not added to run {ref['run_id']} at {uri}: "
            f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}")
        return None
    say(f"[faceage] MLflow: report added to run {ref['run_id']} ({uri})")
    return ref["run_id"]
