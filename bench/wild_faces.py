"""Synthetic "not pre-cropped" photos from UTKFace chips, with the exact chip → photo transform.

Offline we only have the tight chips, so each is placed in a larger frame: a smooth random
background (no second face), a feathered edge, a random rotation (+-15 deg), a random size and
position, and JPEG re-encoding. The face is real; the scene around it is not. The known transform
lets a benchmark measure how well detection + alignment recovers the chip's framing.

    uv run python bench/wild_faces.py --count 800 --out /tmp/wild   # writes PNG/JPEG + manifest
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from testkit.wild_faces import make_wild


def main() -> None:
    import pandas as pd
    from PIL import Image

    from faceage.config import SplitConfig
    from faceage.data.readers import read_utkface
    from faceage.data.split import assign_split

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/utkface")
    p.add_argument("--count", type=int, default=800, help="test-split chips to place")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    df, _ = read_utkface(args.data)
    df = df[assign_split(df["path"].tolist(), SplitConfig()) == "test"]
    df = df.sample(n=min(args.count, len(df)), random_state=args.seed)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    for path, age in zip(df["path"], df["age"], strict=True):
        chip = np.asarray(Image.open(path).convert("RGB"))
        photo, m = make_wild(chip, rng)
        name = Path(path).name
        Image.fromarray(photo).save(out / "images" / name, quality=95)
        rows.append({"path": f"images/{name}", "age": age, "source": path,
                     "affine": m.round(5).tolist()})
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    print(f"{len(rows)} photos in {out / 'images'}; manifest {out / 'manifest.csv'}")


if __name__ == "__main__":
    main()
