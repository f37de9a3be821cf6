"""Progressive unfreezing and per-stage LR schedule: a pure object, testable without Ray.

Each stage trains a set of layer groups (the head, then more and more of the backbone from the
output end). Groups that do not train are frozen: no gradients, BatchNorm in eval mode, and no
optimizer state. Inside a stage the LR warms up linearly and then follows cosine decay, or drops
by a factor when val MAE stops improving (plateau). Earlier groups can learn more slowly
(``layer_lr_decay``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from faceage.config import ScheduleConfig, StageConfig
from faceage.errors import UserError


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    groups: tuple[str, ...]  # trainable groups, input → output
    first_epoch: int
    epochs: int
    lr: float

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1


def resolve_groups(spec: int | str | list[str], group_names: list[str]) -> tuple[str, ...]:
    """Turn a stage's ``train`` setting into the trainable group names, in model order."""
    head, backbone = group_names[-1], group_names[:-1]
    if spec == "all":
        return tuple(group_names)
    if isinstance(spec, int):
        if spec < 0 or spec > len(backbone):
            raise UserError(
                f"stage train={spec}: this backbone has {len(backbone)} groups to unfreeze "
                f"({', '.join(backbone)})"
            )
        return tuple(backbone[len(backbone) - spec:]) + (head,)
    if not spec:
        raise UserError("stage train=[]: name at least one group to train, e.g. [head]")
    unknown = [g for g in spec if g not in group_names]
    if unknown:
        raise UserError(
            f"stage train={spec}: unknown groups {unknown}; this backbone has {group_names}"
        )
    return tuple(g for g in group_names if g in spec)


