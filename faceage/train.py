"""Training on Ray Train: plain PyTorch in ``train_loop_per_worker``, scaled by ``TorchTrainer``.

Run locally with ``faceage train --config configs/train.yaml`` or on a cluster with
``ray job submit --working-dir . -- python -m faceage.train --config configs/train.yaml``.
The same loop runs on one CPU or many GPUs: only ``scaling`` in the config changes.

A run folder ``<storage_path>/<name>`` holds ``config.yaml``, ``split.csv``, Ray Train's
``checkpoint_*`` folders, and at the end ``model.pt``, ``curves.png`` and ``summary.json``.
Starting a run whose folder already has checkpoints resumes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from faceage.config import (  # noqa: F401 (the argument helpers are re-exported)
    Config,
    add_train_arguments,
    flat_overrides,
    load_config,
    save_config,
)
from faceage.data import (
    BatchAugment,
    LoadReport,
    assign_split,
    eval_transform,
    make_dataset,
    prepare_data,
    preprocessing_metadata,
    read_dataset,
)
from faceage.errors import TrainingFailed, UserError
from faceage.metrics import regression_metrics
from faceage.models import AgeRegressor, build_model
from faceage.schedule import Stage, UnfreezeSchedule

log = logging.getLogger("faceage.train")

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "faceage-checkpoint"
METRIC = "val_mae"


# -- hardware ------------------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16, AMX); elsewhere bf16 is emulated, slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def make_loss(name: str) -> nn.Module:
    return {"l1": nn.L1Loss(), "smooth_l1": nn.SmoothL1Loss(beta=2.0), "mse": nn.MSELoss()}[name]


# -- one epoch -----------------------------------------------------------------------------------


@dataclass
class StepContext:
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    scaler: torch.amp.GradScaler | None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def train_one_epoch(model, loader, optimizer, schedule: UnfreezeSchedule, epoch: int, loss_fn,
                    ctx: StepContext, augment: BatchAugment,
                    max_steps: int | None) -> dict[str, float]:
    """One pass over ``loader``: uint8 batches are augmented on the device, then a step each."""
    model.train()
    schedule.apply(model, schedule.stage_at(epoch))
    total_loss = total_abs = 0.0
    seen = 0
    data_seconds = 0.0
    start = tick = time.perf_counter()
    for step, (images, ages) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        schedule.set_lrs(optimizer, epoch, step)
        x = ctx.memory_format(augment(ctx.to_device(images)))
        y = ctx.to_device(ages)
        data_seconds += time.perf_counter() - tick
        with ctx.autocast():
            pred = model(x)
        loss = loss_fn(pred.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is not None:
            ctx.scaler.scale(loss).backward()
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = y.shape[0]
        seen += n
        total_loss += float(loss.detach()) * n
        total_abs += float((pred.detach().float() - y).abs().sum())
        tick = time.perf_counter()
    return {
        "loss_sum": total_loss,
        "abs_sum": total_abs,
        "images": seen,
        "seconds": time.perf_counter() - start,
        "data_seconds": data_seconds,
    }


@torch.inference_mode()
def predict(model, loader, ctx: StepContext, transform, tta: bool) -> np.ndarray:
    """Predicted ages for every batch of uint8 images in ``loader`` (in order)."""
    model.eval()
    out = []
    for images, _ in loader:
        x = ctx.memory_format(transform(ctx.to_device(images)))
        with ctx.autocast():
            p = model(x).float()
            if tta:
                p = (p + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(p.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# -- collectives (no-ops on one worker) ----------------------------------------------------------


def _gather(values: np.ndarray, world_size: int) -> np.ndarray:
    """Concatenate every worker's array, in rank order."""
    if world_size == 1:
        return values
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, values)
    return np.concatenate(parts)


def _sum_across(values: list[float], world_size: int) -> list[float]:
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _share_buffers(model: nn.Module, world_size: int) -> None:
    """Copy rank 0's BatchNorm statistics to all workers, so validation uses the saved model."""
    if world_size == 1:
        return
    for buf in model.buffers():
        torch.distributed.broadcast(buf.data, src=0)


def _check_replicas_agree(model: nn.Module, world_size: int) -> None:
    """DDP keeps replicas identical; a mismatch means a wrapping bug, so stop loudly."""
    if world_size == 1:
        return
    with torch.no_grad():
        local = float(sum(p.double().sum() for p in model.parameters()))
    sums = _gather(np.array([local]), world_size)
    if not np.allclose(sums, sums[0], rtol=1e-9, atol=0.0):
        raise RuntimeError(f"model replicas differ across workers (parameter sums {sums})")


