"""Training on Ray Train: plain PyTorch in ``train_loop_per_worker``, scaled by ``TorchTrainer``.

Run locally with ``faceage train --config configs/train.yaml`` or on a cluster with
``ray job submit --working-dir . -- python -m faceage.train --config configs/train.yaml``.
The same loop runs on one CPU or many GPUs: only ``scaling`` in the config changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from faceage.config import Config, load_config, save_config
from faceage.data import (
    assign_split,
    eval_transform,
    make_dataset,
    prepare_data,
    preprocessing_metadata,
    read_dataset,
    train_transform,
)
from faceage.errors import UserError
from faceage.metrics import mae_by_decade, regression_metrics
from faceage.models import AgeRegressor, build_model
from faceage.schedule import UnfreezeSchedule

log = logging.getLogger("faceage.train")

CHECKPOINT_FILE = "checkpoint.pt"
METRIC = "val_mae"


# -- hardware ------------------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
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
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def train_one_epoch(model, loader, optimizer, schedule: UnfreezeSchedule, epoch: int, loss_fn,
                    ctx: StepContext, max_steps: int | None) -> dict[str, float]:
    model.train()
    schedule.apply(model, schedule.stage_at(epoch))
    total_loss = total_abs = 0.0
    seen = 0
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        schedule.set_lrs(optimizer, epoch, step)
        x, y = ctx.to_device(x), y.to(ctx.device)
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
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_mae": total_abs / max(seen, 1),
        "train_images": seen,
        "train_seconds": seconds,
    }


@torch.inference_mode()
def predict_dataset(model, dataset, ctx: StepContext, batch_size: int, tta: bool) -> np.ndarray:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = []
    for x, _ in loader:
        x = ctx.to_device(x)
        with ctx.autocast():
            p = model(x).float()
            if tta:
                p = (p + model(torch.flip(x, dims=[3])).float()) / 2
        out.append(p.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _gather(values: np.ndarray, world_size: int) -> np.ndarray:
    if world_size == 1:
        return values
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, values)
    return np.concatenate(parts)


def _say(message: str) -> None:
    # Ray Train patches print() into a logger, which doubles lines in job logs; write directly.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


# -- the Ray Train loop --------------------------------------------------------------------------


def _build_optimizer(model, schedule: UnfreezeSchedule, stage, weight_decay: float):
    inner = getattr(model, "module", model)
    schedule.apply(inner, stage)
    return torch.optim.AdamW(schedule.param_groups(inner, stage), lr=stage.lr,
                             weight_decay=weight_decay)


def _wrap(model: AgeRegressor, world_size: int):
    """DDP registers only parameters that require grad, so wrap again whenever a stage starts."""
    import ray.train.torch

    if world_size == 1:
        return model
    return ray.train.torch.prepare_model(model, move_to_device=False)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)
    say = _say if rank == 0 else (lambda *a, **k: None)

    data = prepare_data(cfg.data, cfg.model.input_size, progress=rank == 0)
    say(f"[faceage] data: {data.report.summary()}")
    summary = data.summary()
    say(f"[faceage] split: train {summary['train']}, val {summary['val']}, "
        f"test {summary['test']} (seed {cfg.data.split.seed})")

    train_ds = make_dataset(data, "train",
                            train_transform(cfg.model.input_size, cfg.train.augment))
    val_ds = make_dataset(data, "val", eval_transform(cfg.model.input_size))
    val_shard = torch.utils.data.Subset(val_ds, list(range(rank, len(val_ds), world)))
    val_true = data.subset("val")["age"].to_numpy()
    val_true = _gather(val_true[rank::world], world)

    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
        num_workers=cfg.data.loader_workers, persistent_workers=cfg.data.loader_workers > 0,
        pin_memory=device.type == "cuda")
    steps = len(loader)
    if steps == 0:
        raise UserError(
            f"train split has {len(train_ds)} images: too few for batch_size "
            f"{cfg.train.batch_size} x {world} workers; lower train.batch_size"
        )
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)

    model = build_model(cfg.model.backbone, cfg.model.pretrained, cfg.model.head_hidden,
                        cfg.model.dropout, cfg.model.weights_dir)
    model.set_target_stats(summary["train_age_mean"], summary["train_age_std"] or 1.0)
    schedule = UnfreezeSchedule(cfg.schedule, model.group_names(), steps)
    dtype = autocast_dtype(cfg.train.precision, device)
    use_scaler = device.type == "cuda" and dtype == torch.float16
    ctx = StepContext(device, dtype, cfg.train.channels_last,
                      torch.amp.GradScaler("cuda") if use_scaler else None)

    start_epoch, history, opt_state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if schedule.stage_at(min(start_epoch, schedule.total_epochs - 1)).index == state["stage"]:
            opt_state = state["optimizer"]
        say(f"[faceage] resumed from checkpoint after epoch {start_epoch} "
            f"(stage {state['stage_name']})")
    model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rank == 0 and start_epoch == 0:
        say(f"[faceage] {cfg.model.backbone}, {cfg.total_epochs} epochs, {steps} steps/epoch, "
            f"precision {dtype or torch.float32}, {world} worker(s) on {device.type}\n"
            + schedule.describe())

    loss_fn = make_loss(cfg.train.loss)
    wrapped, optimizer = model, None
    for epoch in range(start_epoch, schedule.total_epochs):
        stage = schedule.stage_at(epoch)
        if optimizer is None or schedule.is_stage_start(epoch):
            optimizer = _build_optimizer(model, schedule, stage, cfg.train.weight_decay)
            if opt_state is not None:
                optimizer.load_state_dict(opt_state)
                opt_state = None
            wrapped = _wrap(model, world)
        sampler.set_epoch(epoch)
        stats = train_one_epoch(wrapped, loader, optimizer, schedule, epoch, loss_fn, ctx, steps)
        preds = _gather(predict_dataset(model, val_shard, ctx, cfg.train.batch_size * 2,
                                        cfg.train.eval_tta), world)
        val = regression_metrics(preds, val_true)
        schedule.end_epoch(epoch, val["mae"])
        images_per_s = stats["train_images"] * world / max(stats["train_seconds"], 1e-9)
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}
        metrics = {
            "epoch": epoch, "stage": stage.index, "stage_name": stage.name,
            "train_loss": stats["train_loss"], "train_mae": stats["train_mae"],
            "val_mae": val["mae"], "val_rmse": val["rmse"], "val_cs5": val["cs5"],
            "images_per_s": images_per_s, "epoch_seconds": stats["train_seconds"], **lrs,
        }
        history.append(metrics)
        say(f"[faceage] epoch {epoch + 1}/{schedule.total_epochs} [{stage.name}] "
            f"loss {stats['train_loss']:.3f}  val MAE {val['mae']:.2f}  RMSE {val['rmse']:.2f}  "
            f"CS@5 {val['cs5']:.1%}  {images_per_s:.0f} img/s  "
            f"lr {max(lrs.values()):.1e}")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "epoch": epoch, "stage": stage.index,
                    "stage_name": stage.name, "history": history,
                }, Path(tmp) / CHECKPOINT_FILE)
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
            callbacks=extra_callbacks or None,
        ),
    )


def write_split(cfg: Config, run_dir: Path) -> Path:
    """Record which file went to which split, so runs can be compared and audited."""
    df, _ = read_dataset(cfg.data)
    df = df.assign(split=assign_split(df["path"].tolist(), cfg.data.split))
    path = run_dir / "split.csv"
    df[["path", "age", "split"]].to_csv(path, index=False)
    return path


def data_crop_policy(cfg: Config) -> dict:
    """How the training images were framed; inference crops faces the same way."""
    if cfg.data.format == "prepared":
        idx = Path(cfg.data.path)
        meta_path = (idx if idx.is_dir() else idx.parent) / "prepare.json"
        if meta_path.is_file():
            return json.loads(meta_path.read_text())["crop_policy"]
    return {"name": "utkface-chip"}


def export_best(result, cfg: Config, run_dir: Path, data_summary: dict | None = None) -> tuple[Path, dict]:
    """Export the best checkpoint (lowest val MAE) of ``result`` as a model file."""
    from faceage.modelfile import save_model_file

    ranked = sorted(result.best_checkpoints or [], key=lambda cm: cm[1][METRIC])
    if not ranked:
        raise RuntimeError("training produced no checkpoint to export")
    best_ckpt, best_metrics = ranked[0]
    with best_ckpt.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    with result.checkpoint.as_directory() as d:
        history = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu",
                             weights_only=True)["history"]
    model = build_model(cfg.model.backbone, "none", cfg.model.head_hidden, cfg.model.dropout)
    model.load_state_dict(state["model"])
    metadata = {
        "name": f"faceage-{cfg.model.backbone}",
        "preprocessing": preprocessing_metadata(cfg.model.input_size),
        "crop_policy": data_crop_policy(cfg),
        "data": data_summary or {"format": cfg.data.format, "path": cfg.data.path},
        "metrics": {k: best_metrics[k] for k in ("val_mae", "val_rmse", "val_cs5", "epoch")},
        "config": cfg.to_dict(),
    }
    path = save_model_file(model, run_dir / "model.pt", metadata)
    return path, {"best": best_metrics, "history": history}


def summary_table(history: list[dict], best_epoch: int) -> str:
    lines = ["epoch  stage       train_loss  val_MAE  val_RMSE  CS@5    img/s",
             "-----  ----------  ----------  -------  --------  ------  -----"]
    for h in history:
        mark = " *" if h["epoch"] == best_epoch else ""
        lines.append(f"{h['epoch'] + 1:>5}  {h['stage_name']:<10}  {h['train_loss']:>10.3f}  "
                     f"{h['val_mae']:>7.2f}  {h['val_rmse']:>8.2f}  {h['val_cs5']:>6.1%}  "
                     f"{h['images_per_s']:>5.0f}{mark}")
    return "\n".join(lines)


@dataclass
class TrainOutcome:
    run_dir: Path
    model_path: Path
    best: dict
    history: list[dict]


def run_training(cfg: Config, callbacks: list | None = None) -> TrainOutcome:
    """Train with Ray Train, export the best checkpoint, write curves and a summary."""
    import ray

    from faceage.plots import learning_curves

    cfg = cfg.with_absolute_paths()
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    write_split(cfg, run_dir)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    started = time.time()
    result = build_trainer(cfg, callbacks).fit()
    if result.error:
        raise result.error
    model_path, info = export_best(result, cfg, run_dir)
    history = info["history"]
    learning_curves(history, run_dir / "curves.png",
                    title=f"{cfg.name}: {cfg.model.backbone} @ {cfg.model.input_size}px")
    best = info["best"]
    (run_dir / "summary.json").write_text(json.dumps(
        {"best": best, "history": history, "model": str(model_path),
         "wall_seconds": time.time() - started}, indent=2, default=float))
    print("\n" + summary_table(history, best["epoch"]))
    print(f"\nbest val MAE {best['val_mae']:.2f} at epoch {best['epoch'] + 1}; "
          f"{time.time() - started:.0f}s")
    print(f"model:  {model_path}\ncurves: {run_dir / 'curves.png'}\nrun:    {run_dir}")
    return TrainOutcome(run_dir, model_path, best, history)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], nargs="+",
                   metavar="KEY=VALUE", help="override a setting, e.g. train.batch_size=32")


def flat_overrides(args: argparse.Namespace) -> list[str]:
    return [item for group in args.overrides for item in group]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m faceage.train", description=__doc__.split("\n")[0])
    add_train_arguments(p)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, flat_overrides(args))
        run_training(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
