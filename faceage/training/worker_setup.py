"""A Ray Train worker's setup: ``setup`` builds the ``WorkerRun`` its training steps share
(device, loaders, model, schedule) from the driver's config and ``RunData``; ``start_line`` says
what a fresh run trains. ``faceage.training.worker`` runs the steps."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from faceage.compat import quiet_train_report_log
from faceage.config import Config
from faceage.data.augment import BatchAugment
from faceage.data.run_data import RunData
from faceage.data.sampling import train_sampler
from faceage.errors import UserError
from faceage.inference.preprocess import eval_transform
from faceage.models.backbones import backbone_spec
from faceage.models.network import AgeNet, build_model_from
from faceage.training.loop import StepContext, autocast_dtype, gather, say
from faceage.training.schedule import UnfreezeSchedule


@dataclass
class WorkerRun:
    """What one worker's training steps share, built once by ``setup``."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    data: RunData
    summary: dict  # the data summary the driver printed: counts, training ages, skipped files
    sampler: torch.utils.data.Sampler
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader  # this worker's shard of the validation split
    val_true: np.ndarray  # every worker's validation ages, gathered in rank order
    val_sources: np.ndarray  # and their sources
    val_range: np.ndarray  # and their age ranges (N, 2): low == high == the age for an exact one
    steps: int  # per epoch
    augment: BatchAugment
    val_transform: Callable
    model: AgeNet
    schedule: UnfreezeSchedule
    ctx: StepContext
    out: Callable[[str], None]  # say() on rank 0, silent elsewhere

    @property
    def total_epochs(self) -> int:
        return self.schedule.total_epochs


def _configure_process(cfg: Config, device: torch.device) -> None:
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # the same initial head on every worker
    # The run config's LoggingConfig leaves the "ray" logger's console handler alone, so a line
    # per report and checkpoint would still reach the job log from every worker.
    logging.getLogger("ray.train").setLevel(cfg.train.ray_log_level)
    quiet_train_report_log(cfg.train.ray_log_level)


def _loaders(data: RunData, cfg: Config, rank: int, world: int, device: torch.device):
    """This worker's train loader (a distributed sampler) and validation shard loader."""
    train_ds = data.dataset("train")
    val_ds = data.dataset("val")
    val_shard = torch.utils.data.Subset(val_ds, list(range(rank, len(val_ds), world)))
    # Equal source weights and no balance: DistributedSampler, every image once per epoch; else
    # weighted draws (by source weight, and by age band with data.balance).
    sampler = train_sampler(train_ds, data.source_column("train"), data.source_weights,
                            world, rank, cfg.seed, ages=data.subset("train")["age"].to_numpy(),
                            balance=cfg.data.balance)
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


def setup(loop_config: dict) -> WorkerRun:
    """The worker's device, its share of the driver's data, the model and the schedule."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    _configure_process(cfg, device)

    # The driver read, split and decoded the data; this is its table, not a second reading.
    data = RunData.from_shipped(ray.get(loop_config["data"]), progress=rank == 0)
    summary = data.summary()
    sampler, loader, val_loader = _loaders(data, cfg, rank, world, device)
    val_true = gather(data.subset("val")["age"].to_numpy()[rank::world], world)
    val_sources = gather(data.source_column("val")[rank::world], world)
    val_range = gather(data.subset("val")[["age_low", "age_high"]].to_numpy()[rank::world], world)
    steps = len(loader)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    spec = backbone_spec(cfg.model.backbone)  # each backbone is normalised its own way
    augment = BatchAugment(cfg.model.input_size, cfg.train.augment, spec.mean, spec.std).to(device)
    val_transform = eval_transform(cfg.model.input_size, spec.mean, spec.std)

    model = build_model_from(cfg.model)
    model.set_target_stats(summary["train_age_mean"], summary["train_age_std"] or 1.0)
    schedule = UnfreezeSchedule(cfg.schedule, model.group_names(), steps)
    dtype = autocast_dtype(cfg.train.precision, device)
    use_scaler = device.type == "cuda" and dtype == torch.float16
    ctx = StepContext(device, dtype, cfg.train.channels_last,
                      torch.amp.GradScaler("cuda") if use_scaler else None)
    out = say if rank == 0 else (lambda *a, **k: None)
    return WorkerRun(cfg, rank, world, device, data, summary, sampler, loader, val_loader,
                     val_true, val_sources, val_range, steps, augment, val_transform, model,
                     schedule, ctx, out)


def start_line(run: WorkerRun) -> str:
    """What a fresh run trains, and how."""
    cfg, dtype = run.cfg, run.ctx.dtype
    return (f"[faceage] {cfg.model.backbone} @ {cfg.model.input_size}px, {run.total_epochs} "
            f"epochs x {run.steps} steps of {cfg.train.batch_size} x {run.world} worker(s) on "
            f"{run.device.type}, precision {str(dtype or torch.float32).replace('torch.', '')}\n"
            + run.schedule.describe())
