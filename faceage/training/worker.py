"""What every Ray Train worker runs: ``train_loop_per_worker``, and its checkpoints.

The driver (``faceage.training.driver``) hands the loop the run's config and its ``RunData``
(read, split and decoded once, on the driver). The loop's steps, as in torchvision's reference
``train.py``: ``setup`` (device, loaders, model, schedule: ``faceage.training.worker_setup``),
``resume`` from Ray Train's latest checkpoint if there is one, then ``train_epochs``: each epoch
trains, ``validate``s (metrics and the interval calibration), prints its ``epoch_line`` and
``report_epoch``s a checkpoint.
"""

from __future__ import annotations

import math
import tempfile
import time

import numpy as np
import torch

from faceage.config import AGE_BANDS
from faceage.errors import UserError
from faceage.inference.interval import DEFAULT_COVERAGE, IntervalCalibration, coverage_report
from faceage.models.network import AgeNet, head_uncertainty
from faceage.training.checkpoints import (
    METRIC,
    Progress,
    checkpoint_due,
    load_checkpoint,
    save_checkpoint,
    stops_early,
)
from faceage.training.loop import (
    build_optimizer,
    check_replicas_agree,
    gather,
    make_loss,
    predict,
    share_buffers,
    sum_across,
    train_one_epoch,
)
from faceage.training.metrics import band_val_metrics, range_val_metrics, source_val_metrics
from faceage.training.schedule import Stage
from faceage.training.worker_setup import WorkerRun, setup, start_line

# -- resuming ------------------------------------------------------------------------------------


def _resume_line(state: dict, stage: Stage, total: int, optimizer_restored: bool) -> str:
    epoch = state["epoch"] + 1
    how = ("optimizer state restored" if optimizer_restored
           else "fresh optimizer: a new stage starts")
    return (f"[faceage] resumed from the checkpoint after epoch {epoch}/{total} "
            f"(stage {state['stage_name']}): continuing at epoch {epoch + 1} in stage "
            f"{stage.name}, {how}")


def resume(run: WorkerRun, checkpoint) -> Progress:
    """Continue from Ray Train's latest checkpoint (None: a fresh start): the weights, the
    schedule and the history; the optimizer and loss scaler only mid-stage."""
    if not checkpoint:
        return Progress()
    cfg, schedule = run.cfg, run.schedule
    state = load_checkpoint(checkpoint)
    kind = head_uncertainty(state["model"])
    if kind != cfg.model.uncertainty:
        raise UserError(f"run {cfg.name!r} was trained with model.uncertainty={kind}: its "
                        f"checkpoints cannot be resumed with {cfg.model.uncertainty}; "
                        f"pass --set model.uncertainty={kind}")
    run.model.load_state_dict(state["model"])
    schedule.load_state_dict(state["schedule"])
    start = state["epoch"] + 1
    history = [h for h in state["history"] if h["epoch"] < start]
    progress = Progress(start, history, list(state.get("resumes", [])),
                        best_val=min((h[METRIC] for h in history if math.isfinite(h[METRIC])),
                                     default=math.inf),
                        checkpoint_epoch=state["epoch"])
    if start >= run.total_epochs:
        run.out(f"[faceage] all {run.total_epochs} epochs were trained already; "
                "nothing left to do")
        return progress
    stage = schedule.stage_at(start)
    # Mid-stage the optimizer continues; a new stage builds a fresh one, as in a full run.
    if stage.index == state["stage"]:
        progress.opt_state = state["optimizer"]
    if run.ctx.scaler is not None and state.get("scaler"):
        run.ctx.scaler.load_state_dict(state["scaler"])
    progress.resumes.append({"epoch": start, "stage": stage.index,
                             "optimizer_restored": progress.opt_state is not None,
                             "workers": run.world})
    run.out(_resume_line(state, stage, run.total_epochs, progress.opt_state is not None))
    return progress


# -- the epochs ----------------------------------------------------------------------------------


