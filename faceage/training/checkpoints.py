"""Training checkpoints: what one holds, when an epoch writes one, and where a run stands.

A checkpoint is a plain dict of types and tensors (``save_checkpoint``; loads with
``weights_only``) in a ``ray.train.Checkpoint``; Ray Train keeps the best ``train.keep_checkpoints``
by ``METRIC`` and the latest. ``checkpoint_due`` decides which epochs write one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from faceage.errors import UserError

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "faceage-checkpoint"
METRIC = "val_mae"


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


@dataclass
class Progress:
    """Where the run stands: the next epoch, the epochs trained and the resumes so far, and
    the last checkpoint (its epoch and time) and best val MAE."""

    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    resumes: list[dict] = field(default_factory=list)
    opt_state: dict | None = None  # the checkpoint's optimizer state, for the stage it resumes
    best_val: float = math.inf
    checkpoint_epoch: int = -1
    checkpoint_time: float = field(default_factory=time.monotonic)


def stops_early(history: list[dict], last_stage: int, patience: int | None,
                settle: int = 0) -> bool:
    """Whether the last stage has gone ``patience`` epochs without a better val MAE than its
    best (``train.stop_patience``): val MAE has stopped falling, more epochs would only cost.

    Never before the stage has run ``settle`` epochs: while its LR is high (warmup, the top of
    the cosine) val MAE is often worse than at the stage's first epoch, and falls as the LR
    decays. The worker passes half the stage."""
    if patience is None:
        return False
    maes = [h[METRIC] for h in history if h["stage"] == last_stage]
    if len(maes) <= patience or len(maes) < settle:
        return False
    best = maes.index(min(maes))
    return len(maes) - 1 - best >= patience


def checkpoint_due(progress: Progress, metrics: dict, total_epochs: int, every: int,
                   minutes: float, now: float) -> bool:
    """Whether this epoch's report carries a checkpoint: when val MAE improved (the best epoch
    is what export wants), at the last epoch (export reads the run's history off it), every
    ``every`` epochs and after ``minutes`` (what a resume may lose). Other epochs report their
    metrics alone: a checkpoint that will not be kept costs a save and an upload for nothing
    (issue 32)."""
    epoch = metrics["epoch"]
    return (epoch + 1 >= total_epochs or metrics[METRIC] < progress.best_val
            or epoch - progress.checkpoint_epoch >= every
            or now - progress.checkpoint_time >= 60 * minutes)
