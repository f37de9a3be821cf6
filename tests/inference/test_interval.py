"""Age intervals: calibration on residuals reaches its coverage, round-trips through metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest

from faceage.inference.interval import (
    DEFAULT_COVERAGE,
    IntervalCalibration,
    check_coverage,
    coverage_report,
)


def _heteroscedastic(n: int, seed: int):
    rng = np.random.default_rng(seed)
    true = rng.uniform(1, 90, n)
    scale = 1.0 + true / 10  # older faces are harder
    ages = true + rng.laplace(0, scale)
    return ages, true, scale


def test_scaled_residual_calibration_covers_what_it_promises_on_new_data():
    ages, true, scale = _heteroscedastic(4000, 0)
    cal = IntervalCalibration.fit(ages, true, scale)
    assert cal.method == "scaled-residual" and cal.samples == 4000
    new_ages, new_true, new_scale = _heteroscedastic(4000, 1)
    for c in (0.5, DEFAULT_COVERAGE, 0.95):
        low, high = cal.interval(new_ages, new_scale, coverage=c)
        report = coverage_report(low, high, new_true)
        assert abs(report["coverage"] - c) < 0.03, (c, report)
    # Per-face scale makes the interval narrower where the model is sure.
    low, high = cal.interval([20.0, 20.0], [1.0, 5.0])
    assert (high - low)[0] < (high - low)[1]


def test_residual_calibration_without_scales_gives_one_width():
    ages, true, _ = _heteroscedastic(2000, 2)
    cal = IntervalCalibration.fit(ages, true)
    assert cal.method == "residual"
    low, high = cal.interval([30.0, 60.0], scales=[1.0, 9.0])  # scales ignored
    assert np.allclose(high - low, (high - low)[0])
    report = coverage_report(*cal.interval(ages, coverage=0.8), true)
    assert abs(report["coverage"] - 0.8) < 0.02


def test_intervals_are_ordered_and_never_negative():
    cal = IntervalCalibration.fit([10.0, 20.0, 30.0], [30.0, 40.0, 50.0])  # all under-predicted
    ages = np.array([0.5, 3.0, 40.0])
    low, high = cal.interval(ages)
    assert np.all(low <= ages) and np.all(ages <= high) and np.all(low >= 0)


def test_laplace_fallback_for_old_model_files():
    cal = IntervalCalibration.from_val_mae(5.0)
    lo, hi = cal.bounds(0.8)
    # Laplace(b): the central 80 % is +-b*ln(5).
    assert lo == pytest.approx(-5.0 * np.log(5), rel=1e-3)
    assert hi == pytest.approx(5.0 * np.log(5), rel=1e-3)
    assert "val MAE 5.00" in cal.note


def test_metadata_round_trip_through_json():
    ages, true, scale = _heteroscedastic(500, 3)
    cal = IntervalCalibration.fit(ages, true, scale)
    back = IntervalCalibration.from_metadata(json.loads(json.dumps(cal.to_metadata())))
    assert back == cal
    with pytest.raises(ValueError, match="unknown interval calibration method"):
        IntervalCalibration.from_metadata({**cal.to_metadata(), "method": "guess"})


@pytest.mark.parametrize("bad", [0, -0.1, 1.0, 1.5])
def test_coverage_outside_the_range_is_refused(bad):
    with pytest.raises(ValueError, match="must be above 0 and at most 0.99"):
        check_coverage(bad)


def test_fit_needs_matching_data():
    with pytest.raises(ValueError, match="as many predictions as true ages"):
        IntervalCalibration.fit([], [])


def test_metadata_is_plain_python_so_checkpoints_load_with_weights_only(tmp_path):
    """Training checkpoints carry the calibration and are read with ``weights_only=True``."""
    import torch

    meta = IntervalCalibration.fit([20.0, 30.0, 40.0], [22.0, 27.0, 45.0], [2.0, 3.0, 4.0])
    torch.save({"interval_calibration": meta.to_metadata()}, tmp_path / "ckpt.pt")
    back = torch.load(tmp_path / "ckpt.pt", weights_only=True)["interval_calibration"]
    assert IntervalCalibration.from_metadata(back) == meta


def _children_misjudged(n: int, seed: int):
    """The scale head is right for adults but says children are as sure as adults while they
    are three times as far off: one pooled calibration cannot cover both."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(1, 80, n)
    scale = np.full(n, 3.0)
    spread = np.where(true < 13, 9.0, 3.0)
    return true + rng.laplace(0, spread), true, scale


