"""Checks on the driver before any worker starts, so mistakes end in one clear message.

``preflight`` is the one place a training run (and every shape of a Tune search) is checked
before Ray starts: paths inside a Ray job, the storage path, the backbone, its weights and the
schedule's groups, the data (read and split: ``RunData.read``) and its split's counts against the
batch size, and an earlier run of the same name. It creates nothing. Two checks need more than
that and run where they can: ``check_cluster_fits`` once Ray is up, ``check_split_counts`` again
once the images are decoded (faceless and unreadable ones dropped).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from faceage.config import PRETRAINED_WORDS, Config
from faceage.data.run_data import RunData
from faceage.errors import UserError
from faceage.models.network import build_model_from
from faceage.training.schedule import UnfreezeSchedule


@dataclass
class Preflight:
    """What ``preflight`` found: the config with absolute paths, the run's data read and split
    (no image decoded yet), and whether an earlier run of this name is resumed."""

    cfg: Config
    data: RunData
    resuming: bool


def preflight(cfg: Config, data: RunData | None = None) -> Preflight:
    """Every check that needs neither Ray nor decoded images, in one place; creates nothing.

    A relative path inside a Ray job, object storage, an unknown backbone, unavailable
    pretrained weights, stages naming groups the backbone lacks, missing or empty data, too
    little data for the batch size and an incompatible earlier run of the same name all end
    here with one message. ``data``: the run data already read for these same ``cfg.data``
    settings (Tune's trials of one data shape), else it is read here.
    """
    check_job_paths(cfg)
    cfg = cfg.with_absolute_paths()
    check_storage_path(cfg)
    check_model_and_schedule(cfg)
    data = data if data is not None else RunData.read(cfg.data)
    check_split_counts(cfg, data.table)
    return Preflight(cfg, data, check_resume_compatible(cfg, cfg.run_dir()))


def _ray_job_working_dir() -> str | None:
    """The uploaded copy of ``--working-dir`` this process runs in as a Ray job, if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


def check_job_paths(cfg: Config) -> None:
    """In a Ray job, relative paths resolve inside the job's temporary copy of the working dir.

    Outputs written there vanish with the copy, and data beside the checkout is not in it, so
    say so up front instead of failing on a path the user never typed.
    """
    job_dir = _ray_job_working_dir()
    if job_dir is None:
        return

    def relative(p: str | None) -> bool:
        return bool(p) and "://" not in p and not os.path.isabs(os.path.expanduser(p))

    copy = (f"this Ray job runs in an uploaded copy of --working-dir ({job_dir}); relative "
            "paths point into that copy.")

    def hint(key: str, value: str) -> str:
        if key.startswith("data.sources["):  # not a --set key: the config file lists them
            return f"{copy} Give the sources absolute paths in the config file"
        return f"{copy} Pass an absolute path, e.g. --set {key}=$PWD/{value}"

    if relative(cfg.storage_path):
        raise UserError(f"storage_path {cfg.storage_path!r} is relative: the run would be written "
                        "into the job's temporary copy and lost. "
                        + hint("storage_path", cfg.storage_path))
    sources = cfg.data.sources
    # One source is what data.path sets; several are listed in the config file.
    paths = ([("data.path", sources[0].path)] if len(sources) == 1 else
             [(f"data.sources[{i}].path", s.path) for i, s in enumerate(sources)])
    for key, value in (*paths, ("data.cache_dir", cfg.data.cache_dir),
                       ("model.pretrained", cfg.model.pretrained)):
        if key == "model.pretrained" and value in PRETRAINED_WORDS:
            continue
        if relative(value) and not os.path.exists(value):
            raise UserError(f"{key} {value!r} not found: " + hint(key, value))
    if relative(cfg.model.weights_dir) and not os.path.isdir(cfg.model.weights_dir):
        print(f"[faceage] note: model.weights_dir {cfg.model.weights_dir!r} is not in the job's "
              "copy of the working dir; pass an absolute path if the weights are there",
              file=sys.stderr)


def check_resume_compatible(cfg: Config, run_dir: Path) -> bool:
    """True when ``run_dir`` holds checkpoints of an earlier run that this config can resume."""
    if not any(run_dir.glob("checkpoint_*")):
        return False
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = (yaml.safe_load(saved.read_text()) or {}).get("model") or {}
        for key in ("backbone", "head_hidden", "input_size", "uncertainty"):
            if key in old and old[key] != getattr(cfg.model, key):
                raise UserError(
                    f"run {cfg.name!r} in {run_dir} was trained with model.{key}={old[key]!r}, "
                    f"not {getattr(cfg.model, key)!r}: its checkpoints cannot be resumed. "
                    "Choose another name (--set name=...) or delete the folder to start over.")
    return True


def check_split_counts(cfg: Config, table: pd.DataFrame) -> None:
    """Enough training images for one step of every worker, and at least one to validate on."""
    counts = table["split"].value_counts()
    n_train, n_val = int(counts.get("train", 0)), int(counts.get("val", 0))
    per_step = cfg.train.batch_size * cfg.scaling.num_workers
    sources = cfg.data.sources
    where = sources[0].path if len(sources) == 1 else "data.sources"
    if n_train < per_step:
        raise UserError(
            f"{where}: {n_train} training images are fewer than one step needs "
            f"(train.batch_size {cfg.train.batch_size} x {cfg.scaling.num_workers} workers); "
            "lower train.batch_size or add data")
    if n_val == 0:
        raise UserError(f"{where}: no images fell into the validation split "
                        f"(data.split.val={cfg.data.split.val}); raise it or add data")
    if "source" in table.columns:
        # Every source is scored on its own validation images (val_mae averages them).
        for name, rows in table.groupby("source", sort=False):
            if not (rows["split"] == "val").any():
                raise UserError(f"data source {name!r}: none of its {len(rows)} images fell "
                                f"into the validation split (data.split.val="
                                f"{cfg.data.split.val}); raise its limit or data.split.val")


def check_storage_path(cfg: Config) -> None:
    if "://" in cfg.storage_path:
        raise UserError(f"storage_path {cfg.storage_path!r}: object storage is not supported "
                        "yet; use a local or shared file system path")


def check_model_and_schedule(cfg: Config) -> None:
    """The backbone exists, its pretrained weights load and the schedule's stages name its layer
    groups."""
    model = build_model_from(cfg.model)
    UnfreezeSchedule(cfg.schedule, model.group_names(), steps_per_epoch=1)


def check_cluster_fits(cfg: Config) -> None:
    """On a local Ray instance we started, a request larger than the machine would wait forever."""
    import ray

    have = ray.cluster_resources()
    s = cfg.scaling
    need_cpu = s.num_workers * s.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise UserError(
            f"scaling asks for {s.num_workers} workers x {s.cpus_per_worker:g} CPUs = "
            f"{need_cpu:g} CPUs, but this machine offers {have.get('CPU', 0):g}; lower "
            "scaling.num_workers or scaling.cpus_per_worker")
    if s.use_gpu and have.get("GPU", 0) < s.num_workers * (s.gpus_per_worker or 1.0):
        raise UserError(f"scaling.use_gpu is set but this machine offers "
                        f"{have.get('GPU', 0):g} GPUs; set scaling.use_gpu=false")
