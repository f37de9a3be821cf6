"""The training step in plain PyTorch: precision, one epoch, prediction, and the collectives.

Nothing here imports Ray: ``faceage.training.worker`` runs these inside Ray Train's workers, and the
benchmarks and tests call them in one process.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from faceage.data.augment import BatchAugment
from faceage.inference.preprocess import closer_view
from faceage.models.network import laplace_range_nll
from faceage.training.schedule import Stage, UnfreezeSchedule

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


def age_bounds(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` of a batch's targets: (B, 2) age ranges, or (B,) exact ages (each its
    own range)."""
    if targets.dim() == 2:
        return targets[:, 0], targets[:, 1]
    return targets, targets


def nearest_in_range(pred: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The age in [low, high] nearest each (detached) prediction: the age itself for an exact
    label, the prediction inside a range, the nearer end outside it."""
    return torch.minimum(torch.maximum(pred.detach(), low), high)


def range_loss(loss_fn, pred: torch.Tensor, low: torch.Tensor,
               high: torch.Tensor) -> torch.Tensor:
    """The configured loss pulling each prediction into its label's range: zero inside, the loss
    to the nearer end outside; for exact labels (low == high) exactly ``loss_fn(pred, age)``."""
    return loss_fn(pred, nearest_in_range(pred, low, high))


def build_optimizer(model, schedule: UnfreezeSchedule, stage: Stage, weight_decay: float):
    """AdamW over the stage's trainable groups only: frozen groups get no optimizer state."""
    schedule.apply(model, stage)
    return torch.optim.AdamW(schedule.param_groups(model, stage, weight_decay), lr=stage.lr,
                             weight_decay=weight_decay)


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


def step_loss(model, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, loss_fn,
              ctx: StepContext, consistency: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's loss and the predictions of each image's (first) view.

    With ``consistency`` above 0, ``x`` holds two views of every image (all first views, then
    all second ones, each augmented on its own: another crop, tilt, mirror, colour): both are
    trained on, and ``consistency`` times their mean difference in years is added, so a face
    reads the same however it is framed or mirrored (stability training)."""
    inner = _inner(model)
    laplace = getattr(inner, "uncertainty", "none") == "laplace"
    views = 2 if consistency > 0 else 1
    low, high = low.repeat(views), high.repeat(views)
    with ctx.autocast():
        if laplace:
            pred, log_scale = model(x, with_log_scale=True)
        else:
            pred = model(x)
    loss = range_loss(loss_fn, pred.float(), low, high)
    if laplace:
        # The age's loss is the configured one; the scale adds a term on the detached error
        # (for a range row, the censored likelihood of the range).
        loss = loss + laplace_range_nll(pred, log_scale, low, high, inner.age_std)
    if views == 2:
        first, second = pred.float().chunk(2)
        loss = loss + consistency * (first - second).abs().mean()
    return loss, pred[:len(pred) // views]


def train_one_epoch(model, loader, optimizer, schedule: UnfreezeSchedule, epoch: int, loss_fn,
                    ctx: StepContext, augment: BatchAugment,
                    max_steps: int | None, consistency: float = 0.0) -> dict[str, float]:
    """One pass over ``loader``: uint8 batches are augmented on the device, then a step each
    (``consistency``: two views of each image, ``step_loss``)."""
    model.train()
    schedule.apply(model, schedule.stage_at(epoch))
    total_loss = total_abs = 0.0
    seen = 0
    data_seconds = 0.0
    cpu_start = time.process_time()
    start = tick = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        schedule.set_lrs(optimizer, epoch, step)
        images = ctx.to_device(images)
        x = augment(images) if consistency <= 0 else torch.cat([augment(images), augment(images)])
        x = ctx.memory_format(x)
        low, high = age_bounds(ctx.to_device(targets))
        data_seconds += time.perf_counter() - tick
        loss, pred = step_loss(model, x, low, high, loss_fn, ctx, consistency)
        optimizer.zero_grad(set_to_none=True)
        if ctx.scaler is not None:
            ctx.scaler.scale(loss).backward()
            ctx.scaler.step(optimizer)
            ctx.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = low.shape[0]
        seen += n
        total_loss += float(loss.detach()) * n
        # The distance to the label's range: the absolute error for an exact age.
        total_abs += float((pred.detach().float() - nearest_in_range(pred.float(), low, high))
                           .abs().sum())
        tick = time.perf_counter()
    return {
        "loss_sum": total_loss,
        "abs_sum": total_abs,
        "images": seen,
        "seconds": time.perf_counter() - start,
        "data_seconds": data_seconds,
        # CPU time of this whole process (all its threads): over ``seconds``, the cores the
        # training got; below the threads it asked for, other processes took the rest.
        "cpu_seconds": time.process_time() - cpu_start,
    }


def _inner(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


@torch.inference_mode()
def predict(model, loader, ctx: StepContext, transform, tta: bool,
            zoom: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted ages for every batch of uint8 images in ``loader`` (in order), and their Laplace
    scales in years (None for a one-output head); with ``tta`` both average the flipped image's,
    and with ``zoom`` too, the flipped and plain ``closer_view``'s (``AgeModel.tta_zoom``)."""
    model.eval()
    laplace = getattr(_inner(model), "uncertainty", "none") == "laplace"

    def run(x):
        if not laplace:
            return model(x).float(), None
        ages, scales = _inner(model).forward_with_scale(x)
        return ages.float(), scales.float()

    ages_out, scales_out = [], []
    zooms = (None, zoom) if tta and zoom else (None,)
    for images, _ in loader:
        images = ctx.to_device(images)
        views = [ctx.memory_format(transform(closer_view(images, z))) for z in zooms]
        if tta:
            views += [torch.flip(x, dims=[3]) for x in views]
        with ctx.autocast():
            outs = [run(x) for x in views]
        ages_out.append(torch.stack([p for p, _ in outs]).mean(0).cpu().numpy())
        if laplace:
            scales_out.append(torch.stack([s for _, s in outs]).mean(0).cpu().numpy())
    ages = np.concatenate(ages_out) if ages_out else np.zeros(0, np.float32)
    if not laplace:
        return ages, None
    return ages, np.concatenate(scales_out) if scales_out else np.zeros(0, np.float32)


# -- collectives (no-ops on one worker) ----------------------------------------------------------


def gather(values: np.ndarray, world_size: int) -> np.ndarray:
    """Concatenate every worker's array, in rank order."""
    if world_size == 1:
        return values
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, values)
    return np.concatenate(parts)


def sum_across(values: list[float], world_size: int) -> list[float]:
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def share_buffers(model: nn.Module, world_size: int) -> None:
    """Copy rank 0's BatchNorm statistics to all workers, so validation uses the saved model."""
    if world_size == 1:
        return
    for buf in model.buffers():
        torch.distributed.broadcast(buf.data, src=0)


def check_replicas_agree(model: nn.Module, world_size: int) -> None:
    """DDP keeps replicas identical; a mismatch means a wrapping bug, so stop loudly."""
    if world_size == 1:
        return
    with torch.no_grad():
        local = float(sum(p.double().sum() for p in model.parameters()))
    sums = gather(np.array([local]), world_size)
    if not np.allclose(sums, sums[0], rtol=1e-9, atol=0.0):
        raise RuntimeError(f"model replicas differ across workers (parameter sums {sums})")


def say(message: str) -> None:
    """One line to stdout."""
    # Ray Train patches print() into a logger, which doubles lines in job logs; write directly.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
