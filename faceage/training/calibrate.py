"""``faceage calibrate``: refit a model file's age interval on validation faces, by the path
``faceage predict`` takes.

Training fits the interval on each epoch's validation predictions (``faceage.training.worker``)
and the model file keeps the best epoch's. This command fits it again on a model file's
validation split (its own split settings), photo sources on their aligned crops as training
reads them, every face predicted by the model's default path (``AgeModel.predict_with_scale``).
Use it when that path changes after training (``--tta-zoom``: a closer view joins the mirror
average) or to calibrate on other validation data. The weights are not touched; a new file is
written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import numpy as np

from faceage.arguments import add_engine_argument
from faceage.config import AGE_BANDS
from faceage.errors import UserError
from faceage.inference.interval import DEFAULT_COVERAGE, IntervalCalibration, coverage_report


def refit_interval(preds) -> tuple[IntervalCalibration, dict[str, float]]:
    """The interval calibration of ``faceage.training.worker.validate`` fitted on
    ``evaluate``'s per-face predictions (``pred``, ``scale``, ``age``, ``source``, range
    columns): exact ages only where there are any, per band of predicted age, every source
    weighing the same. Also how the 80 % interval covers those faces."""
    ok = preds[preds["status"] == "ok"]
    exact = (ok["range_low"] == ok["range_high"]).to_numpy()
    fit = ok[exact] if exact.any() else ok
    if fit.empty:
        raise UserError("no validation face to calibrate on (every image was unreadable or "
                        "had no face)")
    scales = fit["scale"].to_numpy()
    scales = None if np.isnan(scales).all() else scales
    cal = IntervalCalibration.fit(fit["pred"].to_numpy(), fit["age"].to_numpy(), scales,
                                  sources=fit["source"].to_numpy(), bands=AGE_BANDS)
    covered = coverage_report(*cal.interval(fit["pred"].to_numpy(), scales, DEFAULT_COVERAGE),
                              fit["age"].to_numpy())
    return cal, covered


def prepared_split(data, split: str):
    """The rows of ``data``'s ``split``, photo sources on their aligned crops (detected once and
    cached, as training reads them), and the ``RunData`` they come from."""
    from faceage.data.prepared_sources import prepare_raw_sources
    from faceage.data.run_data import RunData

    run = RunData.read(data)
    table = prepare_raw_sources(run.table, data, run.report)
    return run, table[table["split"] == split].reset_index(drop=True)


def run_calibrate_command(args: argparse.Namespace, out=None) -> int:
    """Predict the validation split, refit the interval, write ``args.out``."""
    from faceage.inference.modelfile import load_model_file, save_model_file
    from faceage.training.evaluate import evaluate_model, evaluation_data

    out = out or sys.stdout
    if args.model and Path(args.out).resolve() == Path(args.model).resolve():
        raise UserError(f"--out {args.out} is the model file itself; write a new file")
    model = load_model_file(args.model, engine=args.engine)
    if args.tta_zoom is not None:
        model.metadata.pop("tta_zoom", None)
        if args.tta_zoom < 1:
            model.metadata["tta_zoom"] = args.tta_zoom
    run, rows = prepared_split(evaluation_data(args, model.metadata), "val")
    if rows.empty:
        raise UserError("these sources have no validation images under the model's split")
    preds = evaluate_model(model, rows, detect=False, tta=model.resolve_tta(None)).assign(
        source=rows["source"], range_low=rows["age_low"], range_high=rows["age_high"])
    cal, covered = refit_interval(preds)
    metadata = {k: v for k, v in model.metadata.items()
                if k not in ("format", "format_version", "faceage_version", "created",
                             "version")}
    metadata["interval_calibration"] = cal.to_metadata()
    metadata["calibrated"] = {
        "split": "val", "faces": cal.samples, "sources": run.source_names,
        "tta": model.resolve_tta(None), "tta_zoom": model.tta_zoom,
        "from": str(args.model or "the shipped model"),
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    metadata.setdefault("metrics", {}).update(
        val_interval_coverage=covered["coverage"], val_interval_width=covered["mean_width"])
    path = save_model_file(model.net, args.out, metadata)
    print(f"calibrated on {cal.samples} validation faces of {', '.join(run.source_names)}: "
          f"the 80 % interval covers {covered['coverage']:.1%} of them, mean width "
          f"{covered['mean_width']:.1f} years\nmodel: {path}", file=out)
    return 0


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model file (default: the shipped models/faceage-default.pt)")
    p.add_argument("--config", help="a training config: calibrate on its sources' val split")
    p.add_argument("--data", action="append",
                   help="instead of --config: FORMAT:PATH items, as faceage evaluate takes them")
    p.add_argument("--out", required=True, help="the calibrated model file to write")
    p.add_argument("--tta-zoom", type=_zoom_arg, metavar="SHARE",
                   help="set the model's tta_zoom first: each face is also seen closer (this "
                        "share of each side of its crop) in the mirror average; 1 removes it")
    p.add_argument("--limit", type=int, help="calibrate on a stable subset of this many images")
    add_engine_argument(p)
    p.set_defaults(format="utkface")


def _zoom_arg(text: str) -> float:
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0.5 < share <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a share of the side above 0.5, at "
                                         "most 1 (1: no closer view)")
    return share
