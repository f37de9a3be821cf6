"""Backbone registry and the age-regression model (backbone + Linear→ReLU→Dropout→Linear head).

With ``uncertainty="laplace"`` the head's last layer has two outputs: the standardised age and
the log of a Laplace scale (how far off the age is likely to be, in standardised units). The
scale output reads the hidden features detached, and its loss (``laplace_nll``) uses the age
detached, so the age, the hidden layer and the backbone train exactly as with a one-output head.
"""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from faceage.config import ModelConfig
from faceage.errors import UserError

HEAD = "head"
UNCERTAINTY = ("none", "laplace")
# The log-scale is clamped in standardised units: with UTKFace's spread (~20 years) scales stay
# between ~0.05 and ~150 years, and exp() never overflows in bf16/fp16.
LOG_SCALE_MIN, LOG_SCALE_MAX = -6.0, 2.0


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a torchvision backbone and cut it into layer groups (input → output)."""

    factory: Callable[..., nn.Module]
    weights: torchvision.models.WeightsEnum
    feature_dim: int
    groups: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    trunk: Callable[[nn.Module], nn.Module]


def _features_groups(bounds: list[tuple[str, int, int]]):
    def groups(net: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(name, net.features[a:b]) for name, a, b in bounds]

    return groups


def _pooled_features(net: nn.Module) -> nn.Module:
    return nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _resnet_groups(net: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]


def _resnet_trunk(net: nn.Module) -> nn.Module:
    groups = [m for _, m in _resnet_groups(net)]
    return nn.Sequential(*groups, nn.AdaptiveAvgPool2d(1), nn.Flatten())


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        factory=torchvision.models.mobilenet_v2,
        weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
        feature_dim=1280,
        groups=_features_groups(
            [("stem", 0, 2), ("block1", 2, 4), ("block2", 4, 7), ("block3", 7, 11),
             ("block4", 11, 14), ("block5", 14, 17), ("block6", 17, 19)]
        ),
        trunk=_pooled_features,
    ),
    "mobilenet_v3_large": BackboneSpec(
        factory=torchvision.models.mobilenet_v3_large,
        weights=torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        feature_dim=960,
        groups=_features_groups(
            [("stem", 0, 2), ("block1", 2, 4), ("block2", 4, 7), ("block3", 7, 11),
             ("block4", 11, 13), ("block5", 13, 16), ("block6", 16, 17)]
        ),
        trunk=_pooled_features,
    ),
    "resnet50": BackboneSpec(
        factory=torchvision.models.resnet50,
        weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
        feature_dim=2048,
        groups=_resnet_groups,
        trunk=_resnet_trunk,
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        ) from None


class AgeNet(nn.Module):
    """A pretrained trunk and a small regression head; ``forward`` returns ages in years, (B,).

    ``uncertainty="laplace"``: the head's last Linear has a second output, a log-scale;
    ``forward_with_scale`` returns the ages and those scales in years.
    """

    def __init__(self, backbone: str, head_hidden: int = 256, dropout: float = 0.3,
                 net: nn.Module | None = None, uncertainty: str = "none"):
        super().__init__()
        if uncertainty not in UNCERTAINTY:
            raise UserError(f"model.uncertainty {uncertainty!r}: choose one of "
                            f"{', '.join(UNCERTAINTY)}")
        spec = backbone_spec(backbone)
        net = net if net is not None else spec.factory(weights=None)
        self.backbone_name = backbone
        self.uncertainty = uncertainty
        self.trunk = spec.trunk(net)
        self._group_modules = spec.groups(net)
        self.head = nn.Sequential(
            nn.Linear(spec.feature_dim, head_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, 2 if uncertainty == "laplace" else 1),
        )
        # The head predicts a standardised age; these buffers travel with the weights so a
        # model file is self-contained. Defaults are UTKFace's rough mean and spread.
        self.register_buffer("age_mean", torch.tensor(33.0))
        self.register_buffer("age_std", torch.tensor(20.0))

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        """Named parameter groups from input to output, the head last."""
        return [*self._group_modules, (HEAD, self.head)]

    def group_names(self) -> list[str]:
        return [name for name, _ in self.layer_groups()]

    def set_target_stats(self, mean: float, std: float) -> None:
        self.age_mean.fill_(float(mean))
        self.age_std.fill_(max(float(std), 1e-3))

    def forward(self, x: torch.Tensor, with_log_scale: bool = False):
        """Ages in years (B,); with ``with_log_scale``, ``(ages, log_scale)`` where log_scale is
        the clamped standardised log-scale (B,) or None for a one-output head.

        (A keyword of ``forward``, not another method, so DistributedDataParallel sees the call.)
        """
        hidden = self.head[:-1](self.trunk(x))
        last = self.head[-1]
        z = F.linear(hidden, last.weight[:1], last.bias[:1]).squeeze(1)
        ages = z.float() * self.age_std + self.age_mean
        if not with_log_scale:
            return ages
        if self.uncertainty == "none":
            return ages, None
        # Detached: the scale learns from the features, never reshapes them.
        s = F.linear(hidden.detach(), last.weight[1:], last.bias[1:]).squeeze(1).float()
        return ages, s.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)

    def forward_with_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ages and Laplace scales, both in years, (B,) each; scales None for a one-output head."""
        ages, log_scale = self(x, with_log_scale=True)
        if log_scale is None:
            return ages, None
        return ages, torch.exp(log_scale) * self.age_std


