"""``faceage corrections list|delete``: the corrections a server stored, read and pruned (the
folder format is ``faceage.corrections``). ``faceage feedback`` is its deprecated alias."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from faceage.corrections import CorrectionError, CorrectionFolder


def add_corrections_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="the corrections in a corrections folder",
                        description="List the corrections (id, age given, the model's answer, "
                                    "model, time) and the model's error on them.")
    ls.add_argument("folder", type=Path, help="the folder the server stores corrections in")
    rm = sub.add_parser("delete", help="delete corrections: their rows and crops",
                        description="Delete corrections by id (or all of them): the manifest "
                                    "row and the face crop.")
    rm.add_argument("folder", type=Path, help="the folder the server stores corrections in")
    rm.add_argument("ids", nargs="*", metavar="ID",
                    help="entry ids (`faceage corrections list`)")
    rm.add_argument("--all", action="store_true", help="delete every correction")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def list_entries(folder: CorrectionFolder, out=print) -> None:
    """Print the folder's corrections as a table, then the model's error on them."""
    rows = folder.rows()
    out(f"{len(rows)} correction{'s' * (len(rows) != 1)} in {folder.manifest}")
    if not rows:
        return
    out(f"{'id':<16}  {'age':>5}  {'model said':>10}  {'interval':>11}  {'model':<28}  time")
    for r in rows:
        interval = f"{_float(r['predicted_low']):.0f}-{_float(r['predicted_high']):.0f}"
        model = f"{r['model_name']} {r['model_version']}".strip()
        out(f"{r['id']:<16}  {_float(r['age']):>5.1f}  {_float(r['predicted']):>10.1f}  "
            f"{interval:>11}  {model[:28]:<28}  {r['time']}")
    errors = [abs(_float(r["predicted"]) - _float(r["age"])) for r in rows]
    inside = sum(_float(r["predicted_low"]) <= _float(r["age"]) <= _float(r["predicted_high"])
                 for r in rows)
    out(f"the models' mean absolute error on them: {sum(errors) / len(errors):.2f} years; "
        f"{inside} of {len(rows)} ages inside the model's interval")
    out(f"train on them: data.sources: [{{format: manifest, path: {folder.manifest}}}]")


def run_corrections_command(args: argparse.Namespace, out=print) -> int:
    """``faceage corrections list|delete``."""
    folder = CorrectionFolder(args.folder)
    if args.action == "list":
        list_entries(folder, out)
        return 0
    if args.all == bool(args.ids):
        raise CorrectionError("name the entries to delete (ids from `faceage corrections "
                              "list`), or --all for every one, not both")
    gone = folder.delete(args.ids, everything=args.all)
    out(f"deleted {len(gone)} correction{'s' * (len(gone) != 1)} (rows and crops) from "
        f"{folder.root}")
    return 0