def _say(message: str) -> None:
    # Ray Train patches print() into a logger, which doubles lines in job logs; write directly.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# -- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(directory: str | Path, state: dict) -> Path:
    """Write a training checkpoint (plain types and tensors, so it loads with weights_only)."""
    path = Path(directory) / CHECKPOINT_FILE
    torch.save({"format": CHECKPOINT_FORMAT, **state}, path)
    return path


def load_checkpoint(checkpoint) -> dict:
    """The state dict saved by ``save_checkpoint`` in a ``ray.train.Checkpoint``."""
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{checkpoint.path} is not a faceage training checkpoint")
    return state


# -- the Ray Train loop --------------------------------------------------------------------------


def _build_optimizer(model, schedule: UnfreezeSchedule, stage: Stage, weight_decay: float):
    """AdamW over the stage's trainable groups only: frozen groups get no optimizer state."""
    schedule.apply(model, stage)
    return torch.optim.AdamW(schedule.param_groups(model, stage), lr=stage.lr,
                             weight_decay=weight_decay)


def _wrap(model: AgeRegressor, world_size: int):
    """DDP registers only parameters that require grad, so the loop wraps again at each stage."""
    import ray.train.torch

    if world_size == 1:
        return model
    return ray.train.torch.prepare_model(model, move_to_device=False)


