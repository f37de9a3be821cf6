"""ONNX Runtime against torch (faceage.inference.engines): the same faces and the same ages from
either runtime, and ``auto`` keeping the clearly faster of the two."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from faceage.errors import UserError
from faceage.inference.detection import DetectorConfig, FaceDetector
from faceage.inference.engines import choose_runner
from faceage.inference.images import load_image
from faceage.inference.modelfile import load_model_file
from faceage.inference.overlap import iou
from testkit.frames import group_photo, place
from testkit.models import untrained_model_file
from testkit.served import auto_pick

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread, as a Serve replica runs: on a busy machine two spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_onnxruntime_finds_the_faces_torch_finds(astronaut_path, rocket_path):
    """P-, R- and O-net exported and run by ONNX Runtime: same faces (IoU >= 0.99), scores and
    landmarks, on photos whose pyramids differ from the export's example size."""
    torch_det = FaceDetector(DetectorConfig(engine="torch"))
    ort_det = FaceDetector(DetectorConfig(engine="onnxruntime"))
    assert {e["engine"] for e in ort_det.engines.values()} == {"onnxruntime"}
    assert {e["engine"] for e in torch_det.engines.values()} == {"torch"}
    astronaut = load_image(astronaut_path)
    images = {"astronaut": astronaut, "rocket": load_image(rocket_path),
              "group": group_photo(), "small face": place(astronaut, 0.6, 200, 260),
              "at the edge": place(astronaut, 1.2, 560, 180)}
    found = 0
    for label, image in images.items():
        ours, theirs = torch_det.detect(image), ort_det.detect(image)
        assert len(ours) == len(theirs), label
        for a, b in zip(ours, theirs, strict=True):
            assert iou(a.box, b.box) >= 0.99, (label, a.box, b.box)
            assert abs(a.score - b.score) < 1e-3, label
            assert np.abs(a.landmarks - b.landmarks).max() < 0.5, label
        found += len(ours)
    assert found >= 7  # the astronaut in four images, and the group photo's faces


@pytest.fixture(scope="module")
def laplace_model(tmp_path_factory):
    """A model file with a two-output head (ages and scales), the default recipe's network."""
    from faceage.inference.modelfile import save_model_file
    from faceage.inference.preprocess import preprocessing_metadata
    from faceage.models.network import build_model

    torch.manual_seed(1)
    net = build_model("dlib_age_resnet", "none", 64, 0.0, uncertainty="laplace")
    path = tmp_path_factory.mktemp("engines") / "laplace.pt"
    return save_model_file(net, path, {"name": "laplace", "crop_policy": {"name": "utkface-chip"},
                                       "preprocessing": preprocessing_metadata(64)})


@pytest.mark.parametrize("model_kind", ["one output, MobileNetV2", "laplace, dlib"])
def test_onnxruntime_gives_the_ages_torch_gives(model_kind, laplace_model, tmp_path):
    path = (laplace_model if model_kind.startswith("laplace") else
            untrained_model_file(tmp_path / "m.pt", "mobilenet_v2", 64, 96))
    by_torch = load_model_file(path, engine="torch")
    by_ort = load_model_file(path, engine="onnxruntime")
    assert by_ort.engine.engine == "onnxruntime" and by_torch.engine.engine == "torch"
    rng = np.random.default_rng(0)
    for n in (1, 3, 20):  # batch sizes other than the export's example
        crops = [rng.integers(0, 256, (120, 120, 3), dtype=np.uint8) for _ in range(n)]
        for tta in (False, True):
            a, sa = by_torch.predict_with_scale(crops, tta)
            b, sb = by_ort.predict_with_scale(crops, tta)
            assert a.shape == b.shape == (n,)
            np.testing.assert_allclose(a, b, atol=0.1, rtol=0)
            assert (sa is None) == (sb is None) == model_kind.startswith("one")
            if sa is not None:
                np.testing.assert_allclose(sa, sb, atol=0.1, rtol=0)


def test_auto_times_both_and_keeps_a_clear_winner(laplace_model):
    model = load_model_file(laplace_model, engine="auto")
    info = model.engine.info()
    assert info["asked"] == "auto" and info["chosen_by"] == "probe" and info["threads"] == 1
    ms = info["probe_ms"]
    assert set(ms) == {"torch", "onnxruntime"} and all(v > 0 for v in ms.values())
    assert info["engine"] == auto_pick(ms)
    detector = FaceDetector(DetectorConfig(engine="auto"))
    assert set(detector.engines) == {"pnet", "rnet", "onet"}
    for choice in detector.engines.values():
        assert choice["engine"] == auto_pick(choice["probe_ms"])
    assert auto_pick({"torch": 10.0, "onnxruntime": 9.5}) == "torch"  # even: stays on torch
    assert auto_pick({"torch": 10.0, "onnxruntime": 9.0}) == "onnxruntime"


def test_choosing_a_runtime_leaves_the_torch_network_as_the_file_has_it(laplace_model):
    """Exporting and timing the network leave it in eval mode with the file's BatchNorm
    statistics, so ages from auto's torch pick are ``--engine torch``'s. (The exporter once
    put the wrapper's train mode back on the network; the probe's torch calls then overwrote
    the running statistics, and torch predicted on batch statistics.)"""
    from faceage.inference.modelfile import read_model_file

    _, state = read_model_file(laplace_model)
    rng = np.random.default_rng(2)
    crops = [rng.integers(0, 256, (80, 80, 3), dtype=np.uint8) for _ in range(3)]
    want = load_model_file(laplace_model, engine="torch").predict(crops)
    for engine in ("auto", "onnxruntime"):
        model = load_model_file(laplace_model, engine=engine)
        assert not any(m.training for m in model.net.modules()), engine
        assert all(torch.equal(v, state[k]) for k, v in model.net.state_dict().items()), engine
        with torch.inference_mode():
            ages = model.net(model.preprocess(crops)).numpy()
        np.testing.assert_allclose(ages, want, atol=1e-4, rtol=0)


def test_an_unknown_engine_is_refused_with_the_choices():
    with pytest.raises(UserError, match="engine 'tensorrt': choose one of auto, torch, "
                                        "onnxruntime"):
        choose_runner("age", torch.nn.Identity(), torch.zeros(1, 3), "tensorrt")
    with pytest.raises(ValueError, match="auto.*torch.*onnxruntime"):
        DetectorConfig(engine="tensorrt")


def test_onnxruntime_is_for_the_cpu_and_auto_elsewhere_is_torch():
    """On another device (a GPU; ``meta`` stands in for one here) ONNX Runtime is refused with
    the reason, and ``auto`` is torch without a probe, saying so."""
    net, x = torch.nn.Identity(), torch.zeros(1, 3, device="meta")
    with pytest.raises(UserError, match="onnxruntime runs on the CPU.*age is on meta"):
        choose_runner("age", net, x, "onnxruntime", device="meta")
    _, choice = choose_runner("age", net, x, "auto", device="meta")
    assert choice.info() == {"engine": "torch", "asked": "auto", "chosen_by": "only-one",
                             "threads": torch.get_num_threads()}
