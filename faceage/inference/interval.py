"""Age intervals: a central interval around every predicted age, calibrated on validation data.

The model predicts an age and, with a two-output head, a scale (how unsure it is about that
face). Calibration looks at the validation residuals divided by the predicted scale,
``z = (true - age) / scale``, and keeps their empirical quantiles; an interval at coverage ``c``
is ``age + scale * [Q(0.5 - c/2), Q(0.5 + c/2)]``. That is split-conformal in spirit: whatever
the head's scale gets wrong in absolute terms, the quantiles put right, so the interval covers
``c`` of faces like the validation faces. A one-output head has no scale (scale 1): its interval
is the same width for every face.

Model files written before intervals existed carry no calibration; they get one from their
validation MAE under a Laplace assumption (``from_val_mae``), which is stated in the metadata.
Numpy only: inference imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_COVERAGE = 0.8
# The quantile levels a calibration stores (every 0.5 %); any coverage up to 99 % is looked up.
LEVELS = tuple(round(float(x), 4) for x in np.linspace(0.005, 0.995, 199))
METHODS = ("scaled-residual", "residual", "laplace-from-val-mae")


# A band with n validation faces keeps n / (n + SHRINK_FACES) of its own quantiles, the rest from
# the pooled ones: 30 faces, half and half; 300, 91 % its own.
SHRINK_FACES = 30
# A band's quantiles also see the faces predicted in the bands on either side, together at most
# this share of the band's own weight: a teenager read as 24 sits among the twenties' faces.
NEIGHBOUR_SHARE = 0.25


def band_index(ages: Sequence[float] | np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Band k of each age: ``edges[k] <= age < edges[k + 1]`` (below the first edge: band 0)."""
    return np.maximum(np.searchsorted(np.asarray(edges, np.float64),
                                      np.asarray(ages, np.float64), side="right") - 1, 0)


