"""A face and its mirror image: how far apart are their ages? And the live-stream profile's
ages against the photo profile's, on the same photos.

    uv run python bench/mirror.py                                   # the shipped model
    uv run python bench/mirror.py --model runs/x/model.pt --limit 300

On each source's ``--split`` of ``--config`` (configs/multi.yaml: UTKFace, AAF, KFAD,
APPA-REAL), through ``faceage evaluate``'s own code (``evaluate_model``): each photo and its
mirror image (flipped pixels, written losslessly) are read, detected and aligned (UTKFace chips
are their own crops), and aged, plainly and with the mirror average (``--tta``). A selfie camera
mirrors, so both should read the same. Then the photos again with the live-stream detector
(``/predict/frames`` and ``/stream``: a 320 px detection copy, faces at least a tenth of the
frame) against the photo profile. Prints mean |difference|, the share over 5 years and the
largest, per source.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from faceage.config import load_config
from faceage.data.run_data import RunData
from faceage.inference.detection import DetectorConfig
from faceage.inference.modelfile import DEFAULT_MODEL_PATH, load_model_file
from faceage.serving.args import STREAM_DETECTOR_DEFAULTS
from faceage.training.evaluate import evaluate_model

REPO = Path(__file__).resolve().parents[1]


def mirrored(rows: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """``rows`` with each image replaced by its mirror image (PNG: no second JPEG loss)."""
    paths = []
    for i, path in enumerate(rows["path"]):
        out = folder / f"{i:06d}.png"
        with Image.open(path) as im:
            im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)
        paths.append(str(out))
    return rows.assign(path=paths)


def differences(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, float]:
    both = (a["status"] == "ok") & (b["status"] == "ok")
    d = np.abs(a.loc[both, "pred"].to_numpy() - b.loc[both, "pred"].to_numpy())
    return {"faces": int(both.sum()), "mean": float(d.mean()) if d.size else float("nan"),
            "over_5": float((d > 5).mean()) if d.size else float("nan"),
            "max": float(d.max()) if d.size else float("nan")}


def row(name: str, what: str, s: dict[str, float]) -> str:
    return (f"| {name} | {what} | {s['faces']} | {s['mean']:.2f} | {s['over_5']:.1%} "
            f"| {s['max']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    ap.add_argument("--config", default=str(REPO / "configs" / "multi.yaml"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="at most N photos per source")
    args = ap.parse_args()

    model = load_model_file(args.model)
    run = RunData.read(load_config(args.config).data)
    rows = run.subset(args.split)
    photo_detector = DetectorConfig()
    stream = DetectorConfig(**STREAM_DETECTOR_DEFAULTS)
    lines = ["| source | compared | faces | mean abs difference (years) | over 5 years | largest |",
             "|---|---|---:|---:|---:|---:|"]
    for spec in run.sources:
        own = rows[rows["source"] == spec.name].reset_index(drop=True)
        if args.limit:
            own = own.iloc[:args.limit]
        detect = spec.needs_prepare
        with tempfile.TemporaryDirectory() as tmp:
            flipped = mirrored(own, Path(tmp))
            for tta in (False, True):
                a = evaluate_model(model, own, detect, tta=tta, detector=photo_detector,
                                   progress=False)
                b = evaluate_model(model, flipped, detect, tta=tta, detector=photo_detector,
                                   progress=False)
                what = "mirror, mirror average" if tta else "mirror, plain"
                lines.append(row(spec.name, what, differences(a, b)))
                print(lines[-1], flush=True)
        if detect:
            tta = model.flip_average
            photo = evaluate_model(model, own, True, tta=tta, detector=photo_detector,
                                   progress=False)
            live = evaluate_model(model, own, True, tta=tta, detector=stream, progress=False)
            lines.append(row(spec.name, "stream profile vs photo profile", differences(photo,
                                                                                        live)))
            print(lines[-1], flush=True)
    print(f"\n{model.name} {model.version}, split {args.split}\n")
    print("\n".join(lines))
    print("\n" + astronaut(model, photo_detector, stream))


def astronaut(model, photo: DetectorConfig, stream: DetectorConfig) -> str:
    """tests/fixtures/astronaut.jpg (512 px, about 41 when photographed) on every path."""
    from faceage.inference.images import load_image
    from faceage.inference.pipeline import FacePipeline

    image = load_image(REPO / "tests" / "fixtures" / "astronaut.jpg")
    out = ["| astronaut.jpg | age (interval) |", "|---|---|"]
    for label, tta, detector, im in (
            ("photo, plain", False, photo, image),
            ("mirror image, plain", False, photo, image[:, ::-1]),
            ("photo, mirror average", True, photo, image),
            ("mirror image, mirror average", True, photo, image[:, ::-1]),
            ("stream profile, default", None, stream, image)):
        faces, est = FacePipeline(model, detector, tta=tta).predict_faces(
            [np.ascontiguousarray(im)])[0]
        age, low, high = est[0]
        out.append(f"| {label} | {age:.1f} ({low:.1f}-{high:.1f}) |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
