"""``faceage evaluate``: MAE, RMSE, CS@5 and MAE per decade of a model file on a labelled set."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from faceage.config import DataConfig, SplitConfig
from faceage.errors import ImageError, UserError
from faceage.inference.interval import DEFAULT_COVERAGE
from faceage.inference.predict import coverage_arg
from faceage.inference.vision import FaceFinder, load_image, whole_image_face
from faceage.training.metrics import mae_by, mae_by_decade, regression_metrics

BATCH_IMAGES = 32


def select_split(df: pd.DataFrame, split: str, metadata: dict) -> pd.DataFrame:
    """Rows of ``split`` under the model's own split settings (``all`` keeps every row)."""
    from faceage.data.datasets import (
        assign_split,  # torch comes with it: keep `faceage --help` fast
    )

    if split == "all":
        return df
    raw = ((metadata.get("config") or {}).get("data") or {}).get("split")
    cfg = SplitConfig(**raw) if raw else SplitConfig()
    return df[assign_split(df["path"].tolist(), cfg) == split].reset_index(drop=True)


def _label(value) -> int:
    return int(value) if pd.notna(value) else -1


def evaluate_model(model, df: pd.DataFrame, detect: bool, tta: bool = False,
                   detector=None, progress: bool = True,
                   coverage: float = DEFAULT_COVERAGE) -> pd.DataFrame:
    """Per-image predictions: ``path, age, gender, race, pred, age_low, age_high, faces,
    status`` (``age_low``/``age_high``: the central ``coverage`` interval around ``pred``).

    ``status`` is ok, no-face or unreadable; gender and race are -1 where the data has no labels.

    Without ``detect`` the whole image is the face (pre-cropped data, as in training); with it,
    the largest detected face is aligned by the model's crop policy.
    """
    from tqdm import tqdm

    finder = FaceFinder.for_model(model.metadata, detector) if detect else None
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(df), desc="evaluating", unit="img", disable=not progress,
               mininterval=2, file=sys.stderr)
    for start in range(0, len(df), BATCH_IMAGES):
        chunk = df.iloc[start:start + BATCH_IMAGES]
        crops, owners = [], []
        labels = zip(chunk["path"], chunk["age"], chunk.get("gender", [-1] * len(chunk)),
                     chunk.get("race", [-1] * len(chunk)), strict=True)
        for path, age, gender, race in labels:
            row = {"path": path, "age": float(age), "race": _label(race), "gender": _label(gender),
                   "pred": np.nan, "age_low": np.nan, "age_high": np.nan, "faces": 0,
                   "status": "ok"}
            rows.append(row)
            try:
                image = load_image(path)
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
            estimates = model.estimate(crops, tta=tta, coverage=coverage)
            for row, (pred, low, high) in zip(owners, estimates, strict=True):
                row["pred"], row["age_low"], row["age_high"] = pred, low, high
        bar.update(len(chunk))
    bar.close()
    return pd.DataFrame(rows, columns=["path", "age", "gender", "race", "pred", "age_low",
                                       "age_high", "faces", "status"])


def _mae_by_label(ok: pd.DataFrame, column: str, names: dict[int, str]) -> dict[str, dict]:
    """MAE per UTKFace label of ``column``; empty when the data carries no such labels."""
    known = ok[ok[column] >= 0]
    if known.empty:
        return {}
    keys = [names.get(int(v), str(v)) for v in known[column]]
    by = mae_by(known["pred"].to_numpy(), known["age"].to_numpy(), keys)
    order = {name: i for i, name in enumerate(names.values())}
    return dict(sorted(by.items(), key=lambda kv: order.get(kv[0], len(order))))


