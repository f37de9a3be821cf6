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
from faceage.metrics import mae_by, mae_by_decade, regression_metrics
from faceage.vision import FaceFinder, load_image, whole_image_face

BATCH_IMAGES = 32


def select_split(df: pd.DataFrame, split: str, metadata: dict) -> pd.DataFrame:
    """Rows of ``split`` under the model's own split settings (``all`` keeps every row)."""
    from faceage.data import assign_split  # torch comes with it: keep `faceage --help` fast

    if split == "all":
        return df
    raw = ((metadata.get("config") or {}).get("data") or {}).get("split")
    cfg = SplitConfig(**raw) if raw else SplitConfig()
    return df[assign_split(df["path"].tolist(), cfg) == split].reset_index(drop=True)


def _label(value) -> int:
    return int(value) if pd.notna(value) else -1


def evaluate_model(model, df: pd.DataFrame, detect: bool, tta: bool = False,
                   detector=None, progress: bool = True) -> pd.DataFrame:
    """Per-image predictions: ``path, age, gender, race, pred, faces, status``.

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
                   "pred": np.nan, "faces": 0, "status": "ok"}
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
            for row, pred in zip(owners, model.predict(crops, tta=tta), strict=True):
                row["pred"] = float(pred)
        bar.update(len(chunk))
    bar.close()
    return pd.DataFrame(rows, columns=["path", "age", "gender", "race", "pred", "faces",
                                       "status"])


def _mae_by_label(ok: pd.DataFrame, column: str, names: dict[int, str]) -> dict[str, dict]:
    """MAE per UTKFace label of ``column``; empty when the data carries no such labels."""
    known = ok[ok[column] >= 0]
    if known.empty:
        return {}
    keys = [names.get(int(v), str(v)) for v in known[column]]
    by = mae_by(known["pred"].to_numpy(), known["age"].to_numpy(), keys)
    order = {name: i for i, name in enumerate(names.values())}
    return dict(sorted(by.items(), key=lambda kv: order.get(kv[0], len(order))))


def summarise(preds: pd.DataFrame) -> dict[str, Any]:
    from faceage.data import UTKFACE_GENDERS, UTKFACE_RACES

    ok = preds[preds["status"] == "ok"]
    return {
        "metrics": regression_metrics(ok["pred"].to_numpy(), ok["age"].to_numpy()),
        "mae_by_decade": mae_by_decade(ok["pred"].to_numpy(), ok["age"].to_numpy())
        if len(ok) else {},
        "mae_by_gender": _mae_by_label(ok, "gender", UTKFACE_GENDERS),
        "mae_by_race": _mae_by_label(ok, "race", UTKFACE_RACES),
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
        "",
        "decade   MAE     n",
    ]
    for decade, v in report["mae_by_decade"].items():
        lines.append(f"{decade:<7}  {v['mae']:5.2f}  {v['n']:>4}")
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
    from faceage.data import read_dataset
    from faceage.modelfile import DEFAULT_MODEL_PATH, load_model_file
    from faceage.plots import prediction_report

    model = load_model_file(args.model)
    model_path = Path(args.model) if args.model else DEFAULT_MODEL_PATH
    df, load_report = read_dataset(DataConfig(format=args.format, path=args.data,
                                              limit=args.limit))
    df = select_split(df, args.split, model.metadata)
    if df.empty:
        raise UserError(f"no images of split {args.split!r} in {args.data}")
    started = time.perf_counter()
    preds = evaluate_model(model, df, detect=args.detect, tta=args.tta,
                           progress=not args.json)
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
        "crop_policy": model.crop_policy, **summary,
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
    if args.json:
        print(json.dumps(report), file=out)
    else:
        print(format_table(report), file=out)
        print(f"\nreport: {path}\nplot:   {path.with_suffix('.png')}", file=out)
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="UTKFace folder or CSV manifest (path,age)")
    p.add_argument("--format", choices=("utkface", "manifest", "prepared"), default="utkface")
    p.add_argument("--model", help="model file (default: the shipped models/faceage-default.pt)")
    p.add_argument("--detect", action="store_true",
                   help="detect and align faces (for photos that are not pre-cropped); the "
                        "largest face is taken as the labelled one")
    p.add_argument("--split", choices=("all", "train", "val", "test"), default="all",
                   help="only this split, under the model's own split settings (default all)")
    p.add_argument("--limit", type=int, help="evaluate a stable subset of this many images")
    p.add_argument("--tta", action="store_true", help="average with the mirrored crop")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--report", help="report path (default runs/evaluate/MODEL-DATA.json); the "
                                    "PNG and per-image CSV are written beside it")
