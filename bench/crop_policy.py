"""Which framing and which training data work on photos that are not pre-cropped?

On synthetic wide photos made from held-out test-split UTKFace chips (bench/wild_faces.py), MTCNN
detects once per photo; each crop policy then aligns the face, and the table gives

* framing error against the chip the photo was made from (scale, rotation, centre shift), and
* MAE of each model file given, on those crops and on the original chips (whole image).

    nice -n 10 uv run python bench/crop_policy.py --count 800 \
        --model chips=runs/exp-chips/model.pt --model prepared=runs/exp-prepared/model.pt
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from faceage.config import SplitConfig
from faceage.data.readers import read_utkface
from faceage.data.split import assign_split
from faceage.inference.alignment import CropPolicy, align_face, whole_image_face
from faceage.inference.detection import FaceDetector
from faceage.inference.modelfile import load_model_file
from faceage.training.metrics import regression_metrics
from testkit.wild_faces import framing_error, make_wild

POLICIES = {
    # The shipped policy: landmarks onto the template derived from the chips themselves.
    "utkface-chip (landmarks)": CropPolicy(),
    # The chips' framing expressed on the MTCNN box (0.905 x box height, 7 % lower), no rotation.
    "chip-box (box, no rotation)": CropPolicy(name="chip-box", kind="box", box_scale=0.905,
                                              box_shift=0.071),
    # The common recipe the issue warns about: the MTCNN box plus a 0.3 margin per side.
    "box+0.3 margin": CropPolicy(name="box-margin", kind="box", margin=0.3),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/utkface")
    p.add_argument("--count", type=int, default=800, help="test-split chips to place in photos")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=FILE")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)

    df, _ = read_utkface(args.data)
    df = df[assign_split(df["path"].tolist(), SplitConfig()) == "test"]
    df = df.sample(n=min(args.count, len(df)), random_state=args.seed).reset_index(drop=True)
    models = {}
    for item in args.model:
        label, _, path = item.partition("=")
        models[label] = load_model_file(path)
    size = 128
    rng = np.random.default_rng(args.seed)
    detector = FaceDetector()

    chips, crops, framing, ages = [], {k: [] for k in POLICIES}, {k: [] for k in POLICIES}, []
    missed = 0
    start = time.perf_counter()
    for i, (path, age) in enumerate(zip(df["path"], df["age"], strict=True)):
        chip = np.asarray(Image.open(path).convert("RGB"))
        photo, m = make_wild(chip, rng)
        faces = detector.detect(photo)
        centre = m @ np.array([chip.shape[1] / 2, chip.shape[0] / 2, 1])
        if faces:
            # The labelled face is the one at the chip's position.
            face = min(faces, key=lambda f: np.hypot(*((f.box[:2] + f.box[2:]) / 2 - centre)))
            inside = np.hypot(*((face.box[:2] + face.box[2:]) / 2 - centre)) < 0.3 * 200 * abs(
                np.linalg.det(m[:, :2])) ** 0.5
        if not faces or not inside:
            missed += 1
            continue
        ages.append(age)
        chips.append(whole_image_face(chip, size).crop)
        for name, policy in POLICIES.items():
            crops[name].append(align_face(photo, face, policy, size))
            framing[name].append(framing_error(policy.matrix(face, size), m, chip.shape[0], size))
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(df)} photos, {time.perf_counter() - start:.0f}s", flush=True)

    n = len(ages)
    print(f"\n{len(df)} synthetic photos from test-split chips; the face was found in {n} "
          f"({n / len(df):.1%}), missed {missed}\n")
    print("framing vs the source chip      scale (mean, sd)  |rotation| deg  |dx| %   |dy| %")
    for name in POLICIES:
        f = np.asarray(framing[name])
        print(f"{name:<30}  {f[:, 0].mean():.3f}  {f[:, 0].std():.3f}     "
              f"{np.abs(f[:, 1]).mean():5.2f}        {100 * np.abs(f[:, 2]).mean():5.2f}   "
              f"{100 * np.abs(f[:, 3]).mean():5.2f}")
    if not models:
        return
    ages_a = np.asarray(ages, float)
    print("\nMAE (years) / CS@5 on the same faces")
    header = f"{'model':<12}  {'chips (whole image)':<20}" + "".join(
        f"  {name:<28}" for name in POLICIES)
    print(header)
    for label, model in models.items():
        cells = []
        for batch in [chips] + [crops[name] for name in POLICIES]:
            r = regression_metrics(model.predict(batch), ages_a)
            cells.append(f"{r['mae']:5.2f} / {r['cs5']:.1%}")
        print(f"{label:<12}  {cells[0]:<20}" + "".join(f"  {c:<28}" for c in cells[1:]))
    print(f"\n{time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
