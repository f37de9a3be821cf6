"""Age-regression metrics: MAE, RMSE, CS@5 and errors by group."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def regression_metrics(pred, true, cs_years: float = 5.0) -> dict[str, float]:
    """MAE, RMSE, CS@5 (share of predictions within ``cs_years`` of the truth) and the mean
    signed error."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.size == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "cs5": float("nan"),
                "signed": float("nan"), "n": 0}
    err = np.abs(pred - true)
    return {
        "mae": float(err.mean()),
        "rmse": float(np.sqrt(np.mean((pred - true) ** 2))),
        "cs5": float(np.mean(err <= cs_years)),
        "signed": float(np.mean(pred - true)),  # mean signed error: above 0 reads older
        "n": int(pred.size),
    }


def source_val_metrics(pred, true, sources, names: Sequence[str]) -> dict[str, float]:
    """Validation metrics: ``val_mae`` is the mean of the per-source MAEs (the model-selection
    metric: with one source, exactly the pooled MAE); ``val_mae_all``, ``val_rmse`` and
    ``val_cs5`` are pooled; ``val_mae/<source>`` etc. per source."""
    pred, true, sources = np.asarray(pred), np.asarray(true), np.asarray(sources)
    pooled = regression_metrics(pred, true)
    out: dict[str, float] = {"val_mae_all": pooled["mae"], "val_rmse": pooled["rmse"],
                             "val_cs5": pooled["cs5"], "val_images": pooled["n"]}
    maes = []
    for name in names:
        m = regression_metrics(pred[sources == name], true[sources == name])
        out[f"val_mae/{name}"], out[f"val_rmse/{name}"] = m["mae"], m["rmse"]
        out[f"val_cs5/{name}"], out[f"val_images/{name}"] = m["cs5"], m["n"]
        maes.append(m["mae"])
    out["val_mae"] = float(np.mean(maes)) if len(names) > 1 else pooled["mae"]
    return out


def range_val_metrics(pred, low, high, sources, names: Sequence[str]) -> dict[str, float]:
    """``val_range_acc/<source>``: the share of predictions inside their label's age range, for
    each source with range labels (its ``val_mae`` is the mean distance to the range)."""
    pred, low, high = np.asarray(pred, float), np.asarray(low, float), np.asarray(high, float)
    sources = np.asarray(sources)
    out: dict[str, float] = {}
    for name in names:
        own = sources == name
        if (low[own] != high[own]).any():
            inside = (pred[own] >= low[own]) & (pred[own] <= high[own])
            out[f"val_range_acc/{name}"] = float(inside.mean())
    return out


# Children, teenagers and the over-60s: their mean signed error is reported on its own.
AGE_GROUPS = (("0-12", 0.0, 13.0), ("13-19", 13.0, 20.0), ("60_plus", 60.0, float("inf")))


def band_val_metrics(pred, low, high, edges: Sequence[float]) -> dict[str, float]:
    """Accuracy by age band (life stages, ``edges``: lower ends), all sources together:
    ``val_signed/<band>``, the mean signed distance to the label (above 0: reads older; 0 inside
    a range) of each band of true age (a range by its middle); ``val_band_mae``, the mean over
    bands of their MAE, where every band counts the same however many faces it has;
    ``val_signed_age/<group>`` for the ``AGE_GROUPS``."""
    from faceage.data.sampling import age_band, band_labels

    pred, low, high = np.asarray(pred, float), np.asarray(low, float), np.asarray(high, float)
    signed = pred - np.clip(pred, low, high)
    band, labels = age_band((low + high) / 2, edges), band_labels(edges)
    out: dict[str, float] = {}
    maes = []
    for b in np.unique(band):
        mine = band == b
        # MLflow metric names take no "+": the open-ended top band is "67_plus".
        out[f"val_signed/{labels[b].replace('+', '_plus')}"] = float(signed[mine].mean())
        maes.append(float(np.abs(signed[mine]).mean()))
    if maes:
        out["val_band_mae"] = float(np.mean(maes))
    middle = (low + high) / 2
    for name, lo, hi in AGE_GROUPS:  # the ages read most wrongly on everyday photos
        mine = (middle >= lo) & (middle < hi)
        if mine.any():
            out[f"val_signed_age/{name}"] = float(signed[mine].mean())
    return out


def decade_label(age: float) -> str:
    lo = int(min(age, 99) // 10) * 10
    return f"{lo}-{lo + 9}"


def mae_by(pred, true, keys) -> dict[str, dict[str, float]]:
    """MAE, mean signed error (predicted minus true: above 0 reads older) and count per value of
    ``keys`` (e.g. age decade, gender), sorted by key."""
    pred, true, keys = np.asarray(pred, float), np.asarray(true, float), np.asarray(keys)
    out = {}
    for k in sorted(set(keys.tolist()), key=lambda x: (str(type(x)), x)):
        mask = keys == k
        err = pred[mask] - true[mask]
        out[str(k)] = {"mae": float(np.abs(err).mean()), "signed": float(err.mean()),
                       "n": int(mask.sum())}
    return out


def mae_by_decade(pred, true) -> dict[str, dict[str, float]]:
    labels = np.array([decade_label(a) for a in np.asarray(true, float)])
    res = mae_by(pred, true, labels)
    return dict(sorted(res.items(), key=lambda kv: int(kv[0].split("-")[0])))