def _wrap(model: AgeNet, world_size: int):
    """DDP registers only parameters that require grad, so the loop wraps again at each stage."""
    import ray.train.torch

    if world_size == 1:
        return model
    return ray.train.torch.prepare_model(model, move_to_device=False)


def stage_optimizer(run: WorkerRun, stage: Stage, progress: Progress):
    """The stage's optimizer, with the checkpoint's state when the run resumes inside it."""
    optimizer = build_optimizer(run.model, run.schedule, stage, run.cfg.train.weight_decay)
    if progress.opt_state is not None:
        try:
            optimizer.load_state_dict(
                run.schedule.split_old_state(run.model, stage, progress.opt_state))
        except ValueError as exc:  # the stages (or the parameter groups) changed
            run.out(f"[faceage] optimizer state does not fit this stage ({exc}); "
                    "starting it afresh")
            progress.resumes[-1]["optimizer_restored"] = False
        progress.opt_state = None
    return optimizer


def train_epochs(run: WorkerRun, progress: Progress) -> None:
    """From ``progress.start_epoch`` to the end: train, validate, report a checkpoint."""
    loss_fn = make_loss(run.cfg.train.loss)
    wrapped, optimizer, stage_index = run.model, None, None
    last_stage = len(run.cfg.schedule.stages) - 1
    # The stop counts once half the last stage has run (``stops_early``).
    settle = (run.cfg.schedule.stages[-1].epochs + 1) // 2
    if stops_early(progress.history, last_stage, run.cfg.train.stop_patience, settle):
        return  # a run that stopped early, started again: it is done
    for epoch in range(progress.start_epoch, run.total_epochs):
        stage = run.schedule.stage_at(epoch)
        if stage.index != stage_index:
            # Let the previous stage's wrapper and optimizer state go before building new ones.
            wrapped = optimizer = None
            optimizer = stage_optimizer(run, stage, progress)
            wrapped = _wrap(run.model, run.world)
            stage_index = stage.index
        run.sampler.set_epoch(epoch)
        # Seeded per epoch and worker: a resumed epoch draws the augmentations it would have.
        torch.manual_seed((run.cfg.seed * 100_003 + epoch) * 1_009 + run.rank)
        stats = train_one_epoch(wrapped, run.loader, optimizer, run.schedule, epoch, loss_fn,
                                run.ctx, run.augment, run.steps, run.cfg.train.consistency)
        loss_sum, abs_sum, images = sum_across(
            [stats["loss_sum"], stats["abs_sum"], stats["images"]], run.world)
        val, calibration, band = validate(run)
        run.schedule.end_epoch(epoch, val["val_mae"])
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
        metrics = {
            "epoch": epoch, "stage": stage.index, "stage_name": stage.name,
            "train_loss": loss_sum / max(images, 1), "train_mae": abs_sum / max(images, 1),
            **val, "train_images": int(images),
            "images_per_s": images / max(stats["seconds"], 1e-9),
            "epoch_seconds": stats["seconds"],
            "data_share": stats["data_seconds"] / max(stats["seconds"], 1e-9),
            "cpus_busy": stats["cpu_seconds"] / max(stats["seconds"], 1e-9), **lrs,
            "val_interval_coverage": band["coverage"], "val_interval_width": band["mean_width"],
        }
        train = run.cfg.train
        now = time.monotonic()
        stopping = stops_early([*progress.history, metrics], last_stage, train.stop_patience,
                               settle)
        due = stopping or checkpoint_due(progress, metrics, run.total_epochs,
                                         train.checkpoint_every, train.checkpoint_minutes, now)
        if due:
            progress.checkpoint_epoch, progress.checkpoint_time = epoch, now
        progress.best_val = min(progress.best_val, metrics[METRIC])
        progress.history.append(metrics)
        run.out(epoch_line(run, stage, metrics))
        report_epoch(run, progress, optimizer, calibration, due)
        if stopping:
            run.out(f"[faceage] val MAE has not improved for {train.stop_patience} epochs of the "
                    f"last stage: stopping after epoch {epoch + 1} of {run.total_epochs}")
            break


