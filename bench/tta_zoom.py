"""Which closer view to add to the mirror average (a model file's ``tta_zoom``): MAE per source.

Each face of a split (photo sources on their prepared crops, as training and ``faceage
calibrate`` read them) is predicted with the mirror average alone and with each closer view
joined to it (``AgeModel.predict_with_scale``, the path every route takes), and the table gives
MAE per exact-age source, KFAD's share inside its range, and the age network's time per call.
Choose on ``--split val``; ``--split test`` is for the record.

    uv run python bench/tta_zoom.py --config configs/multi.yaml --split val --zoom 0.88 0.92 0.96
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from faceage.config import load_config
from faceage.inference.images import load_image
from faceage.inference.modelfile import load_model_file
from faceage.training.calibrate import prepared_split


def scores(rows, ages: np.ndarray) -> dict[str, float]:
    out = {}
    for source, own in rows.groupby("source", sort=False):
        a = ages[own.index]
        if (own["age_low"] == own["age_high"]).all():
            out[f"{source} MAE"] = float(np.abs(a - own["age"]).mean())
        else:
            out[f"{source} in range"] = float(((a >= own["age_low"]) &
                                               (a <= own["age_high"])).mean() * 100)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model file (default: the shipped model)")
    p.add_argument("--config", default="configs/multi.yaml")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--zoom", type=float, nargs="+", default=[0.88, 0.92, 0.96])
    p.add_argument("--threads", type=int, default=1, help="torch threads (a replica's one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, rows = prepared_split(load_config(args.config).with_absolute_paths().data, args.split)
    faces = [load_image(path) for path in rows["path"]]
    model = load_model_file(args.model, engine="auto")
    table = []
    for zoom in [None, *args.zoom]:
        model.metadata.pop("tta_zoom", None)
        if zoom:
            model.metadata["tta_zoom"] = zoom
        ages, _ = model.predict_with_scale(faces, tta=True)
        started = time.perf_counter()
        for _ in range(20):
            model.predict_with_scale(faces[:1], tta=True)
        ms = (time.perf_counter() - started) / 20 * 1000
        table.append(("mirror only" if zoom is None else f"+ closer view {zoom:g}",
                      scores(rows, ages), ms))
    columns = list(table[0][1])
    print(f"{args.split} split, {len(rows)} faces, {model.name} ({model.engine.engine})\n")
    print("| views | " + " | ".join(columns) + " | one face, ms |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for label, s, ms in table:
        print(f"| {label} | " + " | ".join(f"{s[c]:.2f}" for c in columns) + f" | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
