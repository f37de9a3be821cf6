"""Two (or more) model files side by side on the same test splits of several data sources.

Each model is evaluated with ``faceage evaluate`` over the sources (raw AAF photos detected and
aligned by the model's own crop policy, UTKFace chips as they are), under the first model's split
settings, with flip TTA; the tables the model card needs are printed as Markdown: per-source MAE,
RMSE, CS@5 and 80 % interval coverage and width, MAE and signed error by decade, gender and group,
and the signed error of an age band (AAF adults 30-59 by default).

    uv run python bench/compare_models.py \\
        --model old=runs/models/faceage-0.1.0.pt --model new=models/faceage-default.pt \\
        --data utkface:../shared/data/utkface --data aaf:../shared/data/aaf
    uv run python bench/compare_models.py --model old=OLD.pt --model new=NEW.pt \\
        --config configs/multi.yaml         # its sources: KFAD split by family, range tables
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import pandas as pd

from faceage.cli import main as cli_main


def evaluate(label: str, model: str, data: list[str], split: str, tta: bool,
             out_dir: Path, reuse: bool = False,
             config: str | None = None) -> tuple[dict, pd.DataFrame]:
    report = out_dir / f"{label}-{split}.json"
    if reuse and report.is_file() and report.stat().st_mtime > Path(model).stat().st_mtime:
        earlier = json.loads(report.read_text())
        if earlier["model"]["path"] == model and earlier["tta"] == tta:
            print(f"[compare] {label}: reusing {report}", file=sys.stderr)
            return earlier, pd.read_csv(report.with_suffix(".csv"), keep_default_na=False)
    args = ["evaluate", "--model", model, "--split", split, "--report", str(report),
            "--no-mlflow"] + (["--config", config] if config else [])
    for d in data:
        args += ["--data", d]
    if tta:
        args.append("--tta")
    with contextlib.redirect_stdout(sys.stderr):  # evaluate's own table; ours go to stdout
        code = cli_main(args)
    if code != 0:
        sys.exit(f"evaluating {model} failed (exit {code})")
    return json.loads(report.read_text()), pd.read_csv(report.with_suffix(".csv"),
                                                       keep_default_na=False)


def fmt(v: float, digits: int = 2, signed: bool = False) -> str:
    return "-" if v != v else (f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="LABEL=PATH")
    p.add_argument("--data", action="append", default=[], metavar="FORMAT:PATH")
    p.add_argument("--config", help="a training config: its data sources (e.g. KFAD split by "
                                     "family), instead of or besides --data")
    p.add_argument("--split", default="test", choices=("val", "test", "all"))
    p.add_argument("--no-tta", action="store_true")
    p.add_argument("--band", default="aaf:30-59",
                   help="SOURCE:LO-HI: the signed error of this source's faces aged LO..HI")
    p.add_argument("--out", default="runs/compare", help="reports and predictions go here")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a model's earlier report in --out (same file, newer than it)")
    args = p.parse_args(argv)
    if not args.data and not args.config:
        p.error("give --data FORMAT:PATH (repeatable) or --config CONFIG")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = [m.split("=", 1) if "=" in m else (Path(m).stem, m) for m in args.model]
    results = {label: evaluate(label, path, args.data, args.split, not args.no_tta, out_dir,
                               args.reuse, args.config)
               for label, path in models}
    labels = [label for label, _ in models]
    sources = list(next(iter(results.values()))[0]["sources"])

    print(f"## Per source ({args.split} split{'' if args.no_tta else ', flip TTA'})\n")
    print("| source | model | images | MAE | RMSE | CS@5 | signed | 80 % interval coverage "
          "| mean width (y) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for src in [*sources, "all"]:
        for label in labels:
            report = results[label][0]
            b = report["all"] if src == "all" else report["sources"][src]
            m, band = b["metrics"], b.get("interval") or {}
            print(f"| {src} | {label} | {b['evaluated']} | {fmt(m['mae'])} | {fmt(m['rmse'])} "
                  f"| {m['cs5']:.1%} | {fmt(m.get('signed', float('nan')), signed=True)} "
                  f"| {band['coverage']:.1%} | {band['mean_width']:.1f} |"
                  if band else
                  f"| {src} | {label} | {b['evaluated']} | {fmt(m['mae'])} | {fmt(m['rmse'])} "
                  f"| {m['cs5']:.1%} | {fmt(m.get('signed', float('nan')), signed=True)} | - "
                  "| - |")

    for key, title in (("mae_by_decade", "decade"), ("mae_by_gender", "gender"),
                       ("mae_by_group", "group")):
        print(f"\n## MAE / signed error by {title}\n")
        head = " | ".join(f"{label} MAE | {label} signed" for label in labels)
        print(f"| source | {title} | n | {head} |\n|---|---|---:|" + "---:|" * 2 * len(labels))
        for src in sources:
            keys = list(results[labels[0]][0]["sources"][src].get(key, {}))
            for k in keys:
                cells, n = [], None
                for label in labels:
                    row = results[label][0]["sources"][src].get(key, {}).get(k)
                    if row is None:
                        cells += ["-", "-"]
                        continue
                    n = row["n"]
                    cells += [fmt(row["mae"]), fmt(row.get("signed", float("nan")), signed=True)]
                print(f"| {src} | {k} | {n} | " + " | ".join(cells) + " |")

    ranged = [s for s in sources if results[labels[0]][0]["sources"][s].get("range")]
    for src in ranged:
        print(f"\n## {src}: range labels (in the range, within one range, signed error to the "
              "range's middle)\n")
        head = " | ".join(f"{label} in | {label} within one | {label} signed" for label in labels)
        print(f"| range | n | {head} |\n|---|---:|" + "---:|" * 3 * len(labels))
        for k in ["all", *results[labels[0]][0]["sources"][src]["range_by_range"]]:
            cells, n = [], None
            for label in labels:
                b = results[label][0]["sources"][src]
                row = b["range"] if k == "all" else b["range_by_range"].get(k)
                if row is None:
                    cells += ["-"] * 3
                    continue
                n = row["n"]
                cells += [f"{row['accuracy']:.1%}", f"{row['within_one']:.1%}",
                          fmt(row["signed"], signed=True)]
            print(f"| {k} | {n} | " + " | ".join(cells) + " |")

    print("\n## 80 % interval coverage by age band (exact ages)\n")
    head = " | ".join(f"{label} coverage | {label} width" for label in labels)
    print(f"| source | band | n | {head} |\n|---|---|---:|" + "---:|" * 2 * len(labels))
    for src in sources:
        for k in results[labels[0]][0]["sources"][src].get("interval_by_band", {}):
            cells, n = [], None
            for label in labels:
                row = results[label][0]["sources"][src].get("interval_by_band", {}).get(k)
                if not row:
                    cells += ["-", "-"]
                    continue
                n = row["n"]
                cells += [f"{row['coverage']:.1%}", f"{row['mean_width']:.1f}"]
            print(f"| {src} | {k} | {n} | " + " | ".join(cells) + " |")

    src, _, rng = args.band.partition(":")
    lo, hi = (float(x) for x in rng.split("-"))
    print(f"\n## {src}, ages {lo:g}-{hi:g}\n\n| model | n | MAE | signed |\n|---|---:|---:|---:|")
    for label in labels:
        preds = results[label][1]
        ok = preds[(preds["source"] == src) & (preds["status"] == "ok")]
        ok = ok[(ok["age"].astype(float) >= lo) & (ok["age"].astype(float) <= hi)]
        err = ok["pred"].astype(float) - ok["age"].astype(float)
        print(f"| {label} | {len(ok)} | {fmt(err.abs().mean())} | {fmt(err.mean(), signed=True)} |")
    print(f"\nreports: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
