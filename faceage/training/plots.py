"""PNG figures next to the JSON reports: learning curves, predicted vs true, error by age."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG and free it (pyplot keeps every open figure alive)."""
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(history: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Train loss and val MAE per epoch (numbered from 1, as in the logs), stages marked."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax1.set_ylabel("train loss")
    ax2.plot(epochs, [h["val_mae"] for h in history], marker="o", color="tab:red",
             label="val MAE")
    if any("train_mae" in h for h in history):
        ax2.plot(epochs, [h.get("train_mae", np.nan) for h in history], marker=".",
                 color="tab:gray", label="train MAE (augmented, running)")
    ax2.set_ylabel("years")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        prev = None
        for x, h in zip(epochs, history, strict=True):
            if h["stage"] != prev:
                # Stage names sit just inside the top of the plot, right of their boundary.
                where, coords = (0.01, 1), ("axes fraction", "axes fraction")
                if prev is not None:
                    ax.axvline(x - 0.5, color="k", alpha=0.3, linestyle="--")
                    where, coords = (x - 0.45, 1), ("data", "axes fraction")
                ax.annotate(h.get("stage_name", ""), where, xycoords=coords, xytext=(0, -4),
                            textcoords="offset points", va="top", fontsize=8, alpha=0.7)
            prev = h["stage"]
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")  # curves mostly fall: that corner stays clear
    fig.suptitle(title or "learning curves")
    fig.tight_layout()
    return _save(fig, path)


def _decade_start(label: str) -> int:
    """``"20-29"`` -> 20, for sorting decade labels (anything else last)."""
    start = label.split("-")[0]
    return int(start) if start.isdigit() else 999


def _decade_slots(labels: Sequence[str], by_decade: dict) -> list[tuple[int, str]]:
    """(position among ``labels``, label) of each decade one source has a MAE for."""
    return [(i, k) for i, k in enumerate(labels) if k in by_decade]


def prediction_report(parts: dict[str, tuple], path: str | Path, title: str = "") -> Path:
    """Predicted vs true scatter and MAE by age decade of each source, ``{name: (pred, true,
    by_decade)}``: one scatter colour and one bar per source in each decade (a single unnamed
    part: no legend)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    hi = 1.0
    for name, (pred, true, _) in parts.items():
        pred, true = np.asarray(pred, float), np.asarray(true, float)
        ax1.scatter(true, pred, s=4, alpha=0.35, label=name or None)
        hi = max(hi, float(true.max(initial=1)), float(pred.max(initial=1)))
    hi += 5
    ax1.plot([0, hi], [0, hi], "k--", alpha=0.5)
    ax1.set_xlim(0, hi)
    ax1.set_ylim(0, hi)
    ax1.set_xlabel("true age")
    ax1.set_ylabel("predicted age")
    ax1.grid(alpha=0.3)
    labels = sorted({k for *_, by_decade in parts.values() for k in by_decade}, key=_decade_start)
    width = 0.8 / len(parts)
    for j, (name, (*_, by_decade)) in enumerate(parts.items()):
        slots = _decade_slots(labels, by_decade)
        xs = [i - 0.4 + width * (j + 0.5) for i, _ in slots]
        ax2.bar(xs, [by_decade[k]["mae"] for _, k in slots], width, label=name or None,
                color="tab:orange" if len(parts) == 1 else None)
        for x, (_, k) in zip(xs, slots, strict=True):
            ax2.text(x, by_decade[k]["mae"], f"n={by_decade[k]['n']}", ha="center",
                     va="bottom", fontsize=7 if len(parts) == 1 else 5)
    ax2.set_xticks(range(len(labels)), labels)
    if len(parts) > 1:
        ax1.legend(loc="upper left", markerscale=3)
        ax2.legend(loc="upper left")
    ax2.set_xlabel("true age decade")
    ax2.set_ylabel("MAE (years)")
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "predictions")
    fig.tight_layout()
    return _save(fig, path)


def tune_curves(curves: dict[str, tuple[Sequence[int], Sequence[float]]], labels: dict[str, str],
                path: str | Path, title: str = "") -> Path:
    """Val MAE per epoch (numbered from 1) of every tuning trial, one line each."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 5))
    for trial, (epochs, maes) in curves.items():
        ax.plot(epochs, maes, marker="o", label=labels.get(trial, trial))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val MAE (years)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no trial reported a val MAE", ha="center", transform=ax.transAxes)
    ax.set_title(title or "val MAE per trial")
    fig.tight_layout()
    return _save(fig, path)