class UnfreezeSchedule:
    """Which groups train at each epoch, and each group's LR at each step."""

    def __init__(self, cfg: ScheduleConfig, group_names: list[str], steps_per_epoch: int):
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1")
        self.cfg = cfg
        self.group_names = list(group_names)
        self.steps_per_epoch = steps_per_epoch
        self.stages: list[Stage] = []
        epoch = 0
        for i, s in enumerate(cfg.stages):
            self.stages.append(self._stage(i, s, epoch))
            epoch += s.epochs
        self.total_epochs = epoch
        # Plateau state: the multiplier and the best metric seen in the current stage.
        self._plateau_scale = 1.0
        self._plateau_best = math.inf
        self._plateau_bad = 0
        self._plateau_stage = 0

    def _stage(self, index: int, s: StageConfig, first_epoch: int) -> Stage:
        groups = resolve_groups(s.train, self.group_names)
        return Stage(index, s.name or f"stage{index + 1}", groups, first_epoch, s.epochs, s.lr)

    # -- where are we ---------------------------------------------------------------------------

    def stage_at(self, epoch: int) -> Stage:
        for stage in self.stages:
            if epoch <= stage.last_epoch:
                return stage
        raise IndexError(f"epoch {epoch} is past the schedule ({self.total_epochs} epochs)")

    def is_stage_start(self, epoch: int) -> bool:
        return any(s.first_epoch == epoch for s in self.stages)

    # -- learning rates -------------------------------------------------------------------------

    def group_lr_scale(self, stage: Stage, group: str) -> float:
        """``layer_lr_decay`` ** (distance from the head among this stage's trainable groups)."""
        distance = len(stage.groups) - 1 - stage.groups.index(group)
        return self.cfg.layer_lr_decay**distance

    def lr_factor(self, epoch: int, step: int) -> float:
        """Multiplier on the stage LR at ``step`` (0-based) of ``epoch``: warmup then decay."""
        stage = self.stage_at(epoch)
        total = stage.epochs * self.steps_per_epoch
        t = (epoch - stage.first_epoch) * self.steps_per_epoch + step
        warmup = int(self.cfg.warmup * total)
        floor = self.cfg.min_lr_ratio
        if t < warmup:
            return floor + (1.0 - floor) * (t + 1) / (warmup + 1)
        if self.cfg.decay == "cosine":
            span = max(total - warmup, 1)
            progress = min((t - warmup) / span, 1.0)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.cfg.decay == "plateau":
            return self._plateau_scale if self._plateau_stage == stage.index else 1.0
        return 1.0

    def lrs(self, epoch: int, step: int) -> dict[str, float]:
        """LR of every trainable group at this step."""
        stage = self.stage_at(epoch)
        base = stage.lr * self.lr_factor(epoch, step)
        return {g: base * self.group_lr_scale(stage, g) for g in stage.groups}

    def end_epoch(self, epoch: int, val_mae: float) -> None:
        """Feed the epoch's validation MAE to the plateau rule (no-op for other decays)."""
        stage = self.stage_at(epoch)
        if stage.index != self._plateau_stage:
            self._plateau_stage, self._plateau_scale = stage.index, 1.0
            self._plateau_best, self._plateau_bad = math.inf, 0
        if val_mae < self._plateau_best - 1e-4:
            self._plateau_best, self._plateau_bad = val_mae, 0
        else:
            self._plateau_bad += 1
            if self._plateau_bad > self.cfg.plateau_patience:
                self._plateau_scale *= self.cfg.plateau_factor
                self._plateau_bad = 0

    def state_dict(self) -> dict:
        return {
            "plateau_scale": self._plateau_scale,
            "plateau_best": self._plateau_best,
            "plateau_bad": self._plateau_bad,
            "plateau_stage": self._plateau_stage,
        }

    def load_state_dict(self, state: dict) -> None:
        self._plateau_scale = float(state["plateau_scale"])
        self._plateau_best = float(state["plateau_best"])
        self._plateau_bad = int(state["plateau_bad"])
        self._plateau_stage = int(state["plateau_stage"])

    # -- applying a stage to a model ------------------------------------------------------------

    def apply(self, model: nn.Module, stage: Stage) -> None:
        """Freeze and unfreeze groups for ``stage``; call again after every ``model.train()``."""
        for name, module in _groups_of(model):
            trainable = name in stage.groups
            for p in module.parameters():
                p.requires_grad_(trainable)
            if not trainable:
                # Frozen BatchNorm keeps its ImageNet statistics: eval mode stops the updates.
                for m in module.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()

    def param_groups(self, model: nn.Module, stage: Stage, weight_decay: float = 0.0
                     ) -> list[dict]:
        """Optimizer parameter groups for the trainable groups only, each tagged with its name.

        Each layer group splits in two: weights of convolutions and linear layers decay by
        ``weight_decay``; biases and normalisation weights (every 1-D parameter) do not, as in
        torchvision's reference recipes (``norm_weight_decay=0``) and timm. Both halves carry the
        group's name, so they share its LR.
        """
        groups = []
        for name, module in _groups_of(model):
            if name in stage.groups:
                params = [p for p in module.parameters() if p.requires_grad]
                decay = [p for p in params if p.ndim > 1]
                no_decay = [p for p in params if p.ndim <= 1]
                for part, wd in ((decay, weight_decay), (no_decay, 0.0)):
                    if part:
                        groups.append({"params": part, "name": name, "lr": stage.lr,
                                       "weight_decay": wd})
        return groups

    def split_old_state(self, model: nn.Module, stage: Stage, state: dict) -> dict:
        """An optimizer state saved with one group per layer group (checkpoints from before the
        decay / no-decay split) laid out as ``param_groups`` builds them now, so such runs
        resume with their optimizer; any other state comes back unchanged."""
        layer_groups = [(n, m) for n, m in _groups_of(model) if n in stage.groups]
        old_groups = state.get("param_groups", [])
        if [g.get("name") for g in old_groups] != [n for n, _ in layer_groups]:
            return state
        groups, moments = [], {}
        for old, (_, module) in zip(old_groups, layer_groups, strict=True):
            params = [p for p in module.parameters() if p.requires_grad]
            if len(params) != len(old["params"]):
                return state
            for decays in (True, False):
                ids = [i for p, i in zip(params, old["params"], strict=True)
                       if (p.ndim > 1) == decays]
                if not ids:
                    continue
                first = sum(len(g["params"]) for g in groups)
                for k, i in enumerate(ids):
                    if i in state["state"]:
                        moments[first + k] = state["state"][i]
                groups.append({**old, "params": list(range(first, first + len(ids))),
                               "weight_decay": old.get("weight_decay", 0.0) if decays else 0.0})
        return {"state": moments, "param_groups": groups}

    def set_lrs(self, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> dict[str, float]:
        lrs = self.lrs(epoch, step)
        for group in optimizer.param_groups:
            group["lr"] = lrs[group["name"]]
        return lrs

    def describe(self) -> str:
        lines = []
        for s in self.stages:
            lines.append(
                f"  {s.name:<10} epochs {s.first_epoch + 1}-{s.last_epoch + 1}  lr {s.lr:.2e}  "
                f"trains {', '.join(s.groups)}"
            )
        return "\n".join(lines)


def _groups_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    return inner.layer_groups()