def interval_summary(ok: pd.DataFrame) -> dict[str, Any]:
    """``interval``: how often the true age lies in [age_low, age_high] and the mean width,
    overall; ``interval_by_decade``: the same per decade of true age."""
    from faceage.inference.interval import coverage_report
    from faceage.training.metrics import decade_label

    if "age_low" not in ok.columns or ok.empty:
        return {"interval": {}, "interval_by_decade": {}}

    def one(rows: pd.DataFrame) -> dict[str, Any]:
        return {**coverage_report(rows["age_low"], rows["age_high"], rows["age"]),
                "n": int(len(rows))}

    decades = ok["age"].map(decade_label)
    order = sorted(set(decades), key=lambda d: int(d.split("-")[0]))
    by = {d: one(ok[decades == d]) for d in order}
    return {"interval": one(ok), "interval_by_decade": by}


def summarise(preds: pd.DataFrame) -> dict[str, Any]:
    from faceage.data.datasets import UTKFACE_GENDERS, UTKFACE_RACES

    ok = preds[preds["status"] == "ok"]
    return {
        "metrics": regression_metrics(ok["pred"].to_numpy(), ok["age"].to_numpy()),
        "mae_by_decade": mae_by_decade(ok["pred"].to_numpy(), ok["age"].to_numpy())
        if len(ok) else {},
        "mae_by_gender": _mae_by_label(ok, "gender", UTKFACE_GENDERS),
        "mae_by_race": _mae_by_label(ok, "race", UTKFACE_RACES),
        **interval_summary(ok),
        "images": int(len(preds)),
        "evaluated": int(len(ok)),
        "no_face": int((preds["status"] == "no-face").sum()),
        "unreadable": int((preds["status"] == "unreadable").sum()),
    }


def format_table(report: dict[str, Any]) -> str:
    m = report["metrics"]
    lines = [
        f"model   {report['model']['name']} {report['model']['version']}",
        f"data    {report['data']['path']} ({report['data']['format']}, split {report['split']}, "
        f"{'detect + align' if report['detect'] else 'whole image'}"
        f"{', TTA' if report['tta'] else ''})",
        f"images  {report['images']}: evaluated {report['evaluated']}, no face "
        f"{report['no_face']}, unreadable {report['unreadable']}",
        "",
        f"MAE   {m['mae']:.2f} years",
        f"RMSE  {m['rmse']:.2f} years",
        f"CS@5  {m['cs5']:.1%}",
    ]
    band, by_band = report.get("interval") or {}, report.get("interval_by_decade") or {}
    if band:
        cal = report.get("interval_calibration") or {}
        lines.append(f"age interval ({cal.get('coverage', DEFAULT_COVERAGE):.0%}, "
                     f"{cal.get('method', '?')}): covers {band['coverage']:.1%}, "
                     f"mean width {band['mean_width']:.1f} years")
    lines += ["", "decade   MAE     n" + ("   covered  width" if by_band else "")]
    for decade, v in report["mae_by_decade"].items():
        b = by_band.get(decade)
        extra = f"   {b['coverage']:>6.1%}  {b['mean_width']:5.1f}" if b else ""
        lines.append(f"{decade:<7}  {v['mae']:5.2f}  {v['n']:>4}{extra}")
    for key, title in (("mae_by_gender", "gender"), ("mae_by_race", "race")):
        if report.get(key):
            lines += ["", f"{title:<7}  MAE     n"]
            lines += [f"{k:<7}  {v['mae']:5.2f}  {v['n']:>4}" for k, v in report[key].items()]
    return "\n".join(lines)


def default_report_path(model_path: Path, data: str, detect: bool, split: str) -> Path:
    name = Path(data.rstrip("/")).stem or "data"
    suffix = ("-detect" if detect else "") + ("" if split == "all" else f"-{split}")
    return Path("runs") / "evaluate" / f"{model_path.stem}-{name}{suffix}.json"