def _weighted_quantiles(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Quantiles of ``z`` at LEVELS, each value weighing ``w`` (all equal: numpy's linear
    quantiles)."""
    order = np.argsort(z, kind="stable")
    z, w = z[order], w[order]
    if np.allclose(w, w[0]):
        return np.quantile(z, LEVELS, method="linear")
    cum = np.cumsum(w) - w / 2  # each value at the middle of its weight
    return np.interp(LEVELS, cum / w.sum(), z)


def _envelope(per_source: list[np.ndarray]) -> np.ndarray:
    """The outermost of several sources' quantiles: the lowest below the median, the highest
    above it, so an interval made of them covers at least as much on each source."""
    q = np.asarray(per_source, np.float64)
    return np.where(np.asarray(LEVELS) < 0.5, q.min(axis=0), q.max(axis=0))


def _shrunk(z: np.ndarray, w: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Quantiles of ``z`` leaning on ``prior`` as the weight is small (``SHRINK_FACES``)."""
    n = float(w.sum())
    if n <= 0:
        return prior
    keep = n / (n + SHRINK_FACES)
    return keep * _weighted_quantiles(z, w) + (1 - keep) * prior


def _band_weights(band: np.ndarray, b: int) -> np.ndarray:
    """Band ``b``'s faces weigh 1; each neighbouring band's together at most
    ``NEIGHBOUR_SHARE / 2`` of band ``b``'s count."""
    w = (band == b).astype(np.float64)
    own = w.sum()
    for nb in (b - 1, b + 1):
        theirs = band == nb
        if theirs.any() and own:
            w[theirs] = min(1.0, NEIGHBOUR_SHARE / 2 * own / theirs.sum())
    return w


def _monotone(q: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.maximum.accumulate(np.asarray(q, np.float64)))


def check_coverage(coverage: float) -> float:
    """``coverage`` as a float in (0, 0.99]; ValueError with the accepted range otherwise."""
    c = float(coverage)
    if not 0.0 < c <= 0.99:
        raise ValueError(f"interval coverage {coverage!r} must be above 0 and at most 0.99")
    return c


@dataclass(frozen=True)
class IntervalCalibration:
    """Residual quantiles that turn (age, scale) into an interval; stored in the model file."""

    method: str
    quantiles: tuple[float, ...]  # at LEVELS, non-decreasing
    samples: int  # validation faces it was fitted on (0: not fitted on data)
    note: str = ""
    bands: tuple[float, ...] = ()  # lower edges of predicted-age bands with their own quantiles
    band_quantiles: tuple[tuple[float, ...], ...] = ()

    @classmethod
    def fit(cls, ages: Sequence[float], true: Sequence[float],
            scales: Sequence[float] | None = None, sources: Sequence[str] | None = None,
            bands: Sequence[float] = ()) -> IntervalCalibration:
        """Fit on validation predictions: ``scales`` from a two-output head, or None.

        ``sources``: each face's source. Each source's quantiles are taken on their own and
        the outermost kept (``_envelope``), so the interval holds on every source, not only on
        their average. ``bands``: lower edges of predicted-age bands, each with its own
        quantiles (with a share of its neighbours' faces, ``NEIGHBOUR_SHARE``), so the interval
        holds for children and old people as well as on average; a band or source with few
        faces leans on the pooled quantiles (``SHRINK_FACES``).
        """
        ages = np.asarray(ages, np.float64)
        true = np.asarray(true, np.float64)
        if ages.shape != true.shape or ages.size == 0:
            raise ValueError("calibration needs as many predictions as true ages, at least one")
        if scales is None:
            method, z = "residual", true - ages
        else:
            s = np.maximum(np.asarray(scales, np.float64), 1e-6)
            method, z = "scaled-residual", (true - ages) / s
        src = np.asarray(sources) if sources is not None else np.zeros(z.size, int)
        names = np.unique(src)
        pooled_by_source = [_weighted_quantiles(z[src == s], np.ones((src == s).sum()))
                            for s in names]
        pooled = _envelope(pooled_by_source)
        per_band = []
        if len(bands):
            band = band_index(ages, bands)
            for b in range(len(bands)):
                w = _band_weights(band, b)
                per_band.append(_monotone(_envelope([
                    _shrunk(z[src == s], w[src == s], prior)
                    for s, prior in zip(names, pooled_by_source, strict=True)])))
        note = f"each band's outermost over {len(names)} sources" if len(names) > 1 else ""
        return cls(method, _monotone(pooled), int(ages.size), note,
                   tuple(float(b) for b in bands) if per_band else (), tuple(per_band))

    @classmethod
    def from_val_mae(cls, val_mae: float) -> IntervalCalibration:
        """For model files without a calibration: Laplace residuals whose mean |error| is the
        model's validation MAE (a symmetric interval of the same width for every face)."""
        b = max(float(val_mae), 1e-6)
        p = np.asarray(LEVELS)
        q = -b * np.sign(p - 0.5) * np.log(1 - 2 * np.abs(p - 0.5))
        return cls("laplace-from-val-mae", tuple(float(v) for v in q), 0,
                   f"no calibration in the model file; Laplace with scale = val MAE {b:.2f}")

    def bounds(self, coverage: float = DEFAULT_COVERAGE,
               band: int | None = None) -> tuple[float, float]:
        """The residual quantiles (lower, upper) of a central interval at ``coverage`` (of one
        predicted-age band's quantiles with ``band``, else the pooled ones)."""
        c = check_coverage(coverage)
        q = self.quantiles if band is None or not self.bands else self.band_quantiles[band]
        lo, hi = np.interp([0.5 - c / 2, 0.5 + c / 2], LEVELS, q)
        return float(lo), float(hi)

    def interval(self, ages: Sequence[float] | np.ndarray, scales=None,
                 coverage: float = DEFAULT_COVERAGE) -> tuple[np.ndarray, np.ndarray]:
        """Low and high ends for each age; always low <= age <= high and low >= 0."""
        ages = np.asarray(ages, np.float64)
        s = (np.ones_like(ages) if scales is None or self.method != "scaled-residual"
             else np.maximum(np.asarray(scales, np.float64), 1e-6))
        if self.bands:
            ends = np.array([self.bounds(coverage, b) for b in range(len(self.bands))])
            lo, hi = ends[band_index(ages, self.bands)].T
        else:
            lo, hi = self.bounds(coverage)
        low = np.minimum(ages + s * lo, ages)
        high = np.maximum(ages + s * hi, ages)
        return np.maximum(low, 0.0), high

    def to_metadata(self) -> dict[str, Any]:
        out = {**asdict(self), "levels": list(LEVELS), "quantiles": list(self.quantiles)}
        out["bands"] = list(self.bands)
        out["band_quantiles"] = [list(q) for q in self.band_quantiles]
        return out

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> IntervalCalibration:
        levels = tuple(round(x, 4) for x in meta.get("levels", LEVELS))
        q = np.asarray(meta["quantiles"], np.float64)
        if levels != LEVELS:  # written with another grid: resample onto ours
            q = np.interp(LEVELS, levels, q)
        if meta.get("method") not in METHODS:
            raise ValueError(f"unknown interval calibration method {meta.get('method')!r}")
        bands = tuple(float(b) for b in meta.get("bands") or ())
        per_band = tuple(tuple(float(v) for v in np.interp(LEVELS, levels, b))
                         for b in meta.get("band_quantiles") or ())
        if len(per_band) != len(bands):
            raise ValueError("interval calibration: one set of band_quantiles per band needed")
        return cls(meta["method"], tuple(float(v) for v in q), int(meta.get("samples", 0)),
                   str(meta.get("note", "")), bands, per_band)


@dataclass(frozen=True)
class AgeEstimates:
    """Ages and the ends of their intervals (years), one entry per face; iterates as
    ``(age, low, high)`` per face."""

    age: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def __len__(self) -> int:
        return len(self.age)

    def __iter__(self):
        return zip(self.age.tolist(), self.low.tolist(), self.high.tolist(), strict=True)

    def __getitem__(self, index: int | slice):
        """A slice: the ``AgeEstimates`` of those faces; an int: one face's (age, low, high)."""
        if isinstance(index, slice):
            return AgeEstimates(self.age[index], self.low[index], self.high[index])
        return float(self.age[index]), float(self.low[index]), float(self.high[index])

    @classmethod
    def empty(cls) -> AgeEstimates:
        z = np.zeros(0, np.float32)
        return cls(z, z, z)


def coverage_report(low: Sequence[float], high: Sequence[float],
                    true: Sequence[float]) -> dict[str, float]:
    """How often the true age lies in [low, high], and the mean width, in years."""
    low, high, true = (np.asarray(a, np.float64) for a in (low, high, true))
    if true.size == 0:
        return {"coverage": float("nan"), "mean_width": float("nan")}
    inside = (true >= low) & (true <= high)
    return {"coverage": float(inside.mean()), "mean_width": float((high - low).mean())}