def laplace_nll(ages: torch.Tensor, log_scale: torch.Tensor, true: torch.Tensor,
                age_std: torch.Tensor) -> torch.Tensor:
    """Mean Laplace negative log-likelihood of ``true`` in standardised units, for the scale only.

    The residual is taken from the detached age, so this term never changes the age's gradient.
    """
    r = (true.float() - ages.detach().float()).abs() / age_std
    return (r * torch.exp(-log_scale) + log_scale).mean()


def laplace_range_nll(ages: torch.Tensor, log_scale: torch.Tensor, low: torch.Tensor,
                      high: torch.Tensor, age_std: torch.Tensor) -> torch.Tensor:
    """``laplace_nll`` for rows labelled by an age range: the censored likelihood.

    A range row's term is -log P(low <= age <= high) under Laplace(age, scale), in the same
    standardised units; an exact row's (low == high) is ``laplace_nll``'s point term, exactly.
    Worked in log space, so an age far outside its range gives a large finite term (not the log
    of an underflowed 0); the age is detached, as in ``laplace_nll``.
    """
    mu, log_scale = ages.detach().float(), log_scale.float()
    inv_b = torch.exp(-log_scale)
    lo = (low.float() - mu) / age_std * inv_b  # the range's ends in units of the scale
    hi = (high.float() - mu) / age_std * inv_b
    # log(1 - e^-w) of the range's width w; clamped so exact rows (w = 0) stay finite here,
    # where torch.where would otherwise turn their unused inf into a NaN gradient.
    log_gap = torch.log(-torch.expm1(-(hi - lo).clamp(min=1e-6)))
    log_half = -0.6931471805599453
    below = log_half + hi + log_gap  # the whole range below the age: F = e^u / 2 there
    above = log_half - lo + log_gap  # the whole range above it: 1 - F = e^-u / 2
    tails = 0.5 * (torch.exp(lo.clamp(max=0.0)) + torch.exp(-hi.clamp(min=0.0)))
    around = torch.log1p(-tails.clamp(max=1.0 - 1e-6))  # the age inside the range
    log_p = torch.where(hi <= 0, below, torch.where(lo >= 0, above, around))
    r = (high.float() - mu).abs() / age_std  # exact rows: high == low == the age
    point = r * torch.exp(-log_scale) + log_scale
    return torch.where(low == high, point, -log_p).mean()


def head_uncertainty(state: dict[str, torch.Tensor]) -> str:
    """``laplace`` when a state_dict's head has two outputs, else ``none``."""
    weight = state.get("head.3.weight")
    return "laplace" if weight is not None and weight.shape[0] == 2 else "none"


def _weights_file(spec: BackboneSpec, weights_dir: str | None) -> Path | None:
    """A local copy of torchvision's weight file, looked up by its published file name."""
    filename = os.path.basename(spec.weights.url)
    dirs = [weights_dir] if weights_dir else []
    dirs.append(os.path.join(torch.hub.get_dir(), "checkpoints"))
    for d in dirs:
        p = Path(d).expanduser() / filename
        if p.is_file():
            return p
    return None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"pretrained weights file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise UserError(f"{p} is not a loadable PyTorch state_dict: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{p} does not hold a state_dict (a dict of tensors)")
    return state


def _pretrained_net(backbone: str, pretrained: str, weights_dir: str | None) -> nn.Module:
    spec = backbone_spec(backbone)
    net = spec.factory(weights=None)
    if pretrained == "none":
        return net
    if pretrained == "imagenet":
        local = _weights_file(spec, weights_dir)
        if local is None:
            try:
                # torchvision's own API: downloads into $TORCH_HOME/hub/checkpoints once.
                return spec.factory(weights=spec.weights)
            except (urllib.error.URLError, OSError) as exc:
                name = os.path.basename(spec.weights.url)
                raise UserError(
                    f"could not download ImageNet weights for {backbone} ({exc}). Offline, copy "
                    f"{name} into {os.path.join(torch.hub.get_dir(), 'checkpoints')} or set "
                    "model.weights_dir to the folder holding it, or use model.pretrained=none."
                ) from None
        state = load_state_dict_file(local)
    else:
        state = load_state_dict_file(pretrained)
    missing, unexpected = net.load_state_dict(state, strict=False)
    # The ImageNet classifier is replaced by our head, so only trunk keys matter.
    missing = [k for k in missing if not k.startswith(("classifier", "fc."))]
    if missing or len(unexpected) > len(state) // 2:
        raise UserError(
            f"weights {pretrained!r} do not fit backbone {backbone}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {list(unexpected)[:3]})"
        )
    return net


def build_model(backbone: str, pretrained: str = "none", head_hidden: int = 256,
                dropout: float = 0.3, weights_dir: str | None = None,
                uncertainty: str = "none") -> AgeNet:
    """Build an ``AgeNet``; ``pretrained`` is ``imagenet``, ``none`` or a state_dict path."""
    net = _pretrained_net(backbone, pretrained, weights_dir)
    return AgeNet(backbone, head_hidden=head_hidden, dropout=dropout, net=net,
                  uncertainty=uncertainty)


def build_model_from(model: ModelConfig) -> AgeNet:
    """The ``AgeNet`` a run's ``model`` settings describe, with its pretrained trunk.

    Callers that need another variant pass a copy, e.g. ``model.model_copy(update=
    {"pretrained": "none"})``.
    """
    return build_model(model.backbone, model.pretrained, model.head_hidden, model.dropout,
                       model.weights_dir, model.uncertainty)
