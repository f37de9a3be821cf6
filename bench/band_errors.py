"""Models side by side by true-age band, on a config's val or test split: each source's MAE, its
mean MAE over age bands, and its signed error in the bands the issues name (teenagers, the 20s,
the over-55s); then the band MAE averaged over the exact-age sources.

Faces are the prepared crops that training reads (photo sources detected and aligned once, as
``faceage calibrate`` reads them), each predicted by the model's default path (the mirror average
and its ``tta_zoom``). It is quick (about a minute per model and split on 2 cores), so it is the
tool for choosing between runs on val; ``bench/compare_models.py`` gives the test figures with
detection on every photo, as users get them.

    uv run python bench/band_errors.py --config configs/multi.yaml --split val \\
        --model a=runs/A/model.pt --model b=runs/B/model.pt
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from faceage.config import AGE_BANDS
from faceage.data.sampling import band_labels
from faceage.inference.interval import band_index
from faceage.inference.modelfile import load_model_file
from faceage.training.calibrate import prepared_split
from faceage.training.evaluate import evaluate_model, evaluation_data

BANDS = band_labels(AGE_BANDS)  # 0-6, 7-12, ..., 67+
SIGNED = ("13-19", "20-30", "56-66", "67+")


def predictions(path: str, config: str, split: str) -> pd.DataFrame:
    model = load_model_file(path, engine="auto")
    args = argparse.Namespace(config=config, data=None, limit=None, format="utkface")
    _, rows = prepared_split(evaluation_data(args, model.metadata), split)
    preds = evaluate_model(model, rows, detect=False, tta=model.resolve_tta(None))
    preds = preds.assign(source=rows["source"], exact=(rows["age_low"] == rows["age_high"]))
    return preds[(preds["status"] == "ok") & preds["exact"]]


def table(label: str, preds: pd.DataFrame) -> tuple[list[str], pd.Series]:
    lines, per_source = [], []
    for source, rows in preds.groupby("source", sort=False):
        err = rows["pred"] - rows["age"]
        band = pd.Series(np.asarray(BANDS)[band_index(rows["age"], AGE_BANDS)], index=rows.index)
        mae = err.abs().groupby(band).mean().reindex(BANDS)
        signed = err.groupby(band).mean().reindex(BANDS)
        per_source.append(mae)
        lines.append(f"| {label} | {source} | {len(rows)} | {err.abs().mean():.2f} | "
                     f"{mae.mean():.2f} | " + " | ".join(f"{signed[b]:+.2f}" for b in SIGNED)
                     + " |")
    return lines, pd.concat(per_source, axis=1).mean(axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="LABEL=PATH")
    p.add_argument("--config", required=True, help="a training config: its data sources")
    p.add_argument("--split", default="val", choices=("val", "test"))
    args = p.parse_args(argv)
    models = [m.split("=", 1) if "=" in m else (m, m) for m in args.model]
    rows, bands = [], {}
    for label, path in models:
        print(f"[bench] {label}: {path}", file=sys.stderr)
        lines, bands[label] = table(label, predictions(path, args.config, args.split))
        rows += lines
    print(f"## By source ({args.split} split, exact ages, the default path)\n")
    print("| model | source | faces | MAE | band MAE | signed " + " | signed ".join(SIGNED)
          + " |\n|---|---|---:|---:|---:|" + "---:|" * len(SIGNED))
    print("\n".join(rows))
    print("\n## Band MAE, mean over the sources\n")
    print("| model | " + " | ".join(BANDS) + " | mean |\n|---|" + "---:|" * (len(BANDS) + 1))
    for label, by_band in bands.items():
        print(f"| {label} | " + " | ".join(f"{by_band[b]:.2f}" for b in BANDS)
              + f" | **{by_band.mean():.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
