"""MTCNN's P-, R- and O-nets, laid out as facenet-pytorch's (same module names and shapes), so its
state_dicts, shipped next to this file, load unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from faceage.inference.engines import EngineChoice, Runner, choose_runner

WEIGHT_FILES = {"pnet": "pnet.pt", "rnet": "rnet.pt", "onet": "onet.pt"}


def max_pool_ceil(x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
    """``pool(x)`` (no padding, ``ceil_mode=True``) as the maximum of strided slices.

    Equal to ``F.max_pool2d``, whose CPU kernel for NCHW tensors is several times slower than
    the convolutions around it here (a third of facenet-pytorch's detection time).
    """
    k, s = int(pool.kernel_size), int(pool.stride)
    h, w = x.shape[-2:]
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    ph, pw = (oh - 1) * s + k - h, (ow - 1) * s + k - w
    if ph > 0 or pw > 0:
        x = F.pad(x, (0, max(pw, 0), 0, max(ph, 0)), value=float("-inf"))
    rows = reduce(torch.maximum, [x[..., i:i + (oh - 1) * s + 1:s, :] for i in range(k)])
    return reduce(torch.maximum, [rows[..., j:j + (ow - 1) * s + 1:s] for j in range(k)])


def blocked(x: torch.Tensor) -> torch.Tensor:
    """``x`` in oneDNN's blocked layout where torch has oneDNN (CPU), else ``x``.

    R- and O-net run 3-4x faster on the CPU this way: their convolutions, PReLUs and pooling stay
    in the layout oneDNN computes in instead of converting back to NCHW after every layer (and
    oneDNN's pooling is fast). P-net, one large image at a time, is faster in NCHW.
    """
    mkldnn = torch.backends.mkldnn
    if (x.device.type == "cpu" and mkldnn.is_available() and mkldnn.enabled and len(x)
            and not torch.onnx.is_in_onnx_export()):
        return x.to_mkldnn()
    return x


def _pool(x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
    """``pool(x)``, through ``max_pool_ceil`` where torch's own kernel is slow (NCHW on the
    CPU; an ONNX export keeps the MaxPool operator)."""
    if x.is_mkldnn or torch.onnx.is_in_onnx_export():
        return pool(x)
    return max_pool_ceil(x, pool)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, W * H * C): the weights were converted from Caffe/TF, which flatten
    width-major."""
    x = x.to_dense() if x.is_mkldnn else x
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal net: fully convolutional, a face score and box offsets per 12x12 window at
    stride 2."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalised → box offsets (N, 4, h, w), class probabilities (N, 2, h, w)."""
        x = _pool(self.prelu1(self.conv1(x)), self.pool1)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        # Both 1x1 heads as one matrix product: torch runs a 1x1 convolution with 2 or 4 output
        # channels through its slow im2col path, a tenth of P-net's time.
        weight = torch.cat([self.conv4_1.weight, self.conv4_2.weight]).flatten(1)
        bias = torch.cat([self.conv4_1.bias, self.conv4_2.bias])
        n, _, h, w = x.shape
        heads = (torch.matmul(weight, x.flatten(2)) + bias[:, None]).view(n, 6, h, w)
        return heads[:, 2:], self.softmax4_1(heads[:, :2])


class RNet(nn.Module):
    """Refinement net: a face score and box offsets for each 24x24 candidate."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 24, 24) → box offsets (N, 4), class probabilities (N, 2)."""
        x = blocked(x)
        x = _pool(self.prelu1(self.conv1(x)), self.pool1)
        x = _pool(self.prelu2(self.conv2(x)), self.pool2)
        x = self.prelu4(self.dense4(_flatten(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    """Output net: a face score, box offsets and five landmarks for each 48x48 candidate."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, 3, 48, 48) → box offsets (N, 4), landmarks (N, 10: five x then five y, as
        fractions of the box), class probabilities (N, 2)."""
        x = blocked(x)
        x = _pool(self.prelu1(self.conv1(x)), self.pool1)
        x = _pool(self.prelu2(self.conv2(x)), self.pool2)
        x = _pool(self.prelu3(self.conv3(x)), self.pool3)
        x = self.prelu5(self.dense5(_flatten(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


# What each net's runtime is chosen on (engine ``auto``): P-net on the first pyramid level of a
# 640x480 frame for 20 px faces, R-net on a photo's typical candidates, O-net on a few faces.
PROBE_SHAPES = {"pnet": (1, 3, 288, 384), "rnet": (128, 3, 24, 24), "onet": (16, 3, 48, 48)}
# P-net sees every pyramid level's size; R- and O-net take any number of fixed-size crops.
DYNAMIC_AXES = {"pnet": {0: "n", 2: "h", 3: "w"}, "rnet": {0: "n"}, "onet": {0: "n"}}


@dataclass(frozen=True)
class MtcnnNets:
    """The three nets on one device, each called through the runtime chosen for it (a tensor
    in, a tuple of tensors out: faceage.inference.engines)."""

    pnet: Runner
    rnet: Runner
    onet: Runner
    device: torch.device
    modules: dict[str, nn.Module]  # the torch nets the runners were made from, by name
    engines: tuple[EngineChoice, ...] = ()


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The shipped weights of ``pnet``, ``rnet`` or ``onet`` (package data of this folder)."""
    with resources.files(__package__).joinpath(WEIGHT_FILES[name]).open("rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def load_nets(device: str | torch.device = "cpu", engine: str = "torch") -> MtcnnNets:
    """P-, R- and O-net with the shipped weights, in eval mode, without gradients, each run by
    ``engine`` (``auto``: whichever of torch and ONNX Runtime is faster for that net here)."""
    runners, modules, choices = {}, {}, []
    for name, cls in (("pnet", PNet), ("rnet", RNet), ("onet", ONet)):
        net = cls()
        net.load_state_dict(load_state_dict(name))
        net = modules[name] = net.eval().requires_grad_(False).to(device)
        example = torch.rand(PROBE_SHAPES[name], device=device) * 2 - 1
        runners[name], choice = choose_runner(name, net, example, engine, device,
                                              DYNAMIC_AXES[name])
        choices.append(choice)
    return MtcnnNets(**runners, device=torch.device(device), modules=modules,
                     engines=tuple(choices))
