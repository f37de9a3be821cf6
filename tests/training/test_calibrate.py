"""``faceage calibrate``: a model file's interval refitted on the val split, weights untouched."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from faceage.cli import main
from faceage.config import AGE_BANDS
from faceage.errors import UserError
from faceage.inference.modelfile import load_model_file
from faceage.training.calibrate import refit_interval
from faceage.training.evaluate import evaluation_data


def test_calibrate_refits_the_interval_on_the_val_split_and_keeps_the_weights(
        untrained_model_file, utkface_images, tmp_path, capsys):
    utkface_images(tmp_path / "a", 80, seed=4)
    utkface_images(tmp_path / "b", 60, seed=5)
    data = ["--data", f"utkface:{tmp_path / 'a'}", "--data", f"utkface:{tmp_path / 'b'}"]
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", "--model", str(untrained_model_file), *data,
                 "--tta-zoom", "0.9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    from faceage.data.run_data import RunData

    before, after = load_model_file(untrained_model_file), load_model_file(out)
    args = argparse.Namespace(data=data[1::2], config=None, format="utkface", limit=None)
    val = RunData.read(evaluation_data(args, before.metadata)).subset("val")
    assert after.calibration.samples == len(val) > 5
    assert f"calibrated on {len(val)} validation faces of utkface, utkface-2" in printed
    assert after.calibration.bands == AGE_BANDS and after.calibration != before.calibration
    assert after.tta_zoom == 0.9 and after.metadata["calibrated"]["sources"] == [
        "utkface", "utkface-2"]
    assert after.version == before.version  # the same weights
    crops = [np.full((96, 96, 3), v, np.uint8) for v in (30, 200)]
    assert np.array_equal(after.predict(crops), before.predict(crops))
    # The coverage it records is its interval's on those faces, as predict gives them.
    from faceage.inference.images import load_image
    from faceage.inference.interval import coverage_report

    faces = [load_image(p) for p in val["path"]]
    ages, scales = after.predict_with_scale(faces, tta=after.resolve_tta(None))
    covered = coverage_report(*after.calibration.interval(ages, scales), val["age"])
    assert after.metadata["metrics"]["val_interval_coverage"] == pytest.approx(
        covered["coverage"])
    assert after.metadata["metrics"]["val_interval_width"] == pytest.approx(
        covered["mean_width"], rel=1e-4)

    assert main(["calibrate", "--model", str(out), *data, "--tta-zoom", "1",
                 "--out", str(tmp_path / "no-zoom.pt")]) == 0
    assert load_model_file(tmp_path / "no-zoom.pt").tta_zoom is None


def test_calibrate_refuses_to_overwrite_its_model_and_a_bad_zoom(untrained_model_file,
                                                                 utkface_images, tmp_path,
                                                                 capsys):
    utkface_images(tmp_path / "a", 20, seed=6)
    before = untrained_model_file.read_bytes()
    assert main(["calibrate", "--model", str(untrained_model_file), "--data",
                 f"utkface:{tmp_path / 'a'}", "--out", str(untrained_model_file)]) != 0
    assert "is the model file itself; write a new file" in capsys.readouterr().err
    assert untrained_model_file.read_bytes() == before
    with pytest.raises(SystemExit):
        main(["calibrate", "--data", f"utkface:{tmp_path / 'a'}", "--tta-zoom", "0.3",
              "--out", str(tmp_path / "x.pt")])
    assert "give a share of the side above 0.5" in capsys.readouterr().err


def test_refit_interval_fits_exact_ages_and_ranges_only_without_them():
    """As the worker does: exact-age faces only where there are any (range rows count to their
    middle only in a run with no exact ages); a one-output head's NaN scales give the
    plain-residual method; faceless rows never count."""
    import pandas as pd

    rng = np.random.default_rng(0)
    pred = rng.uniform(5, 70, 200)
    exact = pd.DataFrame({"status": "ok", "pred": pred, "age": pred + rng.laplace(0, 4, 200),
                          "scale": 4.0, "source": "a"})
    exact = exact.assign(range_low=exact["age"], range_high=exact["age"])
    ranges = exact.assign(range_low=exact["age"] - 3, range_high=exact["age"] + 3, source="b")
    faceless = exact.assign(status="no-face")
    cal, covered = refit_interval(pd.concat([exact, ranges, faceless], ignore_index=True))
    assert cal.samples == 200 and cal.method == "scaled-residual"
    assert 0.7 < covered["coverage"] <= 1 and covered["mean_width"] > 0
    assert refit_interval(ranges)[0].samples == 200
    assert refit_interval(exact.assign(scale=np.nan))[0].method == "residual"
    with pytest.raises(UserError, match="no validation face"):
        refit_interval(faceless)