def validate(run: WorkerRun) -> tuple[dict, IntervalCalibration, dict]:
    """Every worker's validation shard predicted and gathered: the metrics (per source too),
    the interval calibration fitted on them, and how that interval covers them."""
    check_replicas_agree(run.model, run.world)
    share_buffers(run.model, run.world)
    preds, scales = predict(run.model, run.val_loader, run.ctx, run.val_transform,
                            run.cfg.train.eval_tta, run.cfg.train.eval_zoom)
    preds = gather(preds, run.world)
    scales = None if scales is None else gather(scales, run.world)
    low, high = run.val_range[:, 0], run.val_range[:, 1]
    # The interval is calibrated on this epoch's validation predictions (the ones that rank the
    # checkpoint); export stores the best epoch's in the model file. Its residuals need exact
    # ages: range labels count only when there are no exact ones (then to the range's middle).
    exact = low == high
    fit = exact if exact.any() else np.ones_like(exact)
    fit_scales = None if scales is None else scales[fit]
    # Per band of predicted age, every source weighing the same: the 80 % should hold for
    # children, old people and each source, not only on average.
    calibration = IntervalCalibration.fit(preds[fit], run.val_true[fit], fit_scales,
                                          sources=run.val_sources[fit], bands=AGE_BANDS)
    band = coverage_report(*calibration.interval(preds[fit], fit_scales, DEFAULT_COVERAGE),
                           run.val_true[fit])
    # The nearest age in each label's range (the age itself for an exact label): the MAE to it
    # is the mean distance to the range.
    nearest = np.clip(preds, low, high)
    names = run.data.source_names
    val = source_val_metrics(preds, nearest, run.val_sources, names)
    val.update(range_val_metrics(preds, low, high, run.val_sources, names))
    val.update(band_val_metrics(preds, low, high, AGE_BANDS))
    return val, calibration, band


def epoch_line(run: WorkerRun, stage: Stage, m: dict) -> str:
    """One epoch on screen: loss, val MAE (per source when there are several), speed, lr."""
    names = run.data.source_names
    lr = max(v for k, v in m.items() if k.startswith("lr_"))
    return (f"[faceage] epoch {m['epoch'] + 1}/{run.total_epochs} [{stage.name}] "
            f"loss {m['train_loss']:.3f}  val MAE {m['val_mae']:.2f}"
            + ("".join(f" [{n} {m[f'val_mae/{n}']:.2f}]" for n in names)
               + f" all {m['val_mae_all']:.2f}" if len(names) > 1 else "")
            + f"  RMSE {m['val_rmse']:.2f}"
            f"  CS@5 {m['val_cs5']:.1%}  | {m['images_per_s']:.0f} img/s, "
            f"data {m['data_share']:.0%}, {m['epoch_seconds']:.0f}s  lr {lr:.1e}")


def report_epoch(run: WorkerRun, progress: Progress, optimizer,
                 calibration: IntervalCalibration, checkpoint: bool = True) -> None:
    """Report the last epoch's metrics to Ray Train, with rank 0's checkpoint of the run when
    ``checkpoint``."""
    import ray.train

    metrics = progress.history[-1]
    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if run.rank == 0:
            save_checkpoint(tmp, {
                "model": run.model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": run.ctx.scaler.state_dict() if run.ctx.scaler is not None else None,
                "schedule": run.schedule.state_dict(), "epoch": metrics["epoch"],
                "stage": metrics["stage"], "stage_name": metrics["stage_name"],
                "history": progress.history, "resumes": progress.resumes,
                "data_summary": run.summary, "config": run.cfg.to_dict(),
                "interval_calibration": calibration.to_metadata(),
            })
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


# -- the loop ------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's loop on every worker: ``loop_config`` holds the run's config (a dict) and an
    object ref to the driver's shipped ``RunData``."""
    import ray.train

    run = setup(loop_config)
    progress = resume(run, ray.train.get_checkpoint())
    run.model.to(run.device)
    if run.cfg.train.channels_last:
        run.model.to(memory_format=torch.channels_last)
    if progress.start_epoch == 0:
        run.out(start_line(run))
    train_epochs(run, progress)