def _resume_line(state: dict, stage: Stage, total: int, optimizer_restored: bool) -> str:
    epoch = state["epoch"] + 1
    how = ("optimizer state restored" if optimizer_restored
           else "fresh optimizer: a new stage starts")
    return (f"[faceage] resumed from the checkpoint after epoch {epoch}/{total} "
            f"(stage {state['stage_name']}): continuing at epoch {epoch + 1} in stage "
            f"{stage.name}, {how}")


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # the same initial head on every worker
    say = _say if rank == 0 else (lambda *a, **k: None)
    # The run config's LoggingConfig leaves the "ray" logger's console handler alone, so a line
    # per report and checkpoint would still reach the job log from every worker.
    logging.getLogger("ray.train").setLevel(cfg.train.ray_log_level)

    data = prepare_data(cfg.data, cfg.model.input_size, progress=rank == 0)
    summary = data.summary()
    say(f"[faceage] data: {data.report.summary()}")
    say(f"[faceage] split: train {summary['train']}, val {summary['val']}, "
        f"test {summary['test']} (seed {cfg.data.split.seed})")

    train_ds = make_dataset(data, "train")
    val_ds = make_dataset(data, "val")
    val_shard = torch.utils.data.Subset(val_ds, list(range(rank, len(val_ds), world)))
    val_true = _gather(data.subset("val")["age"].to_numpy()[rank::world], world)
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=True)
    loader_args = dict(num_workers=cfg.data.loader_workers,
                       persistent_workers=cfg.data.loader_workers > 0,
                       pin_memory=device.type == "cuda")
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.train.batch_size,
                                         sampler=sampler, drop_last=True, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=cfg.train.batch_size * 2,
                                             **loader_args)
    steps = len(loader)
    if steps == 0:  # the driver checks this too; data may differ on a worker's node
        raise UserError(
            f"train split has {len(train_ds)} images: too few for batch_size "
            f"{cfg.train.batch_size} x {world} workers; lower train.batch_size")
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    augment = BatchAugment(cfg.model.input_size, cfg.train.augment).to(device)
    val_transform = eval_transform(cfg.model.input_size)

    model = build_model(cfg.model.backbone, cfg.model.pretrained, cfg.model.head_hidden,
                        cfg.model.dropout, cfg.model.weights_dir)
    model.set_target_stats(summary["train_age_mean"], summary["train_age_std"] or 1.0)
    schedule = UnfreezeSchedule(cfg.schedule, model.group_names(), steps)
    total = schedule.total_epochs
    dtype = autocast_dtype(cfg.train.precision, device)
    use_scaler = device.type == "cuda" and dtype == torch.float16
    ctx = StepContext(device, dtype, cfg.train.channels_last,
                      torch.amp.GradScaler("cuda") if use_scaler else None)

    start_epoch, history, resumes, opt_state = 0, [], [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        schedule.load_state_dict(state["schedule"])
        start_epoch = state["epoch"] + 1
        history = [h for h in state["history"] if h["epoch"] < start_epoch]
        resumes = list(state.get("resumes", []))
        if start_epoch < total:
            stage = schedule.stage_at(start_epoch)
            # Mid-stage the optimizer continues; a new stage builds a fresh one, as in a full run.
            if stage.index == state["stage"]:
                opt_state = state["optimizer"]
            if ctx.scaler is not None and state.get("scaler"):
                ctx.scaler.load_state_dict(state["scaler"])
            resumes.append({"epoch": start_epoch, "stage": stage.index,
                            "optimizer_restored": opt_state is not None, "workers": world})
            say(_resume_line(state, stage, total, opt_state is not None))
        else:
            say(f"[faceage] all {total} epochs were trained already; nothing left to do")
    model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if start_epoch == 0:
        say(f"[faceage] {cfg.model.backbone} @ {cfg.model.input_size}px, {total} epochs x "
            f"{steps} steps of {cfg.train.batch_size} x {world} worker(s) on {device.type}, "
            f"precision {str(dtype or torch.float32).replace('torch.', '')}\n"
            + schedule.describe())

    loss_fn = make_loss(cfg.train.loss)
    wrapped, optimizer, stage_index = model, None, None
    for epoch in range(start_epoch, total):
        stage = schedule.stage_at(epoch)
        if stage.index != stage_index:
            # Let the previous stage's wrapper and optimizer state go before building new ones.
            wrapped = optimizer = None
            optimizer = _build_optimizer(model, schedule, stage, cfg.train.weight_decay)
            if opt_state is not None:
                try:
                    optimizer.load_state_dict(opt_state)
                except ValueError as exc:  # the stages changed since the checkpoint
                    say(f"[faceage] optimizer state does not fit this stage ({exc}); "
                        "starting it afresh")
                    resumes[-1]["optimizer_restored"] = False
                opt_state = None
            wrapped = _wrap(model, world)
            stage_index = stage.index
        sampler.set_epoch(epoch)
        # Seeded per epoch and worker: a resumed epoch draws the augmentations it would have.
        torch.manual_seed((cfg.seed * 100_003 + epoch) * 1_009 + rank)
        stats = train_one_epoch(wrapped, loader, optimizer, schedule, epoch, loss_fn, ctx,
                                augment, steps)
        loss_sum, abs_sum, images = _sum_across(
            [stats["loss_sum"], stats["abs_sum"], stats["images"]], world)
        _check_replicas_agree(model, world)
        _share_buffers(model, world)
        preds = _gather(predict(model, val_loader, ctx, val_transform, cfg.train.eval_tta), world)
        val = regression_metrics(preds, val_true)
        schedule.end_epoch(epoch, val["mae"])
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
        metrics = {
            "epoch": epoch, "stage": stage.index, "stage_name": stage.name,
            "train_loss": loss_sum / max(images, 1), "train_mae": abs_sum / max(images, 1),
            "val_mae": val["mae"], "val_rmse": val["rmse"], "val_cs5": val["cs5"],
            "val_images": val["n"], "train_images": int(images),
            "images_per_s": images / max(stats["seconds"], 1e-9),
            "epoch_seconds": stats["seconds"],
            "data_share": stats["data_seconds"] / max(stats["seconds"], 1e-9), **lrs,
        }
        history.append(metrics)
        say(f"[faceage] epoch {epoch + 1}/{total} [{stage.name}] "
            f"loss {metrics['train_loss']:.3f}  val MAE {val['mae']:.2f}  RMSE {val['rmse']:.2f}"
            f"  CS@5 {val['cs5']:.1%}  | {metrics['images_per_s']:.0f} img/s, "
            f"data {metrics['data_share']:.0%}, {stats['seconds']:.0f}s  "
            f"lr {max(lrs.values()):.1e}")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
                    "schedule": schedule.state_dict(), "epoch": epoch, "stage": stage.index,
                    "stage_name": stage.name, "history": history, "resumes": resumes,
                    "data_summary": summary, "config": cfg.to_dict(),
                })
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


# -- the driver ----------------------------------------------------------------------------------


