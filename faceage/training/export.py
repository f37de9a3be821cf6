"""The end of a run: the best checkpoint exported as a model file, the curves, summary.json and
the table printed on screen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from faceage.config import Config, SplitConfig
from faceage.data.run_data import RunData
from faceage.errors import TrainingFailed
from faceage.inference.preprocess import preprocessing_metadata
from faceage.models.backbones import backbone_spec
from faceage.models.network import build_model_from, head_uncertainty
from faceage.training.checkpoints import METRIC, load_checkpoint


def data_metadata(run_data: RunData, split: SplitConfig, summary: dict) -> dict:
    """The model file's ``data``: the summary, plus each source (name, format, path, counts)."""
    sources = run_data.describe_sources(summary.get("sources", {}))
    first = sources[0]
    return {"format": first["format"] if len(sources) == 1 else "sources",
            "path": first["path"] if len(sources) == 1 else None,
            "split": split.model_dump(), **summary, "sources": sources}


INTERVAL_METRICS = ("val_interval_coverage", "val_interval_width")


def interval_metadata(best_state: dict, best_metrics: dict, uncertainty: str) -> dict:
    """The model file's head kind and age-interval calibration.

    The worker fits the calibration on each epoch's validation predictions (``train.eval_tta``
    as set) and saves it in the checkpoint; the best epoch's goes into the model file. A
    checkpoint from before intervals has none: the model file then falls back to its val MAE
    (``AgeModel.calibration``).
    """
    out: dict = {"uncertainty": uncertainty}
    if best_state.get("interval_calibration"):
        out["interval_calibration"] = best_state["interval_calibration"]
    return out


def export_best(result, cfg: Config, run_dir: Path,
                run_data: RunData) -> tuple[Path, dict, dict]:
    """Export the best checkpoint (lowest val MAE) of ``result`` as a model file; ``run_data``
    (the run's sources and crop policy) goes into its metadata.

    Returns the model path, the best epoch's metrics and the latest checkpoint's state (history,
    resumes, data summary).
    """
    from faceage.inference.modelfile import save_model_file

    ranked = [(c, m) for c, m in (result.best_checkpoints or [])
              if np.isfinite(m.get(METRIC, np.nan))]
    if not ranked or result.checkpoint is None:
        raise TrainingFailed(f"training in {run_dir} produced no checkpoint with a val MAE")
    best_ckpt, best_metrics = min(ranked, key=lambda cm: cm[1][METRIC])
    latest = load_checkpoint(result.checkpoint)
    best_state = load_checkpoint(best_ckpt)
    # The head kind is read off the weights: checkpoints from before model.uncertainty have one
    # output whatever the config now says.
    uncertainty = head_uncertainty(best_state["model"])
    model = build_model_from(cfg.model.model_copy(
        update={"pretrained": "none", "uncertainty": uncertainty}))
    model.load_state_dict(best_state["model"])
    spec = backbone_spec(cfg.model.backbone)
    metadata = {
        "name": f"faceage-{cfg.model.backbone}",
        "preprocessing": preprocessing_metadata(cfg.model.input_size, spec.mean, spec.std),
        # Validated (and its interval calibrated) on the mean of each face and its mirror:
        # every route predicts so by default.
        "flip_average": bool(cfg.train.eval_tta),
        **({"tta_zoom": cfg.train.eval_zoom} if cfg.train.eval_tta and cfg.train.eval_zoom
           else {}),
        "crop_policy": run_data.crop_policy,
        "data": data_metadata(run_data, cfg.data.split, latest.get("data_summary", {})),
        "metrics": {k: v for k, v in best_metrics.items()
                    if k in ("val_mae", "val_rmse", "val_cs5", "epoch", "val_mae_all")
                    or k.startswith("val_mae/")},
        "config": cfg.to_dict(),
    }
    metadata.update(interval_metadata(best_state, best_metrics, uncertainty))
    from faceage.training.experiment import run_reference

    if (tracked := run_reference(run_dir)) is not None:
        metadata["mlflow"] = tracked  # `faceage evaluate` adds its report to this run
    metadata["metrics"].update({k: best_metrics[k] for k in INTERVAL_METRICS
                                if k in best_metrics})
    path = save_model_file(model, run_dir / "model.pt", metadata)
    return path, dict(best_metrics), latest


def write_summary(cfg: Config, run_dir: Path, model_path: Path, best: dict, latest: dict,
                  wall_seconds: float) -> Path:
    """``curves.png`` and ``summary.json`` in ``run_dir``; returns the curves' path."""
    from faceage.training.plots import learning_curves

    history = latest["history"]
    curves = learning_curves(history, run_dir / "curves.png",
                             title=f"{cfg.name}: {cfg.model.backbone} @ {cfg.model.input_size}px")
    (run_dir / "summary.json").write_text(json.dumps(
        {"name": cfg.name, "best": best, "history": history,
         "resumes": latest.get("resumes", []), "data": latest.get("data_summary"),
         "model": str(model_path), "curves": str(curves), "wall_seconds": wall_seconds},
        indent=2, default=float))
    return curves


def summary_table(history: list[dict], best_epoch: int) -> str:
    """One line per epoch, the best marked with ``*``; with several sources, a val MAE column
    per source and the pooled one (val_MAE is their mean, the selection metric)."""
    names = [k.split("/", 1)[1] for k in (history[0] if history else {})
             if k.startswith("val_mae/")]
    names = names if len(names) > 1 else []
    extra = "".join(f"  {n[:12]:>12}" for n in [*names, "all"][: len(names) + bool(names)])
    lines = ["epoch  stage       train_loss  val_MAE" + extra + "  val_RMSE  CS@5    img/s",
             "-----  ----------  ----------  -------" + "  ------------" * (len(names)
                                                                         + bool(names))
             + "  --------  ------  -----"]
    for h in history:
        mark = " *" if h["epoch"] == best_epoch else ""
        cols = "".join(f"  {h.get(f'val_mae/{n}', float('nan')):>12.2f}" for n in names)
        if names:
            cols += f"  {h.get('val_mae_all', float('nan')):>12.2f}"
        lines.append(f"{h['epoch'] + 1:>5}  {h['stage_name']:<10}  {h['train_loss']:>10.3f}  "
                     f"{h['val_mae']:>7.2f}{cols}  {h['val_rmse']:>8.2f}  {h['val_cs5']:>6.1%}  "
                     f"{h['images_per_s']:>5.0f}{mark}")
    return "\n".join(lines)