def test_per_band_calibration_holds_for_each_band():
    bands = (0.0, 13.0, 40.0)
    ages, true, scale = _children_misjudged(6000, 0)
    pooled = IntervalCalibration.fit(ages, true, scale)
    banded = IntervalCalibration.fit(ages, true, scale, bands=bands)
    new_ages, new_true, new_scale = _children_misjudged(6000, 1)
    children = new_ages < 13
    for cal, ok in ((pooled, False), (banded, True)):
        low, high = cal.interval(new_ages, new_scale)
        kids = coverage_report(low[children], high[children], new_true[children])["coverage"]
        adults = coverage_report(low[~children], high[~children],
                                 new_true[~children])["coverage"]
        if ok:
            assert abs(kids - 0.8) < 0.05 and abs(adults - 0.8) < 0.04, (kids, adults)
        else:
            assert kids < 0.7 and adults > 0.83, (kids, adults)  # the average hides both
    # The band's interval is honest: wider for faces the model reads badly.
    (klo, khi), (alo, ahi) = banded.bounds(band=0), banded.bounds(band=2)
    assert khi - klo > 1.5 * (ahi - alo)


def test_the_interval_holds_on_every_source_not_on_their_average():
    rng = np.random.default_rng(4)
    big = rng.laplace(0, 2.0, 5000)  # a big, easy source and a small, hard one
    small = rng.laplace(0, 6.0, 500)
    residual = np.concatenate([big, small])
    true = np.full(residual.size, 30.0)
    names = ["big"] * 5000 + ["small"] * 500
    plain = IntervalCalibration.fit(true - residual, true)
    each = IntervalCalibration.fit(true - residual, true, sources=names)
    assert "outermost over 2 sources" in each.note
    masks = (np.arange(5500) < 5000, np.arange(5500) >= 5000)

    def cover(cal):
        low, high = cal.interval(true - residual)
        return [coverage_report(low[m], high[m], true[m])["coverage"] for m in masks]

    # Pooled, the big source sets the interval and the small one is left far below; source by
    # source, the small one gets its 80 % and the big one more (without a per-face scale, one
    # width serves both: a scale head is what narrows the easy faces' intervals).
    assert cover(plain)[1] < 0.55, cover(plain)
    assert abs(cover(each)[1] - 0.8) < 0.03 and cover(each)[0] > 0.95, cover(each)
    # With scales that tell the two apart, each source gets about its 80 %.
    scales = np.where(masks[0], 2.0, 6.0)
    scaled = IntervalCalibration.fit(true - residual, true, scales, sources=names)
    low, high = scaled.interval(true - residual, scales)
    for m in masks:
        assert abs(coverage_report(low[m], high[m], true[m])["coverage"] - 0.8) < 0.03


def test_a_band_sees_a_share_of_its_neighbours_faces():
    rng = np.random.default_rng(5)
    # Faces predicted 13-19 are read well, those predicted 20-30 badly (teenagers read as 24).
    ages = np.concatenate([rng.uniform(13, 20, 400), rng.uniform(20, 31, 400)])
    spread = np.where(ages < 20, 1.0, 8.0)
    true = ages + rng.laplace(0, spread)
    bands = (0.0, 13.0, 20.0, 31.0)
    cal = IntervalCalibration.fit(ages, true, bands=bands)
    alone = IntervalCalibration.fit(ages[ages < 20], true[ages < 20], bands=bands)
    teen, alone_teen = cal.bounds(band=1), alone.bounds(band=1)
    # Wider than the teenagers' own faces say, far narrower than the twenties'.
    assert teen[1] - teen[0] > 1.2 * (alone_teen[1] - alone_teen[0])
    twenties = cal.bounds(band=2)
    assert teen[1] - teen[0] < 0.6 * (twenties[1] - twenties[0])


def test_a_band_with_few_faces_leans_on_the_pooled_quantiles():
    ages, true, scale = _children_misjudged(3000, 2)
    bands = (0.0, 13.0, 150.0)  # nobody is predicted 150+: that band is the pooled one
    cal = IntervalCalibration.fit(ages, true, scale, bands=bands)
    assert cal.band_quantiles[2] == pytest.approx(cal.quantiles)
    back = IntervalCalibration.from_metadata(json.loads(json.dumps(cal.to_metadata())))
    assert back == cal and back.bands == bands
    with pytest.raises(ValueError, match="one set of band_quantiles per band"):
        IntervalCalibration.from_metadata({**cal.to_metadata(), "band_quantiles": []})
