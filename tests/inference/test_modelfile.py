"""The exported model file: self-describing, loaded with weights_only, predicts like training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from faceage.errors import UserError
from faceage.inference.interval import IntervalCalibration
from faceage.inference.modelfile import (
    DEFAULT_MODEL_PATH,
    FORMAT,
    FORMAT_VERSION,
    load_model_file,
    save_model_file,
)
from faceage.inference.preprocess import eval_transform, preprocessing_metadata
from faceage.models.network import build_model

SIZE = 48


@pytest.fixture(scope="module")
def trained_like():
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", "none", head_hidden=16, dropout=0.2)
    model.set_target_stats(41.0, 17.0)
    return model.eval()


@pytest.fixture(scope="module")
def model_path(trained_like, tmp_path_factory):
    path = tmp_path_factory.mktemp("modelfile") / "model.pt"
    return save_model_file(trained_like, path, {
        "preprocessing": preprocessing_metadata(SIZE),
        "crop_policy": {"name": "utkface-chip"},
        "data": {"images": 10, "train_age_mean": 41.0},
        "metrics": {"val_mae": 7.5},
    })


def crops(*sizes: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in sizes]


def test_metadata_describes_the_model(model_path):
    model = load_model_file(model_path)
    meta = model.metadata
    assert meta["format"] == FORMAT and meta["format_version"] == FORMAT_VERSION
    assert meta["backbone"] == "mobilenet_v2" and meta["head_hidden"] == 16
    assert meta["dropout"] == pytest.approx(0.2)
    assert meta["preprocessing"] == json.loads(json.dumps(preprocessing_metadata(SIZE)))
    assert meta["metrics"]["val_mae"] == 7.5 and meta["data"]["images"] == 10
    assert model.input_size == SIZE and model.crop_policy == {"name": "utkface-chip"}
    assert model.name == "faceage-mobilenet_v2"
    assert model.version.startswith("0.1.0+") and len(model.version) == len("0.1.0+") + 12
    assert not model.net.training


def test_loaded_model_predicts_exactly_like_the_trained_one(trained_like, model_path):
    model = load_model_file(model_path)
    assert float(model.net.age_mean) == 41.0 and float(model.net.age_std) == 17.0
    images = crops(SIZE, 80, 200)
    expected = torch.stack([eval_transform(SIZE)(torch.from_numpy(c).permute(2, 0, 1))
                            for c in images])
    with torch.inference_mode():
        want = trained_like(expected).numpy()
        want_tta = (want + trained_like(torch.flip(expected, dims=[3])).numpy()) / 2
    assert np.array_equal(model.predict(images), want)
    assert np.allclose(model.predict(images, tta=True), want_tta, atol=1e-5)
    assert np.array_equal(model.predict(images, batch_size=2), want)
    assert model.predict([]).shape == (0,)
    # Groups (one image's faces, one Serve request's crops) come back in their own slices.
    groups = model.predict_groups([images[:1], [], images[1:]])
    assert [len(g) for g in groups] == [1, 0, 2]
    assert np.array_equal(np.concatenate([g.age for g in groups]), want)
    for g in groups:
        assert all(0 <= low <= age <= high for age, low, high in g)
    assert model.predict_groups([]) == [] and len(model.predict_groups([[]])[0]) == 0


def test_version_follows_the_weights(trained_like, tmp_path):
    meta = {"preprocessing": preprocessing_metadata(SIZE)}
    a = load_model_file(save_model_file(trained_like, tmp_path / "a.pt", meta)).version
    b = load_model_file(save_model_file(trained_like, tmp_path / "b.pt", meta)).version
    changed = build_model("mobilenet_v2", "none", head_hidden=16)
    c = load_model_file(save_model_file(changed, tmp_path / "c.pt", meta)).version
    assert a == b != c


def test_bad_model_files_are_user_errors(model_path, tmp_path):
    with pytest.raises(UserError, match="model file not found"):
        load_model_file(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 not torch")
    with pytest.raises(UserError, match="is not a faceage model file"):
        load_model_file(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(UserError, match="is not a faceage model file"):
        load_model_file(plain)

    blob = torch.load(model_path, weights_only=True)
    newer = tmp_path / "newer.pt"
    torch.save({**blob, "format_version": FORMAT_VERSION + 1}, newer)
    with pytest.raises(UserError, match="newer faceage"):
        load_model_file(newer)
    mismatched = tmp_path / "mismatched.pt"
    meta = json.loads(blob["metadata_json"])
    torch.save({**blob, "metadata_json": json.dumps({**meta, "backbone": "resnet50"})},
               mismatched)
    with pytest.raises(UserError, match="weights do not match backbone resnet50"):
        load_model_file(mismatched)


def test_model_files_load_with_weights_only(model_path, tmp_path):
    # A file that needs arbitrary unpickling (here: a whole nn.Module) is refused, not executed.
    blob = torch.load(model_path, weights_only=True)
    pickled = tmp_path / "pickled.pt"
    torch.save({**blob, "extra": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(UserError, match="is not a faceage model file"):
        load_model_file(pickled)


# -- age intervals -------------------------------------------------------------------------------


def test_a_file_without_calibration_answers_the_laplace_interval_of_its_val_mae(model_path):
    model = load_model_file(model_path)  # one-output head, val_mae 7.5, no interval_calibration
    assert model.net.uncertainty == "none" and model.metadata["uncertainty"] == "none"
    info = model.interval_info(0.8)
    assert info["method"] == "laplace-from-val-mae" and info["samples"] == 0
    assert "val MAE 7.50" in info["note"] and not info["per_face_width"]
    assert "±ln(5)·MAE at 80 %" in info["description"]
    assert "same width for every face" in info["description"]
    est = model.estimate(crops(SIZE, 90))
    # ±ln(5)·MAE at 80 %, the same width for every face (low clipped at 0 only).
    half = np.log(5) * 7.5
    for age, low, high in est:
        assert high - age == pytest.approx(half, abs=1e-3)
        assert low == pytest.approx(max(0.0, age - half), abs=1e-3)
    wider = model.estimate(crops(SIZE), coverage=0.95)
    assert wider.high[0] - wider.age[0] > half


def test_a_file_with_no_calibration_and_no_val_mae_says_what_it_assumed(trained_like, tmp_path):
    from faceage.inference.modelfile import FALLBACK_MAE

    path = save_model_file(trained_like, tmp_path / "bare.pt",
                           {"preprocessing": preprocessing_metadata(SIZE)})
    info = load_model_file(path).interval_info()
    assert info["method"] == "laplace-from-val-mae"
    assert f"assumed MAE of {FALLBACK_MAE:g} years" in info["note"]


def test_the_shipped_model_has_a_laplace_head_and_a_calibrated_interval():
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip(f"{DEFAULT_MODEL_PATH} is not in this checkout")
    model = load_model_file()
    assert model.net.uncertainty == "laplace"
    info = model.interval_info()
    assert info["method"] == "scaled-residual" and info["per_face_width"]
    assert info["samples"] > 2000 and info["coverage"] == 0.8  # both sources' val faces
    est = model.estimate(crops(model.input_size, 70, 110))
    assert np.all(est.low < est.age) and np.all(est.age < est.high)
    assert len({round(float(h - lo), 3) for lo, h in zip(est.low, est.high, strict=True)}) > 1


def test_a_laplace_head_round_trips_with_its_calibration(tmp_path):
    torch.manual_seed(0)
    net = build_model("mobilenet_v2", "none", head_hidden=16, dropout=0.0,
                      uncertainty="laplace").eval()
    rng = np.random.default_rng(1)
    ages, scales = rng.uniform(10, 70, 200), rng.uniform(2, 9, 200)
    true = ages + scales * rng.laplace(size=200)
    cal = IntervalCalibration.fit(ages, true, scales)
    path = save_model_file(net, tmp_path / "laplace.pt", {
        "preprocessing": preprocessing_metadata(SIZE), "metrics": {"val_mae": 6.0},
        "interval_calibration": cal.to_metadata()})
    model = load_model_file(path)
    assert model.metadata["uncertainty"] == "laplace" and model.net.uncertainty == "laplace"
    assert model.calibration == cal and model.interval_info()["samples"] == 200
    assert model.interval_info()["per_face_width"]
    images = crops(SIZE, 64, 100)
    got_ages, got_scales = model.predict_with_scale(images)
    with torch.inference_mode():
        batch = model.preprocess(images)
        want_ages, want_scales = net.forward_with_scale(batch)
    assert np.allclose(got_ages, want_ages.numpy()) and np.allclose(got_scales, want_scales)
    assert np.array_equal(model.predict(images), got_ages)
    est = model.estimate(images)
    low, high = cal.interval(got_ages, got_scales)
    assert np.allclose(est.low, low, atol=1e-4) and np.allclose(est.high, high, atol=1e-4)
    assert ((0 <= est.low) & (est.low <= est.age) & (est.age <= est.high)).all()


def test_a_flip_averaged_model_reads_a_face_and_its_mirror_the_same_on_every_route(
        trained_like, model_path, tmp_path):
    """``flip_average`` (how the model was validated) is the default of predict, evaluate and
    Serve; ``--no-tta`` (tta=False) still gives the plain network."""
    from faceage.inference.pipeline import FacePipeline

    flipped = save_model_file(trained_like, tmp_path / "flip.pt", {
        "preprocessing": preprocessing_metadata(SIZE), "crop_policy": {"name": "utkface-chip"},
        "metrics": {"val_mae": 7.5}, "flip_average": True})
    face = crops(SIZE)[0]
    mirror = np.ascontiguousarray(face[:, ::-1])
    flip_path = flipped
    plain_model, flip_model = load_model_file(model_path), load_model_file(flip_path)
    assert (plain_model.flip_average, flip_model.flip_average) == (False, True)
    assert flip_model.resolve_tta(None) and not flip_model.resolve_tta(False)
    assert not plain_model.resolve_tta(None) and plain_model.resolve_tta(True)

    by_default = FacePipeline(load_model_file(flip_path), no_face="whole")
    ages = [by_default.predict_faces([im])[0][1].age[0] for im in (face, mirror)]
    assert ages[0] == pytest.approx(ages[1], abs=1e-4)
    assert by_default.tta is True
    assert FacePipeline(load_model_file(flip_path), no_face="whole", tta=False).tta is False
    assert FacePipeline(load_model_file(model_path), no_face="whole").tta is False


def test_a_closer_view_of_a_mirror_image_is_the_mirror_image_of_the_closer_view():
    from faceage.inference.preprocess import closer_view

    for h, w in ((64, 64), (71, 70), (200, 203)):
        x = torch.rand(2, 3, h, w)
        view = closer_view(x, 0.92)
        assert view.shape[-1] == w - 2 * round(w * 0.04) < w
        assert view.shape[-2] == h - 2 * round(h * 0.04) < h
        assert torch.equal(closer_view(torch.flip(x, dims=[3]), 0.92), torch.flip(view, dims=[3]))
        assert closer_view(x, None) is x and closer_view(x, 1.0) is x


def test_a_closer_view_joins_the_mirror_average_where_the_model_file_says(model_path, tmp_path):
    """``tta_zoom``: with the mirror average, ages and scales are the mean of four views (the
    crop, its closer view and their mirror images); a face and its mirror still read alike, and
    ``tta=False`` is still the plain network."""
    torch.manual_seed(0)
    # dlib's network: untrained, MobileNetV2's features are all but zero for every face
    net = build_model("dlib_age_resnet", "none", head_hidden=16, dropout=0.0,
                      uncertainty="laplace").eval()
    path = save_model_file(net, tmp_path / "zoom.pt", {
        "preprocessing": preprocessing_metadata(SIZE), "metrics": {"val_mae": 6.0},
        "flip_average": True, "tta_zoom": 0.8})
    model = load_model_file(path)
    assert model.tta_zoom == 0.8 and model.resolve_tta(None)
    assert load_model_file(model_path).tta_zoom is None  # files without it: the mirror only
    images = crops(SIZE, 71, 100)
    ages, scales = model.predict_with_scale(images, tta=True)
    views = [model.preprocess(images, zoom) for zoom in (None, 0.8)]
    with torch.inference_mode():
        outs = [net.forward_with_scale(v) for x in views for v in (x, torch.flip(x, dims=[3]))]
    assert np.allclose(ages, torch.stack([a for a, _ in outs]).mean(0).numpy(), atol=1e-4)
    assert np.allclose(scales, torch.stack([s for _, s in outs]).mean(0).numpy(), atol=1e-4)
    mirrors = [np.ascontiguousarray(c[:, ::-1]) for c in images]
    assert np.allclose(model.predict(mirrors, tta=True), ages, atol=1e-4)
    with torch.inference_mode():
        plain = net.forward_with_scale(model.preprocess(images))[0].numpy()
    assert np.allclose(model.predict(images, tta=False), plain, atol=1e-5)
    assert not np.allclose(plain, ages, atol=1e-3)


def test_metadata_reads_without_torch_as_the_loader_reads_it(model_path):
    """``faceage --version`` reads the model's name and version without importing torch."""
    from faceage.inference.model_metadata import model_file_metadata

    assert model_file_metadata(model_path) == load_model_file(model_path).metadata
