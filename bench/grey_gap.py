"""How much younger (or older) a model reads the same faces in black-and-white than in colour.

Each model is evaluated twice on the same images with ``faceage evaluate``: as they are, and with
``--grayscale`` (every photo made black-and-white before detection and the model). The gap of an
image is its grey prediction minus its colour one; the table gives the mean and median gap per
source and age band, and per model. Deterministic (no timing): one run is a measurement.

    uv run python bench/grey_gap.py --model shipped=models/faceage-default.pt \\
        --data utkface:../shared/data/utkface --data aaf:../shared/data/aaf --limit 1500
    uv run python bench/grey_gap.py --model old=OLD.pt --model new=NEW.pt \\
        --config configs/multi.yaml          # its sources, KFAD split by family
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from faceage.cli import main as cli_main
from faceage.config import AGE_BANDS
from faceage.data.sampling import age_band, band_labels


def predictions(model: str, data: list[str], config: str | None, split: str, grey: bool,
                limit: int | None, report: Path) -> pd.DataFrame:
    args = ["evaluate", "--model", model, "--split", split, "--report", str(report),
            "--no-mlflow", "--tta"] + (["--grayscale"] if grey else [])
    args += ["--limit", str(limit)] if limit else []
    args += ["--config", config] if config else []
    for d in data:
        args += ["--data", d]
    with contextlib.redirect_stdout(sys.stderr):
        if cli_main(args) != 0:
            sys.exit(f"evaluating {model} failed")
    return pd.read_csv(report.with_suffix(".csv"), keep_default_na=False)


def gap_table(colour: pd.DataFrame, grey: pd.DataFrame) -> pd.DataFrame:
    both = colour.merge(grey[["path", "pred"]], on="path", suffixes=("", "_grey"))
    both = both[(both["pred"] != "") & (both["pred_grey"] != "")]
    both["gap"] = both["pred_grey"].astype(float) - both["pred"].astype(float)
    age = both["age"].astype(float)
    if "range_low" in both.columns:  # a range label counts by its middle
        mid = (both["range_low"].replace("", np.nan).astype(float)
               + both["range_high"].replace("", np.nan).astype(float)) / 2
        age = mid.fillna(age)
    labels = band_labels(AGE_BANDS)
    both["band"] = [labels[b] for b in age_band(age, AGE_BANDS)]
    if "source" not in both.columns:
        both["source"] = "data"
    rows = []
    for (source, band), g in [*both.groupby(["source", "band"], sort=False),
                              *[((s, "all"), g) for s, g in both.groupby("source")]]:
        rows.append({"source": source, "band": band, "n": len(g),
                     "mean gap": g["gap"].mean(), "median gap": g["gap"].median()})
    out = pd.DataFrame(rows)
    order = {b: i for i, b in enumerate([*labels, "all"])}
    return out.sort_values(["source", "band"], key=lambda c: c.map(order) if c.name == "band"
                           else c).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="LABEL=PATH")
    p.add_argument("--data", action="append", default=[], metavar="FORMAT:PATH")
    p.add_argument("--config", help="a training config: evaluate its data sources (with their "
                                    "split_by), instead of --data")
    p.add_argument("--split", default="test", choices=("val", "test", "all"))
    p.add_argument("--limit", type=int, help="a stable subset of this many images per source")
    p.add_argument("--out", default="runs/grey_gap", help="reports and predictions go here")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    for item in args.model:
        label, _, path = item.partition("=")
        colour = predictions(path, args.data, args.config, args.split, False, args.limit,
                             out / f"{label}-colour.json")
        grey = predictions(path, args.data, args.config, args.split, True, args.limit,
                           out / f"{label}-grey.json")
        tables[label] = gap_table(colour, grey)
    first = next(iter(tables.values()))
    head = "| source | band | n | " + " | ".join(f"{m} mean gap | {m} median gap"
                                               for m in tables) + " |"
    print(head)
    print("|" + "---|" * (3 + 2 * len(tables)))
    for i, r in first.iterrows():
        cells = [f"{t.loc[i, 'mean gap']:+.2f} | {t.loc[i, 'median gap']:+.2f}"
                 for t in tables.values()]
        print(f"| {r['source']} | {r['band']} | {r['n']} | " + " | ".join(cells) + " |")
    print("\ngap: the grey photo's predicted age minus the colour one's (years; below 0: grey "
          "reads younger)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
