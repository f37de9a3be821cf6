"""``faceage evaluate``: MAE, RMSE, CS@5 and MAE per decade of a model file on labelled sources.

One path for every form: ``--data PATH``, ``--data FORMAT:PATH`` (repeatable) and ``--config``
all become sources, read and split as a training run reads them (``RunData``, no image decoded),
evaluated source by source and reported per source and whole. A single ``--data PATH`` keeps
the report's one-source shape (``faceage.training.report``). Images labelled by an age range
(a CSV's ``age_low,age_high``) are scored against their range (``range_outcomes``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from faceage.arguments import add_engine_argument
from faceage.config import DataConfig, SourceConfig, SplitConfig
from faceage.data.readers import FORMATS
from faceage.errors import ImageError, UserError
from faceage.inference.alignment import whole_image_face
from faceage.inference.images import load_image
from faceage.inference.interval import DEFAULT_COVERAGE
from faceage.inference.pipeline import FaceFinder
from faceage.inference.predict import coverage_arg
from faceage.training.report import (
    format_report,
    one_source_summary,
    predictions_table,
    summarise_sources,
)

BATCH_IMAGES = 32
PREDICTION_COLUMNS = ["path", "age", "pred", "age_low", "age_high", "scale", "faces", "status"]


def evaluate_model(model, rows: pd.DataFrame, detect: bool, tta: bool = False,
                   detector=None, progress: bool = True,
                   coverage: float = DEFAULT_COVERAGE, grayscale: bool = False) -> pd.DataFrame:
    """Per-image predictions of ``rows`` (``path``, ``age``): ``path, age, pred, age_low,
    age_high, scale, faces, status`` (``age_low``/``age_high``: the central ``coverage``
    interval around ``pred``; ``scale``: the head's, NaN for a one-output head; ``status``: ok,
    no-face or unreadable).

    Without ``detect`` the whole image is the face (pre-cropped data, as in training); with it,
    the largest detected face is aligned by the model's crop policy. ``grayscale``: every photo
    made black-and-white first (what an old print or a grey webcam gives).
    """
    from tqdm import tqdm

    finder = FaceFinder.for_model(model.metadata, detector) if detect else None
    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(rows), desc="evaluating", unit="img", disable=not progress,
               mininterval=2, file=sys.stderr)
    for start in range(0, len(rows), BATCH_IMAGES):
        chunk = rows.iloc[start:start + BATCH_IMAGES]
        crops, owners = [], []
        for path, age in zip(chunk["path"], chunk["age"], strict=True):
            row = {"path": path, "age": float(age), "pred": np.nan, "age_low": np.nan,
                   "age_high": np.nan, "scale": np.nan, "faces": 0, "status": "ok"}
            out.append(row)
            try:
                image = load_image(path)
                if grayscale:
                    image = to_grayscale(image)
            except ImageError:
                row["status"] = "unreadable"
                continue
            if finder is None:
                faces = [whole_image_face(image, model.input_size)]
            else:
                faces = finder.find(image)
            row["faces"] = len(faces)
            if not faces:
                row["status"] = "no-face"
                continue
            crops.append(faces[0].crop)
            owners.append(row)
        if crops:
            ages, scales = model.predict_with_scale(crops, tta=tta)
            # float32 ends, as ``AgeModel.estimate`` gives them
            lows, highs = (a.astype(np.float32) for a in
                           model.calibration.interval(ages, scales, coverage))
            for i, row in enumerate(owners):
                row.update(pred=float(ages[i]), age_low=float(lows[i]), age_high=float(highs[i]),
                           scale=np.nan if scales is None else float(scales[i]))
        bar.update(len(chunk))
    bar.close()
    return pd.DataFrame(out, columns=PREDICTION_COLUMNS)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """An RGB image as black-and-white, still three channels (ITU-R 601 luma, as Pillow's)."""
    import cv2

    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


# -- what to evaluate -----------------------------------------------------------------------------


def _prefixed(item: str) -> bool:
    fmt, sep, _ = item.partition(":")
    return bool(sep) and fmt in FORMATS


def is_one_source(args: argparse.Namespace) -> bool:
    """``--data PATH`` given once, without a format prefix: the one-source report."""
    return not args.config and len(args.data or []) == 1 and not _prefixed(args.data[0])


def evaluation_data(args: argparse.Namespace, metadata: dict) -> DataConfig:
    """The sources to evaluate, a training config's ``data`` or ``--data [FORMAT:]PATH`` items
    (``--format`` for those without a prefix), split by the model's own split settings."""
    from faceage.config import load_config

    data_args = args.data or []
    if args.config:
        if data_args:
            raise UserError("give --config or --data, not both")
        data = load_config(args.config).with_absolute_paths().data
    elif data_args:
        items = [d.split(":", 1) if _prefixed(d) else (args.format, d) for d in data_args]
        data = DataConfig(sources=[SourceConfig(format=fmt, path=path) for fmt, path in items])
    else:
        raise UserError("give --data (a data folder or CSV) or --config (a training config "
                        "with data.sources)")
    data.limit = args.limit
    # The model's own split settings decide which images are val/test.
    trained = (metadata.get("config") or {}).get("data") or {}
    if trained.get("split"):
        data.split = SplitConfig(**trained["split"])
    # A source the model trained on keeps the split key it trained with (its families).
    split_by = {os.path.realpath(s["path"]): s.get("split_by")
                for s in trained.get("sources") or [] if s.get("path")}
    for source in data.sources:
        if source.split_by is None:
            source.split_by = split_by.get(os.path.realpath(source.path))
    return data


# -- the command ----------------------------------------------------------------------------------


def run_evaluate(args: argparse.Namespace, out=None) -> int:
    """Evaluate ``args.model`` on every source; write the report, its CSV and plot; print it."""
    from faceage.data.run_data import RunData
    from faceage.inference.modelfile import DEFAULT_MODEL_PATH, load_model_file

    out = out or sys.stdout
    one_source = is_one_source(args)
    model = load_model_file(args.model, engine=args.engine)
    model_path = Path(args.model) if args.model else DEFAULT_MODEL_PATH
    run = RunData.read(evaluation_data(args, model.metadata))
    started = time.perf_counter()
    preds, detect = predict_sources(model, run, args, one_source)
    names = run.source_names
    summary = summarise_sources(preds, names)
    whole = summary["all"]
    if whole["evaluated"] == 0:
        raise UserError(f"no image of {args.data[0]} could be evaluated ({whole['no_face']} "
                        f"without a face, {whole['unreadable']} unreadable)" if one_source
                        else "no image of these sources could be evaluated")

    head = {"model": {"name": model.name, "version": model.version, "path": str(model_path)}}
    skipped = {k: len(v) for k, v in run.report.skipped.items()}
    calibration = {"crop_policy": model.crop_policy,
                   "interval_calibration": model.interval_info(args.coverage)}
    if one_source:
        spec = run.sources[0]
        report = {**head, "data": {"path": spec.path, "format": spec.format,
                                   "skipped_when_reading": skipped},
                  "split": args.split, "detect": detect[spec.name],
                  "tta": model.resolve_tta(args.tta),
                  **({"grayscale": True} if args.grayscale else {}),
                  **calibration, **one_source_summary(whole)}
        label = Path(spec.path.rstrip("/")).stem or "data"
        title = f"{model.name} on {Path(spec.path).name} (MAE {whole['metrics']['mae']:.2f})"
    else:
        report = {**head, "data": {"sources": [{**s.describe(), "detect": detect[s.name]}
                                               for s in run.sources],
                                   "skipped_when_reading": skipped},
                  "split": args.split, "tta": model.resolve_tta(args.tta),
                  **({"grayscale": True} if args.grayscale else {}), **calibration,
                  **summary, "metrics": whole["metrics"]}
        label = Path(args.config).stem if args.config else "-".join(names)
        maes = ", ".join(f"{n} {summary['sources'][n]['metrics']['mae']:.2f}" for n in names)
        title = f"{model.name}, {args.split} split (MAE {maes})"
    report["seconds"] = round(time.perf_counter() - started, 1)
    label += "-grayscale" if args.grayscale else ""
    path = Path(args.report) if args.report else default_report_path(
        model_path, label, args.split, detect=one_source and args.detect)
    files = write_report(report, preds, summary, path, one_source, title)
    by_source = {} if one_source else {n: tracked_metrics(summary["sources"][n]) for n in names}
    track(args, model, files, {"": tracked_metrics(whole), **by_source})
    if args.json:
        print(json.dumps(report), file=out)
    else:
        print(format_report(report), file=out)
        print(f"\nreport: {path}\nplot:   {path.with_suffix('.png')}"
              + ("" if one_source else f"\npredictions: {path.with_suffix('.csv')}"), file=out)
    return 0


def predict_sources(model, run, args: argparse.Namespace,
                    one_source: bool) -> tuple[pd.DataFrame, dict[str, bool]]:
    """``evaluate_model`` on each source's images of ``args.split`` (photo sources, raw AAF and
    CSV, detected and aligned by the model's crop policy), with their source, gender and group;
    and whether each source was detected."""
    rows = run.table if args.split == "all" else run.subset(args.split)
    parts, detect = [], {}
    for spec in run.sources:
        own = rows[rows["source"] == spec.name].reset_index(drop=True)
        if own.empty:
            raise UserError(f"no images of split {args.split!r} in {args.data[0]}" if one_source
                            else f"{spec.label()}: no images of split {args.split!r}")
        detect[spec.name] = bool(args.detect or spec.needs_prepare)
        preds = evaluate_model(model, own, detect=detect[spec.name],
                               tta=model.resolve_tta(args.tta),
                               detector={"engine": getattr(args, "engine", "auto")},
                               progress=not args.json, coverage=args.coverage,
                               grayscale=getattr(args, "grayscale", False))
        parts.append(range_outcomes(
            preds.assign(source=spec.name, gender=own["gender"].to_numpy(),
                         group=own["group"].to_numpy(), range_low=own["age_low"].to_numpy(),
                         range_high=own["age_high"].to_numpy()),
            run.table.loc[run.table["source"] == spec.name, ["age_low", "age_high"]]))
    return pd.concat(parts, ignore_index=True), detect


def range_outcomes(preds: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """``in_range`` and ``within_one_range`` (1/0; empty for exact ages and images without a
    prediction) of one source's predictions. Within one range: inside the true range widened to
    its neighbours among the source's ranges (``labels``: all its rows, every split), sorted by
    their ends; for KFAD's 0-6, 7-12, 13-19, ... a 7-12 label takes 0-19."""
    ranges = sorted({(lo, hi) for lo, hi in zip(labels["age_low"], labels["age_high"],
                                                strict=True) if lo != hi})
    wide = {}
    for i, (lo, hi) in enumerate(ranges):
        wide[(lo, hi)] = (ranges[max(i - 1, 0)][0], ranges[min(i + 1, len(ranges) - 1)][1])
    pred, low, high = preds["pred"], preds["range_low"], preds["range_high"]
    scored = (low != high) & pred.notna()
    wide_low, wide_high = np.array([wide.get(k, k) for k in zip(low, high, strict=True)],
                                   dtype=float).reshape(-1, 2).T
    inside = ((pred >= low) & (pred <= high)).astype(float)
    near = ((pred >= wide_low) & (pred <= wide_high)).astype(float)
    return preds.assign(in_range=inside.where(scored), within_one_range=near.where(scored))


def default_report_path(model_path: Path, label: str, split: str, detect: bool = False) -> Path:
    suffix = ("-detect" if detect else "") + ("" if split == "all" else f"-{split}")
    return Path("runs") / "evaluate" / f"{model_path.stem}-{label}{suffix}.json"


def write_report(report: dict, preds: pd.DataFrame, summary: dict, path: Path,
                 one_source: bool, title: str) -> list[Path]:
    """The JSON, the per-image CSV and the plot (one scatter colour and bar per source), side by
    side; their paths go into ``report`` too."""
    from faceage.training.plots import prediction_report

    png, csv = path.with_suffix(".png"), path.with_suffix(".csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    report.update(report=str(path), plot=str(png), predictions=str(csv))
    path.write_text(json.dumps(report, indent=2))
    predictions_table(preds, one_source).to_csv(csv, index=False)
    ok = preds[preds["status"] == "ok"]
    prediction_report({"" if one_source else n: (ok.loc[ok["source"] == n, "pred"],
                                                 ok.loc[ok["source"] == n, "age"],
                                                 block["mae_by_decade"])
                       for n, block in summary["sources"].items()}, png, title=title)
    return [path, png, csv]


def tracked_metrics(block: dict) -> dict:
    """A summary block's metrics, with its range accuracy (and within one range) if it has
    range labels."""
    r = block.get("range") or {}
    return {**block["metrics"], **({"range_accuracy": r["accuracy"],
                                    "within_one_range": r["within_one"]} if r else {})}


def track(args: argparse.Namespace, model, files: list[Path], metrics: dict[str, dict]) -> None:
    """The report and its metrics (``eval_test_tta_mae/aaf``, ...) to the model's MLflow run."""
    if getattr(args, "no_mlflow", False):
        return
    from faceage.training.experiment import attach_report

    prefix = f"eval_{args.split}{'_tta' if model.resolve_tta(args.tta) else ''}_"
    flat = {f"{prefix}{k}{'/' + src if src else ''}": v
            for src, block in metrics.items() for k, v in block.items()
            if k in ("mae", "rmse", "cs5", "signed", "range_accuracy", "within_one_range")}
    attach_report(model.metadata, files, flat, say=lambda m: print(m, file=sys.stderr))


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append",
                   help="UTKFace folder or CSV manifest (path,age or path,age_low,age_high); "
                        f"repeat it, as FORMAT:PATH ({', '.join(FORMATS)}), to report several "
                        "sources")
    p.add_argument("--config", help="a training config: evaluate its data sources")
    p.add_argument("--format", choices=[n for n, f in FORMATS.items() if not f.detect],
                   default="utkface", help="the format of --data items without a FORMAT: prefix")
    p.add_argument("--model", help="model file (default: the shipped models/faceage-default.pt)")
    p.add_argument("--detect", action="store_true",
                   help="detect and align faces (for photos that are not pre-cropped); the "
                        "largest face is taken as the labelled one")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                   help="only this split, under the model's own split settings (default all)")
    p.add_argument("--limit", type=int, help="evaluate a stable subset of this many images")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each face with its mirror image (default: as the model was "
                        "validated, its flip_average)")
    p.add_argument("--grayscale", action="store_true",
                   help="make every photo black-and-white first (how the model reads grey "
                        "photos: compare with a colour run)")
    p.add_argument("--coverage", type=coverage_arg, default=DEFAULT_COVERAGE,
                   help="the age intervals' coverage (above 0, at most 0.99; default 0.8); the "
                        "report says how often the true age falls inside and the mean width")
    add_engine_argument(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-mlflow", action="store_true",
                   help="do not add the report to the MLflow run that trained the model (by "
                        "default it is added when the model file names a run whose store "
                        "answers)")
    p.add_argument("--report", help="report path (default runs/evaluate/MODEL-DATA.json); the "
                                    "PNG and per-image CSV are written beside it")
