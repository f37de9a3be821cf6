"""Backbone registry, layer groups and pretrained weights (offline: local files only)."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from faceage.errors import UserError
from faceage.models.backbones import BACKBONES
from faceage.models.network import build_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
MOBILENET_V2_FILE = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
needs_shared_weights = pytest.mark.skipif(
    not MOBILENET_V2_FILE.is_file(), reason=f"{MOBILENET_V2_FILE} is absent (../shared not here)")


TORCHVISION_WEIGHTS = {
    "mobilenet_v3_large": torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
}


def weights_file_name(backbone: str) -> str:
    return os.path.basename(TORCHVISION_WEIGHTS[backbone].url)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_registry_builds_each_backbone_with_groups_from_input_to_output(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, "none", head_hidden=8, dropout=0.1).eval()
    groups = model.layer_groups()
    names = [n for n, _ in groups]
    assert names[0] == "stem" and names[-1] == "head" and len(set(names)) == len(names)

    # Every trunk parameter belongs to exactly one group, and the groups run in the listed order.
    trunk_ids = [id(p) for p in model.trunk.parameters()]
    grouped = [id(p) for _, m in groups[:-1] for p in m.parameters()]
    assert grouped == trunk_ids
    # A group is a view on the trunk's own layers, so hooks go on the layers it holds.
    order: list[str] = []

    def seen(name):
        return lambda *_: order.append(name) if name not in order else None

    hooks = [c.register_forward_hook(seen(n)) for n, m in groups for c in m.children()]
    with torch.no_grad():
        ages = model(torch.randn(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert order == names
    assert ages.shape == (2,) and torch.isfinite(ages).all()


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(UserError, match=r"unknown backbone 'vgg11'.*mobilenet_v2.*resnet50"):
        build_model("vgg11")


def test_pretrained_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=f"pretrained weights file not found: {missing}"):
        build_model("mobilenet_v2", str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable PyTorch state_dict"):
        build_model("mobilenet_v2", str(garbage))
    other = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(UserError, match="do not fit backbone mobilenet_v2"):
        build_model("mobilenet_v2", str(other))


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save(torchvision.models.resnet18(), evil)  # a whole pickled module, not a state_dict
    with pytest.raises(UserError, match="not a loadable PyTorch state_dict"):
        build_model("resnet50", str(evil))


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenet_v3_large"])
def test_imagenet_reads_torchvisions_file_from_weights_dir(tmp_path, backbone):
    # Offline stand-in for the ImageNet file: the same architecture and file name, random values.
    reference = BACKBONES[backbone].build()
    torch.save(reference.state_dict(), tmp_path / weights_file_name(backbone))
    model = build_model(backbone, "imagenet", weights_dir=str(tmp_path))
    first_conv = next(model.trunk.parameters())
    assert torch.equal(first_conv, next(reference.parameters()))


def test_imagenet_offline_without_a_file_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        build_model("resnet50", "imagenet", weights_dir=str(tmp_path / "weights"))
    message = str(err.value)
    assert weights_file_name("resnet50") in message and "model.weights_dir" in message
    assert "model.pretrained=none" in message


@needs_shared_weights
def test_shared_mobilenet_v2_weights_as_path_and_as_imagenet():
    state = torch.load(MOBILENET_V2_FILE, map_location="cpu", weights_only=True)
    by_path = build_model("mobilenet_v2", str(MOBILENET_V2_FILE))
    by_name = build_model("mobilenet_v2", "imagenet", weights_dir=str(MOBILENET_V2_FILE.parent))
    stem_conv = by_path.layer_groups()[0][1][0][0].weight
    assert torch.equal(stem_conv, state["features.0.0.weight"])
    for a, b in zip(by_path.trunk.state_dict().values(), by_name.trunk.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_a_laplace_head_keeps_the_head_shape_and_returns_ages_and_scales_in_years():
    from faceage.models.network import LOG_SCALE_MAX, LOG_SCALE_MIN, head_uncertainty

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", "none", head_hidden=8, dropout=0.1,
                        uncertainty="laplace").eval()
    model.set_target_stats(40.0, 15.0)
    assert [type(m).__name__ for m in model.head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert model.head[-1].out_features == 2 and head_uncertainty(model.state_dict()) == "laplace"
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ages = model(x)
        same, scales = model.forward_with_scale(x)
        _, log_scale = model(x, with_log_scale=True)
        out = model.head(model.trunk(x))
    assert ages.shape == scales.shape == (3,) and torch.equal(ages, same)
    assert torch.allclose(ages, out[:, 0] * 15.0 + 40.0, atol=1e-5)
    assert torch.allclose(scales, torch.exp(out[:, 1].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)) * 15,
                          atol=1e-5)
    assert torch.equal(log_scale, out[:, 1].clamp(LOG_SCALE_MIN, LOG_SCALE_MAX))
    with torch.no_grad():
        model.head[-1].bias[1] = 50.0  # the log-scale is clamped: never inf
        assert torch.isfinite(model.forward_with_scale(x)[1]).all()

    plain = build_model("mobilenet_v2", "none", head_hidden=8, uncertainty="none").eval()
    assert head_uncertainty(plain.state_dict()) == "none"
    with torch.no_grad():
        assert plain.forward_with_scale(x)[1] is None
    with pytest.raises(UserError, match="model.uncertainty 'gauss'"):
        build_model("mobilenet_v2", "none", uncertainty="gauss")


def test_laplace_nll_is_the_standardised_laplace_likelihood():
    from faceage.models.network import laplace_nll

    ages = torch.tensor([30.0, 50.0], requires_grad=True)
    log_scale = torch.tensor([0.0, -1.0], requires_grad=True)
    true = torch.tensor([40.0, 45.0])
    nll = laplace_nll(ages, log_scale, true, torch.tensor(20.0))
    want = ((10 / 20) / 1 + 0.0 + (5 / 20) / np.exp(-1.0) - 1.0) / 2
    assert float(nll.detach()) == pytest.approx(want, rel=1e-5)
    nll.backward()
    assert ages.grad is None or not ages.grad.any()  # the residual is detached
    assert log_scale.grad.abs().sum() > 0


def test_build_model_from_takes_every_model_setting_of_the_config():
    from faceage.config import ModelConfig
    from faceage.models.network import build_model_from, head_uncertainty

    settings = ModelConfig(backbone="mobilenet_v2", pretrained="none", head_hidden=12,
                           dropout=0.25, uncertainty="laplace")
    model = build_model_from(settings)
    assert model.backbone_name == "mobilenet_v2" and model.uncertainty == "laplace"
    assert model.head[0].out_features == 12 and model.head[2].p == 0.25
    assert head_uncertainty(model.state_dict()) == "laplace"
    with pytest.raises(UserError, match="unknown backbone 'vgg11'"):
        build_model_from(settings.model_copy(update={"backbone": "vgg11"}))
