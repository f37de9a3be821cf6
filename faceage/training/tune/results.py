"""The results of a search: one row per trial, its markdown table, the best trial's model file."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from faceage.config import Config
from faceage.training.checkpoints import METRIC
from faceage.training.tune.plan import Dimension, TunePlan, trial_config

if TYPE_CHECKING:  # pandas loads only when a search runs: `faceage --help` stays quick
    import pandas as pd


def _params_text(config: dict, dims: list[Dimension]) -> str:
    parts = []
    for d in dims:
        if d.key == "backbone" or d.key not in config:
            continue
        # A whole-section dimension (model: {backbone, input_size}) shows its settings.
        items = ([(k, v) for k, v in config[d.key].items() if k != "backbone"]
                 if isinstance(config[d.key], dict) else [(d.key, config[d.key])])
        parts += [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items]
    return " ".join(parts)


def _backbone(config: dict, plan: TunePlan) -> str:
    model = config.get("model")
    return config.get("backbone") or (isinstance(model, dict) and model.get("backbone")) \
        or plan.base.model.backbone


def collect_results(grid, plan: TunePlan) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """One row per trial (best val MAE first) and each trial's per-epoch metrics."""
    import pandas as pd

    rows, curves = [], {}
    for r in grid:
        trial = Path(r.path).name
        config = r.config or {}
        cfg = trial_config(plan.base, config, plan.schedules, str(plan.tune_dir / trial), "train")
        df = r.metrics_dataframe
        df = df if df is not None and METRIC in getattr(df, "columns", []) else None
        epochs = 0 if df is None else int(df[METRIC].notna().sum())
        best = None if df is None or epochs == 0 else df.loc[df[METRIC].idxmin()]
        if r.error is not None:
            lines = [ln.strip() for ln in str(r.error).splitlines() if ln.strip()] or [""]
            # Ray wraps the trial's exception; its own "Type: message" line comes last.
            message = next((ln for ln in reversed(lines) if "Error: " in ln), lines[-1])
            status = f"error: {message[:200]}"
        elif epochs < cfg.total_epochs:
            status = "stopped by ASHA"
        else:
            status = "completed"
        rows.append({
            "trial": trial,
            "backbone": _backbone(config, plan),
            "params": _params_text(config, plan.dims),
            "best_val_mae": float(best[METRIC]) if best is not None else float("nan"),
            # Several sources: val_mae is the mean of theirs; each one's at the same epoch.
            "val_mae_by_source": "" if best is None else ", ".join(
                f"{c.split('/', 1)[1]} {best[c]:.2f}" for c in df.columns
                if c.startswith(f"{METRIC}/") and pd.notna(best[c])),
            # Every age band counted the same, and each band's signed error (+: reads older).
            "band_mae": float(best["val_band_mae"]) if best is not None
            and pd.notna(best.get("val_band_mae")) else float("nan"),
            "signed_by_band": "" if best is None else ", ".join(
                f"{c.split('/', 1)[1].replace('_plus', '+')} {best[c]:+.1f}" for c in df.columns
                if c.startswith("val_signed/") and pd.notna(best[c])),
            "signed_by_age": "" if best is None else ", ".join(
                f"{c.split('/', 1)[1].replace('_plus', '+')} {best[c]:+.1f}" for c in df.columns
                if c.startswith("val_signed_age/") and pd.notna(best[c])),
            "images_per_s": float(df["images_per_s"].median())
            if df is not None and "images_per_s" in df else float("nan"),
            "best_epoch": int(best["epoch"]) + 1 if best is not None else None,
            "epochs_run": epochs,
            "epochs_planned": cfg.total_epochs,
            "time_s": float(df["time_total_s"].iloc[-1]) if df is not None else float("nan"),
            "status": status,
            "checkpoint": best.get("checkpoint_path") if best is not None else None,
            "run_dir": str(cfg.run_dir()),
        })
        if df is not None:
            curves[trial] = df
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values("best_val_mae", na_position="last").reset_index(drop=True)
    return table, curves


def export_best_trial(table: pd.DataFrame, plan: TunePlan) -> tuple[Path, pd.Series] | None:
    """Copy the best trial's model file to ``best_model.pt``.

    A trial ASHA stopped never reached its own export, so its best checkpoint is exported here.
    """
    from ray.train import Checkpoint

    from faceage.data.run_data import RunData
    from faceage.training.checkpoints import load_checkpoint
    from faceage.training.export import export_best

    ranked = table[table["best_val_mae"].notna()]
    if ranked.empty:
        return None
    best = ranked.iloc[0]
    run_dir = Path(best["run_dir"])
    model = run_dir / "model.pt"
    if not model.is_file():
        if not best["checkpoint"]:
            return None
        ckpt = Checkpoint(best["checkpoint"])
        state = load_checkpoint(ckpt)
        metrics = next(h for h in state["history"] if h["epoch"] == state["epoch"])
        result = SimpleNamespace(best_checkpoints=[(ckpt, metrics)], checkpoint=ckpt)
        cfg = Config.model_validate(state["config"])
        model, _, _ = export_best(result, cfg, run_dir, RunData.read(cfg.data))
    target = plan.tune_dir / "best_model.pt"
    shutil.copyfile(model, target)
    return target, best


def markdown_table(table: pd.DataFrame) -> str:
    import pandas as pd

    by_source = "val_mae_by_source" in table and table["val_mae_by_source"].astype(bool).any()
    by_band = "band_mae" in table and table["band_mae"].notna().any()
    lines = ["| trial | backbone | params | best val MAE " + ("| by source " if by_source else "")
             + ("| band MAE | signed error by band | signed error 0-12, 13-19, 60+ "
                if by_band else "")
             + "| train img/s | best epoch | epochs run | time (s) | status |",
             "|---|---|---|---|" + ("---|" if by_source else "")
             + ("---|---|---|" if by_band else "") + "---|---|---|---|---|"]
    for _, r in table.iterrows():
        mae = f"{r['best_val_mae']:.2f}" if pd.notna(r["best_val_mae"]) else "-"
        epoch = f"{int(r['best_epoch'])}" if pd.notna(r["best_epoch"]) else "-"
        secs = f"{r['time_s']:.0f}" if pd.notna(r["time_s"]) else "-"
        status = str(r["status"]).replace("|", "/")
        extra = f"| {r['val_mae_by_source']} " if by_source else ""
        if by_band:
            band = f"{r['band_mae']:.2f}" if pd.notna(r["band_mae"]) else "-"
            extra += f"| {band} | {r['signed_by_band']} | {r.get('signed_by_age', '')} "
        speed = f"{r['images_per_s']:.0f}" if pd.notna(r.get("images_per_s")) else "-"
        lines.append(f"| {r['trial']} | {r['backbone']} | {r['params']} | {mae} {extra}| {speed} "
                     f"| {epoch} "
                     f"| {r['epochs_run']}/{r['epochs_planned']} | {secs} | {status} |")
    return "\n".join(lines)
