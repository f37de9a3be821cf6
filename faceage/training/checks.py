"""Checks on the driver before any worker starts, so mistakes end in one clear message.

``preflight`` checks the backbone, stage groups, data, weights, batch size and an earlier run
of the same name; ``load_data`` then decodes the split table once for the whole run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from faceage.config import Config
from faceage.data.datasets import LoadReport, PreparedData, decode_table
from faceage.data.sources import SourceSpec, prepare_raw_sources, read_sources
from faceage.errors import UserError
from faceage.models.network import build_model
from faceage.training.schedule import UnfreezeSchedule


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

    hint = ("this Ray job runs in an uploaded copy of --working-dir ({}); relative paths point "
            "into that copy. Pass an absolute path, e.g. --set {}=$PWD/{}")
    if relative(cfg.storage_path):
        raise UserError(f"storage_path {cfg.storage_path!r} is relative: the run would be written "
                        "into the job's temporary copy and lost. "
                        + hint.format(job_dir, "storage_path", cfg.storage_path))
    for key, value in (("data.path", cfg.data.path), ("data.cache_dir", cfg.data.cache_dir),
                       ("model.pretrained", cfg.model.pretrained)):
        if key == "model.pretrained" and value in ("imagenet", "none"):
            continue
        if relative(value) and not os.path.exists(value):
            raise UserError(f"{key} {value!r} not found: "
                            + hint.format(job_dir, key, value))
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
    where = cfg.data.path if cfg.data.sources is None else "data.sources"
    if n_train < per_step:
        raise UserError(
            f"{where}: {n_train} training images are fewer than one step needs "
            f"(train.batch_size {cfg.train.batch_size} x {cfg.scaling.num_workers} workers); "
            "lower train.batch_size or add data")
    if n_val == 0:
        raise UserError(f"{where}: no images fell into the validation split "
                        f"(data.split.val={cfg.data.split.val}); raise it or add data")
    if "source" in table.columns and cfg.data.sources is not None:
        # Every source is scored on its own validation images (val_mae averages them).
        for name, rows in table.groupby("source", sort=False):
            if not (rows["split"] == "val").any():
                raise UserError(f"data source {name!r}: none of its {len(rows)} images fell "
                                f"into the validation split (data.split.val="
                                f"{cfg.data.split.val}); raise its limit or data.split.val")


@dataclass
class Preflight:
    """What the driver learnt before starting workers."""

    table: pd.DataFrame  # faceage.data.sources.TABLE_COLUMNS
    report: LoadReport
    group_names: list[str]
    resuming: bool
    sources: list[SourceSpec] | None = None


def preflight(cfg: Config) -> Preflight:
    """Check the inputs of a run on the driver, so mistakes end in one clear message.

    Unknown backbone, bad stage groups, missing or empty data, unavailable pretrained weights,
    too little data for the batch size, an incompatible earlier run of the same name. Reads and
    splits the data but decodes nothing (``load_data`` does that).
    """
    if "://" in cfg.storage_path:
        raise UserError(f"storage_path {cfg.storage_path!r}: object storage is not supported "
                        "yet; use a local or shared file system path")
    model = build_model(cfg.model.backbone, cfg.model.pretrained, cfg.model.head_hidden,
                        cfg.model.dropout, cfg.model.weights_dir)
    UnfreezeSchedule(cfg.schedule, model.group_names(), steps_per_epoch=1)
    df, report, sources = read_sources(cfg.data)
    check_split_counts(cfg, df)
    run_dir = cfg.run_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run folder {run_dir}: {exc}") from None
    resuming = check_resume_compatible(cfg, run_dir)
    return Preflight(df, report, model.group_names(), resuming, sources)


def load_data(cfg: Config, checked: Preflight, progress: bool = True) -> PreparedData:
    """Prepare raw AAF/CSV sources (once, cached) and decode the checked table once (the cache
    is shared per node); faceless and unreadable images are dropped, so the table that comes
    back is exactly what trains."""
    table = prepare_raw_sources(checked.table, cfg.data, checked.report)
    data = decode_table(table, checked.report, cfg.data, cfg.model.input_size, progress)
    check_split_counts(cfg, data.table)
    return data


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