def run_evaluate(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    data_args = args.data if isinstance(args.data, list) else [args.data] if args.data else []
    if args.config or len(data_args) > 1 or any(_prefixed(d) for d in data_args):
        return run_evaluate_sources(args, data_args, out)
    if not data_args:
        raise UserError("give --data (a data folder or CSV) or --config (a training config "
                        "with data.sources)")
    args.data = data_args[0]
    from faceage.data.datasets import read_dataset
    from faceage.inference.modelfile import DEFAULT_MODEL_PATH, load_model_file
    from faceage.training.plots import prediction_report

    model = load_model_file(args.model)
    model_path = Path(args.model) if args.model else DEFAULT_MODEL_PATH
    df, load_report = read_dataset(DataConfig(format=args.format, path=args.data,
                                              limit=args.limit))
    df = select_split(df, args.split, model.metadata)
    if df.empty:
        raise UserError(f"no images of split {args.split!r} in {args.data}")
    started = time.perf_counter()
    preds = evaluate_model(model, df, detect=args.detect, tta=args.tta,
                           progress=not args.json, coverage=args.coverage)
    summary = summarise(preds)
    if summary["evaluated"] == 0:
        raise UserError(f"no image of {args.data} could be evaluated "
                        f"({summary['no_face']} without a face, "
                        f"{summary['unreadable']} unreadable)")
    report = {
        "model": {"name": model.name, "version": model.version, "path": str(model_path)},
        "data": {"path": str(args.data), "format": args.format,
                 "skipped_when_reading": {k: len(v) for k, v in load_report.skipped.items()}},
        "split": args.split, "detect": bool(args.detect), "tta": bool(args.tta),
        "crop_policy": model.crop_policy,
        "interval_calibration": model.interval_info(args.coverage), **summary,
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = Path(args.report) if args.report else default_report_path(
        model_path, args.data, args.detect, args.split)
    path.parent.mkdir(parents=True, exist_ok=True)
    report["report"] = str(path)
    report["plot"] = str(path.with_suffix(".png"))
    report["predictions"] = str(path.with_suffix(".csv"))
    path.write_text(json.dumps(report, indent=2))
    preds.to_csv(path.with_suffix(".csv"), index=False)
    ok = preds[preds["status"] == "ok"]
    prediction_report(ok["pred"], ok["age"], summary["mae_by_decade"], path.with_suffix(".png"),
                      title=f"{model.name} on {Path(args.data).name} "
                            f"(MAE {summary['metrics']['mae']:.2f})")
    track(args, model, [path, path.with_suffix(".png"), path.with_suffix(".csv")],
          {"": summary["metrics"]})
    if args.json:
        print(json.dumps(report), file=out)
    else:
        print(format_table(report), file=out)
        print(f"\nreport: {path}\nplot:   {path.with_suffix('.png')}", file=out)
    return 0


def track(args: argparse.Namespace, model, files: list[Path], metrics: dict[str, dict]) -> None:
    """The report and its metrics (``eval_test_tta_mae/aaf``, ...) to the model's MLflow run."""
    if getattr(args, "no_mlflow", False):
        return
    from faceage.training.experiment import attach_report

    prefix = f"eval_{args.split}{'_tta' if args.tta else ''}_"
    flat = {f"{prefix}{k}{'/' + src if src else ''}": v
            for src, block in metrics.items() for k, v in block.items()
            if k in ("mae", "rmse", "cs5", "signed")}
    attach_report(model.metadata, files, flat, say=lambda m: print(m, file=sys.stderr))


# -- several sources ------------------------------------------------------------------------------


def _prefixed(item: str) -> bool:
    from faceage.data.sources import SOURCE_FORMATS

    fmt, sep, _ = item.partition(":")
    return bool(sep) and fmt in SOURCE_FORMATS


def evaluation_sources(args: argparse.Namespace, data_args: list[str]):
    """The sources to evaluate: a training config's ``data`` or ``--data [FORMAT:]PATH`` items
    (``--format`` for those without a prefix), and the DataConfig they are read with."""
    from faceage.config import SourceConfig, load_config

    if args.config:
        if data_args:
            raise UserError("give --config or --data, not both")
        data = load_config(args.config).with_absolute_paths().data
    else:
        items = []
        for d in data_args:
            fmt, path = d.split(":", 1) if _prefixed(d) else (args.format, d)
            if fmt == "manifest":
                fmt = "csv"
            if fmt == "prepared":
                items.append(SourceConfig(format="utkface", path=path, prepared=True,
                                          name=Path(path.rstrip("/")).name or None))
            else:
                items.append(SourceConfig(format=fmt, path=path))
        data = DataConfig(sources=items)
    data.limit = args.limit
    return data


def summarise_sources(preds: pd.DataFrame, names: list[str]) -> dict[str, Any]:
    """``summarise`` per source and for the whole, with MAE by gender and by group."""

    def one(rows: pd.DataFrame) -> dict[str, Any]:
        base = summarise(rows)
        ok = rows[rows["status"] == "ok"]
        for key, col in (("mae_by_gender", "gender_name"), ("mae_by_group", "group")):
            known = ok[(ok[col] != "") & (ok[col] != "unknown")]
            base[key] = (mae_by(known["pred"].to_numpy(), known["age"].to_numpy(),
                                known[col].to_numpy()) if len(known) else {})
        return base

    return {"sources": {n: one(preds[preds["source"] == n]) for n in names},
            "all": one(preds)}


def format_sources_table(report: dict[str, Any]) -> str:
    names = list(report["sources"])
    cols = [*names, "all"]
    blocks = {**report["sources"], "all": report["all"]}
    width = max(10, *(len(c) for c in cols)) + 2
    head = " " * 10 + "".join(f"{c:>{width}}" for c in cols)
    lines = [f"model   {report['model']['name']} {report['model']['version']}",
             f"split   {report['split']}{', TTA' if report['tta'] else ''}", "", head]

    def row(label: str, get) -> str:
        return f"{label:<10}" + "".join(f"{get(blocks[c]):>{width}}" for c in cols)

    lines.append(row("images", lambda b: str(b["images"])))
    lines.append(row("evaluated", lambda b: str(b["evaluated"])))
    lines.append(row("no face", lambda b: str(b["no_face"])))
    lines.append(row("MAE", lambda b: f"{b['metrics']['mae']:.2f}"))
    lines.append(row("RMSE", lambda b: f"{b['metrics']['rmse']:.2f}"))
    lines.append(row("CS@5", lambda b: f"{b['metrics']['cs5']:.1%}"))
    if blocks["all"].get("interval"):  # the age interval: share holding the true age, width
        lines.append(row("in interval", lambda b: f"{b['interval']['coverage']:.1%}"
                         if b.get("interval") else "-"))
        lines.append(row("int. width", lambda b: f"{b['interval']['mean_width']:.1f}"
                         if b.get("interval") else "-"))
    for key, title in (("mae_by_decade", "decade"), ("mae_by_gender", "gender"),
                       ("mae_by_group", "group")):
        keys = list(dict.fromkeys(k for c in cols for k in blocks[c].get(key, {})))
        if not keys:
            continue
        lines += ["", f"MAE by {title}"]
        for k in keys:
            lines.append(row(k[:10], lambda b, k=k, key=key: (
                f"{b[key][k]['mae']:.2f} ({b[key][k]['n']})" if k in b.get(key, {}) else "-")))
    return "\n".join(lines)


def run_evaluate_sources(args: argparse.Namespace, data_args: list[str], out) -> int:
    """``faceage evaluate`` over several sources: each source's rows evaluated (raw AAF/CSV
    photos detected and aligned by the model's crop policy), reported per source and whole."""
    from faceage.data.sources import read_sources
    from faceage.inference.modelfile import DEFAULT_MODEL_PATH, load_model_file
    from faceage.training.plots import sources_prediction_report

    model = load_model_file(args.model)
    model_path = Path(args.model) if args.model else DEFAULT_MODEL_PATH
    data = evaluation_sources(args, data_args)
    # The model's own split settings decide which images are val/test.
    raw = ((model.metadata.get("config") or {}).get("data") or {}).get("split")
    if raw:
        data.split = SplitConfig(**raw)
    table, load_report, specs = read_sources(data)
    if args.split != "all":
        table = table[table["split"] == args.split].reset_index(drop=True)
    started = time.perf_counter()
    parts = []
    for spec in specs:
        rows = table[table["source"] == spec.name].reset_index(drop=True)
        if rows.empty:
            raise UserError(f"{spec.label()}: no images of split {args.split!r}")
        preds = evaluate_model(model, rows[["path", "age"]], detect=args.detect or
                               spec.needs_prepare, tta=args.tta, progress=not args.json,
                               coverage=getattr(args, "coverage", DEFAULT_COVERAGE))
        preds["source"] = spec.name
        preds["gender_name"] = rows["gender"].to_numpy()
        preds["group"] = rows["group"].to_numpy()
        parts.append(preds)
    preds = pd.concat(parts, ignore_index=True)
    names = [s.name for s in specs]
    summary = summarise_sources(preds, names)
    if summary["all"]["evaluated"] == 0:
        raise UserError("no image of these sources could be evaluated")
    report = {
        "model": {"name": model.name, "version": model.version, "path": str(model_path)},
        "data": {"sources": [{**s.describe(), "detect": bool(args.detect or s.needs_prepare)}
                             for s in specs],
                 "skipped_when_reading": {k: len(v) for k, v in load_report.skipped.items()}},
        "split": args.split, "tta": bool(args.tta), "crop_policy": model.crop_policy,
        "interval_calibration": model.interval_info(getattr(args, "coverage", DEFAULT_COVERAGE)),
        **summary, "metrics": summary["all"]["metrics"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    name = Path(args.config).stem if args.config else "-".join(names)
    path = Path(args.report) if args.report else Path("runs") / "evaluate" / (
        f"{model_path.stem}-{name}" + ("" if args.split == "all" else f"-{args.split}") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    report["report"], report["predictions"] = str(path), str(path.with_suffix(".csv"))
    report["plot"] = str(path.with_suffix(".png"))
    path.write_text(json.dumps(report, indent=2))
    preds.rename(columns={"gender": "gender_code", "gender_name": "gender"}).drop(
        columns=["gender_code", "race"]).to_csv(path.with_suffix(".csv"), index=False)
    ok = preds[preds["status"] == "ok"]
    maes = ", ".join(f"{n} {summary['sources'][n]['metrics']['mae']:.2f}" for n in names)
    sources_prediction_report(
        {n: (ok.loc[ok["source"] == n, "pred"], ok.loc[ok["source"] == n, "age"],
             summary["sources"][n]["mae_by_decade"]) for n in names},
        path.with_suffix(".png"), title=f"{model.name}, {args.split} split (MAE {maes})")
    track(args, model, [path, path.with_suffix(".png"), path.with_suffix(".csv")],
          {"": summary["all"]["metrics"],
           **{n: summary["sources"][n]["metrics"] for n in names}})
    if args.json:
        print(json.dumps(report), file=out)
    else:
        print(format_sources_table(report), file=out)
        print(f"\nreport: {path}\nplot:   {path.with_suffix('.png')}\n"
              f"predictions: {path.with_suffix('.csv')}", file=out)
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append",
                   help="UTKFace folder or CSV manifest (path,age); repeat it, as "
                        "FORMAT:PATH (utkface, aaf, csv), to report several sources")
    p.add_argument("--config", help="a training config: evaluate its data sources")
    p.add_argument("--format", choices=("utkface", "manifest", "prepared"), default="utkface")
    p.add_argument("--model", help="model file (default: the shipped models/faceage-default.pt)")
    p.add_argument("--detect", action="store_true",
                   help="detect and align faces (for photos that are not pre-cropped); the "
                        "largest face is taken as the labelled one")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                   help="only this split, under the model's own split settings (default all)")
    p.add_argument("--limit", type=int, help="evaluate a stable subset of this many images")
    p.add_argument("--tta", action="store_true", help="average with the mirrored crop")
    p.add_argument("--coverage", type=coverage_arg, default=DEFAULT_COVERAGE,
                   help="the age intervals' coverage (above 0, at most 0.99; default 0.8); the "
                        "report says how often the true age falls inside and the mean width")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-mlflow", action="store_true",
                   help="do not add the report to the MLflow run that trained the model (by "
                        "default it is added when the model file names a run whose store "
                        "answers)")
    p.add_argument("--report", help="report path (default runs/evaluate/MODEL-DATA.json); the "
                                    "PNG and per-image CSV are written beside it")