def build_trainer(cfg: Config, extra_callbacks: list | None = None):
    """A ``TorchTrainer`` for ``cfg``: scaling, checkpoints and failure handling from the config."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker or 1.0
    run_dir = cfg.run_dir()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=METRIC, checkpoint_score_order="min"),
            logging_config=ray.train.LoggingConfig(log_level=cfg.train.ray_log_level),
            callbacks=extra_callbacks or None,
        ),
    )


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


def _check_resume_compatible(cfg: Config, run_dir: Path) -> bool:
    """True when ``run_dir`` holds checkpoints of an earlier run that this config can resume."""
    if not any(run_dir.glob("checkpoint_*")):
        return False
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = (yaml.safe_load(saved.read_text()) or {}).get("model") or {}
        for key in ("backbone", "head_hidden", "input_size"):
            if key in old and old[key] != getattr(cfg.model, key):
                raise UserError(
                    f"run {cfg.name!r} in {run_dir} was trained with model.{key}={old[key]!r}, "
                    f"not {getattr(cfg.model, key)!r}: its checkpoints cannot be resumed. "
                    "Choose another name (--set name=...) or delete the folder to start over.")
    return True


@dataclass
class Preflight:
    """What the driver learnt before starting workers."""

    table: pd.DataFrame  # path, age, gender, race, split
    report: LoadReport
    group_names: list[str]
    resuming: bool


def preflight(cfg: Config) -> Preflight:
    """Check the inputs of a run on the driver, so mistakes end in one clear message.

    Unknown backbone, bad stage groups, missing or empty data, unavailable pretrained weights,
    too little data for the batch size, an incompatible earlier run of the same name.
    """
    if "://" in cfg.storage_path:
        raise UserError(f"storage_path {cfg.storage_path!r}: object storage is not supported "
                        "yet; use a local or shared file system path")
    model = build_model(cfg.model.backbone, cfg.model.pretrained, cfg.model.head_hidden,
                        cfg.model.dropout, cfg.model.weights_dir)
    UnfreezeSchedule(cfg.schedule, model.group_names(), steps_per_epoch=1)
    df, report = read_dataset(cfg.data)
    df = df.assign(split=assign_split(df["path"].tolist(), cfg.data.split))
    counts = df["split"].value_counts()
    n_train, n_val = int(counts.get("train", 0)), int(counts.get("val", 0))
    per_step = cfg.train.batch_size * cfg.scaling.num_workers
    if n_train < per_step:
        raise UserError(
            f"{cfg.data.path}: {n_train} training images are fewer than one step needs "
            f"(train.batch_size {cfg.train.batch_size} x {cfg.scaling.num_workers} workers); "
            "lower train.batch_size or add data")
    if n_val == 0:
        raise UserError(f"{cfg.data.path}: no images fell into the validation split "
                        f"(data.split.val={cfg.data.split.val}); raise it or add data")
    run_dir = cfg.run_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run folder {run_dir}: {exc}") from None
    resuming = _check_resume_compatible(cfg, run_dir)
    return Preflight(df, report, model.group_names(), resuming)


def _check_cluster_fits(cfg: Config) -> None:
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


def data_crop_policy(cfg: Config) -> dict:
    """How the training images were framed; inference crops faces the same way."""
    if cfg.data.format == "prepared":
        idx = Path(cfg.data.path)
        meta_path = (idx if idx.is_dir() else idx.parent) / "prepare.json"
        if meta_path.is_file():
            return json.loads(meta_path.read_text())["crop_policy"]
    return {"name": "utkface-chip"}


def export_best(result, cfg: Config, run_dir: Path) -> tuple[Path, dict, dict]:
    """Export the best checkpoint (lowest val MAE) of ``result`` as a model file.

    Returns the model path, the best epoch's metrics and the latest checkpoint's state (history,
    resumes, data summary).
    """
    from faceage.modelfile import save_model_file

    ranked = [(c, m) for c, m in (result.best_checkpoints or [])
              if np.isfinite(m.get(METRIC, np.nan))]
    if not ranked or result.checkpoint is None:
        raise TrainingFailed(f"training in {run_dir} produced no checkpoint with a val MAE")
    best_ckpt, best_metrics = min(ranked, key=lambda cm: cm[1][METRIC])
    latest = load_checkpoint(result.checkpoint)
    model = build_model(cfg.model.backbone, "none", cfg.model.head_hidden, cfg.model.dropout)
    model.load_state_dict(load_checkpoint(best_ckpt)["model"])
    metadata = {
        "name": f"faceage-{cfg.model.backbone}",
        "preprocessing": preprocessing_metadata(cfg.model.input_size),
        "crop_policy": data_crop_policy(cfg),
        "data": {"format": cfg.data.format, "path": cfg.data.path,
                 "split": cfg.data.split.model_dump(), **latest.get("data_summary", {})},
        "metrics": {k: best_metrics[k] for k in ("val_mae", "val_rmse", "val_cs5", "epoch")},
        "config": cfg.to_dict(),
    }
    path = save_model_file(model, run_dir / "model.pt", metadata)
    return path, dict(best_metrics), latest


def summary_table(history: list[dict], best_epoch: int) -> str:
    lines = ["epoch  stage       train_loss  val_MAE  val_RMSE  CS@5    img/s",
             "-----  ----------  ----------  -------  --------  ------  -----"]
    for h in history:
        mark = " *" if h["epoch"] == best_epoch else ""
        lines.append(f"{h['epoch'] + 1:>5}  {h['stage_name']:<10}  {h['train_loss']:>10.3f}  "
                     f"{h['val_mae']:>7.2f}  {h['val_rmse']:>8.2f}  {h['val_cs5']:>6.1%}  "
                     f"{h['images_per_s']:>5.0f}{mark}")
    return "\n".join(lines)


def explain_failure(exc: Exception, cfg: Config) -> Exception:
    """One readable message for a failed ``fit()``: the worker's own error, not Ray's wrapping."""
    from ray.train import ControllerError, WorkerGroupError

    run_dir = cfg.run_dir()
    causes: list[tuple[str, BaseException]] = []
    if isinstance(exc, WorkerGroupError):
        for rank, err in sorted(exc.worker_failures.items()):
            causes.append((f"worker {rank}", getattr(err, "_base_exc", err)))
    elif isinstance(exc, ControllerError):
        causes.append(("the Ray Train controller", exc.controller_failure))
    else:
        causes.append(("Ray Train", exc))
    for _, cause in causes:
        if isinstance(cause, UserError):
            return UserError(str(cause))
    where, cause = causes[0]
    first_line = (str(cause).strip().splitlines() or [""])[0][:300]
    retries = ("" if cfg.max_failures == 0
               else f" after {cfg.max_failures} restart(s) (max_failures)")
    return TrainingFailed(
        f"training stopped{retries}: {where} failed with {type(cause).__name__}: {first_line}\n"
        f"The worker logs above have the full traceback. Checkpoints are kept in {run_dir}; "
        "run the same command again to resume from the last one.")


@dataclass
class TrainOutcome:
    run_dir: Path
    model_path: Path
    best: dict
    history: list[dict]
    resumes: list[dict]


@contextmanager
def ray_for_run(cfg: Config):
    """Ray for a driver: joins ``RAY_ADDRESS`` or an instance already up in this process, else
    starts a private local one (checked against ``cfg``'s scaling) and shuts it down after."""
    import ray

    # The dashboard's Train page lists runs, attempts and workers only with state tracking on.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    # Not ray.init()'s default: that joins any cluster found on this machine, someone else's too.
    ray.init(address=address or "local", log_to_driver=True)
    try:
        if not address:
            _check_cluster_fits(cfg)
        yield
    finally:
        ray.shutdown()


def run_training(cfg: Config, callbacks: list | None = None) -> TrainOutcome:
    """Train with Ray Train, export the best checkpoint, write curves and a summary."""
    from ray.train import TrainingFailedError

    from faceage.plots import learning_curves

    check_job_paths(cfg)
    cfg = cfg.with_absolute_paths()
    checked = preflight(cfg)
    run_dir = cfg.run_dir()
    if checked.resuming:
        print(f"[faceage] {run_dir} has checkpoints of an earlier run: resuming it "
              "(choose another name or delete the folder to start over)")
    save_config(cfg, run_dir / "config.yaml")
    checked.table[["path", "age", "split"]].to_csv(run_dir / "split.csv", index=False)
    print(f"[faceage] data: {checked.report.summary()}")

    started = time.time()
    with ray_for_run(cfg):
        try:
            result = build_trainer(cfg, callbacks).fit()
        except TrainingFailedError as exc:
            raise explain_failure(exc, cfg) from None
        model_path, best, latest = export_best(result, cfg, run_dir)
    history, resumes = latest["history"], latest.get("resumes", [])
    curves = learning_curves(history, run_dir / "curves.png",
                             title=f"{cfg.name}: {cfg.model.backbone} @ {cfg.model.input_size}px")
    wall = time.time() - started
    (run_dir / "summary.json").write_text(json.dumps(
        {"name": cfg.name, "best": best, "history": history, "resumes": resumes,
         "data": latest.get("data_summary"), "model": str(model_path), "curves": str(curves),
         "wall_seconds": wall}, indent=2, default=float))
    print("\n" + summary_table(history, best["epoch"]))
    for r in resumes:
        print(f"resumed at epoch {r['epoch'] + 1} "
              f"({'optimizer state restored' if r['optimizer_restored'] else 'new stage'})")
    print(f"\nbest val MAE {best['val_mae']:.2f} at epoch {best['epoch'] + 1}; {wall:.0f}s")
    print(f"model:  {model_path}\ncurves: {curves}\nrun:    {run_dir}")
    return TrainOutcome(run_dir, model_path, best, history, resumes)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Under `uv run`, Ray would rebuild the uv project for every worker; this env is complete.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    p = argparse.ArgumentParser(prog="python -m faceage.train", description=__doc__.split("\n")[0])
    add_train_arguments(p)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, flat_overrides(args))
        run_training(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
