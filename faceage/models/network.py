"""The age-regression model (backbone + Linear→ReLU→Dropout→Linear head).

With ``uncertainty="laplace"`` the head's last layer has two outputs: the standardised age and
the log of a Laplace scale (how far off the age is likely to be, in standardised units). The
scale output reads the hidden features detached, and its loss (``laplace_nll``) uses the age
detached, so the age, the hidden layer and the backbone train exactly as with a one-output head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from faceage.config import ModelConfig
from faceage.errors import UserError
from faceage.models.backbones import backbone_spec, pretrained_net

HEAD = "head"
UNCERTAINTY = ("none", "laplace")
# The log-scale is clamped in standardised units: with UTKFace's spread (~20 years) scales stay
# between ~0.05 and ~150 years, and exp() never overflows in bf16/fp16.
LOG_SCALE_MIN, LOG_SCALE_MAX = -6.0, 2.0


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
        net = net if net is not None else spec.build()
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


def build_model(backbone: str, pretrained: str = "none", head_hidden: int = 256,
                dropout: float = 0.3, weights_dir: str | None = None,
                uncertainty: str = "none") -> AgeNet:
    """Build an ``AgeNet``; ``pretrained`` is the backbone's start (``imagenet``, ``dlib-age``),
    ``none`` or a weights file's path."""
    net = pretrained_net(backbone, pretrained, weights_dir)
    return AgeNet(backbone, head_hidden=head_hidden, dropout=dropout, net=net,
                  uncertainty=uncertainty)


def build_model_from(model: ModelConfig) -> AgeNet:
    """The ``AgeNet`` a run's ``model`` settings describe, with its pretrained trunk.

    Callers that need another variant pass a copy, e.g. ``model.model_copy(update=
    {"pretrained": "none"})``.
    """
    return build_model(model.backbone, model.pretrained, model.head_hidden, model.dropout,
                       model.weights_dir, model.uncertainty)
