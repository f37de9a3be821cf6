"""Age-regression metrics: MAE, RMSE, CS@5 and errors by group."""

from __future__ import annotations

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
