"""What every Ray Train worker runs: ``train_loop_per_worker``, and its checkpoints.

The driver (``faceage.training.driver``) hands the loop the run's config and the data table it
read and split; the loop builds its loaders, model and schedule, resumes from Ray Train's latest
checkpoint if there is one, and reports one checkpoint per epoch.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from faceage.compat import quiet_train_report_log
from faceage.config import Config
from faceage.data.datasets import (
    BatchAugment,
    PreparedData,
    eval_transform,
    make_dataset,
    open_shipped,
)
from faceage.data.sources import resolve_sources, source_column, source_val_metrics, train_sampler
from faceage.errors import UserError
from faceage.inference.interval import DEFAULT_COVERAGE, IntervalCalibration, coverage_report
from faceage.models.network import AgeNet, build_model, head_uncertainty
from faceage.training.loop import (
    StepContext,
    autocast_dtype,
    build_optimizer,
    check_replicas_agree,
    gather,
    make_loss,
    predict,
    say,
    share_buffers,
    sum_across,
    train_one_epoch,
)
from faceage.training.schedule import Stage, UnfreezeSchedule

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "faceage-checkpoint"
METRIC = "val_mae"


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


def _wrap(model: AgeNet, world_size: int):
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


def _loaders(data: PreparedData, cfg: Config, rank: int, world: int, device: torch.device):
    """This worker's train loader (a distributed sampler) and validation shard loader."""
    train_ds = make_dataset(data, "train")
    val_ds = make_dataset(data, "val")
    val_shard = torch.utils.data.Subset(val_ds, list(range(rank, len(val_ds), world)))
    # Equal source weights: DistributedSampler, every image once per epoch; else weighted draws.
    weights = {s.name: s.weight for s in resolve_sources(cfg.data)}
    sampler = train_sampler(train_ds, source_column(data.subset("train"), cfg.data), weights,
                            world, rank, cfg.seed)
    loader_args = dict(num_workers=cfg.data.loader_workers,
                       persistent_workers=cfg.data.loader_workers > 0,
                       pin_memory=device.type == "cuda")
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.train.batch_size,
                                         sampler=sampler, drop_last=True, **loader_args)
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=cfg.train.batch_size * 2,
                                             **loader_args)
    if len(loader) == 0:  # the driver checks this too
        raise UserError(
            f"train split has {len(train_ds)} images: too few for batch_size "
            f"{cfg.train.batch_size} x {world} workers; lower train.batch_size")
    return sampler, loader, val_loader


def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # the same initial head on every worker
    out = say if rank == 0 else (lambda *a, **k: None)
    # The run config's LoggingConfig leaves the "ray" logger's console handler alone, so a line
    # per report and checkpoint would still reach the job log from every worker.
    logging.getLogger("ray.train").setLevel(cfg.train.ray_log_level)
    quiet_train_report_log(cfg.train.ray_log_level)

    # The driver read, split and decoded the data; this is its table, not a second reading.
    shipped = ray.get(loop_config["data"])
    data = open_shipped(shipped, progress=rank == 0)
    summary = shipped["summary"]
    sampler, loader, val_loader = _loaders(data, cfg, rank, world, device)
    val_true = gather(data.subset("val")["age"].to_numpy()[rank::world], world)
    val_sources = gather(source_column(data.subset("val"), cfg.data)[rank::world], world)
    source_names = [s.name for s in resolve_sources(cfg.data)]
    steps = len(loader)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    augment = BatchAugment(cfg.model.input_size, cfg.train.augment).to(device)
    val_transform = eval_transform(cfg.model.input_size)

    model = build_model(cfg.model.backbone, cfg.model.pretrained, cfg.model.head_hidden,
                        cfg.model.dropout, cfg.model.weights_dir, cfg.model.uncertainty)
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
        kind = head_uncertainty(state["model"])
        if kind != cfg.model.uncertainty:
            raise UserError(f"run {cfg.name!r} was trained with model.uncertainty={kind}: its "
                            f"checkpoints cannot be resumed with {cfg.model.uncertainty}; "
                            f"pass --set model.uncertainty={kind}")
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
            out(_resume_line(state, stage, total, opt_state is not None))
        else:
            out(f"[faceage] all {total} epochs were trained already; nothing left to do")
    model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if start_epoch == 0:
        out(f"[faceage] {cfg.model.backbone} @ {cfg.model.input_size}px, {total} epochs x "
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
            optimizer = build_optimizer(model, schedule, stage, cfg.train.weight_decay)
            if opt_state is not None:
                try:
                    optimizer.load_state_dict(schedule.split_old_state(model, stage, opt_state))
                except ValueError as exc:  # the stages (or the parameter groups) changed
                    out(f"[faceage] optimizer state does not fit this stage ({exc}); "
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
        loss_sum, abs_sum, images = sum_across(
            [stats["loss_sum"], stats["abs_sum"], stats["images"]], world)
        check_replicas_agree(model, world)
        share_buffers(model, world)
        preds, scales = predict(model, val_loader, ctx, val_transform, cfg.train.eval_tta)
        preds = gather(preds, world)
        scales = None if scales is None else gather(scales, world)
        # The interval is calibrated on this epoch's validation predictions (the ones that
        # rank the checkpoint); export stores the best epoch's in the model file.
        calibration = IntervalCalibration.fit(preds, val_true, scales)
        band = coverage_report(*calibration.interval(preds, scales, DEFAULT_COVERAGE), val_true)
        val = source_val_metrics(preds, val_true, val_sources, source_names)
        schedule.end_epoch(epoch, val["val_mae"])
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
        metrics = {
            "epoch": epoch, "stage": stage.index, "stage_name": stage.name,
            "train_loss": loss_sum / max(images, 1), "train_mae": abs_sum / max(images, 1),
            **val, "train_images": int(images),
            "images_per_s": images / max(stats["seconds"], 1e-9),
            "epoch_seconds": stats["seconds"],
            "data_share": stats["data_seconds"] / max(stats["seconds"], 1e-9), **lrs,
            "val_interval_coverage": band["coverage"], "val_interval_width": band["mean_width"],
        }
        history.append(metrics)
        out(f"[faceage] epoch {epoch + 1}/{total} [{stage.name}] "
            f"loss {metrics['train_loss']:.3f}  val MAE {val['val_mae']:.2f}"
            + ("".join(f" [{n} {val[f'val_mae/{n}']:.2f}]" for n in source_names)
               + f" all {val['val_mae_all']:.2f}" if len(source_names) > 1 else "")
            + f"  RMSE {val['val_rmse']:.2f}"
            f"  CS@5 {val['val_cs5']:.1%}  | {metrics['images_per_s']:.0f} img/s, "
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
                    "interval_calibration": calibration.to_metadata(),
                })
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
