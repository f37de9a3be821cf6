"""Derive the ``utkface-chip`` crop template from UTKFace's own framing.

MTCNN runs on padded training-split chips; its five landmarks, in fractions of the chip side,
are averaged. Aligning a wild photo's landmarks to that mean reproduces the chips' framing.
The printed tuple is ``faceage.inference.alignment.UTKFACE_CHIP_TEMPLATE``.

    nice -n 10 uv run python bench/derive_crop_template.py --limit 3000
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from faceage.config import SplitConfig
from faceage.data.readers import read_utkface
from faceage.data.split import assign_split
from faceage.inference.detection import LANDMARK_NAMES, DetectorConfig, FaceDetector
from faceage.inference.images import load_image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/utkface")
    p.add_argument("--limit", type=int, default=3000, help="training-split chips to measure")
    p.add_argument("--pad-fraction", type=float, default=0.3)
    args = p.parse_args()
    torch.set_num_threads(1)

    df, _ = read_utkface(args.data)
    df = df[assign_split(df["path"].tolist(), SplitConfig()) == "train"]
    df = df.sample(n=min(args.limit, len(df)), random_state=0)
    det = FaceDetector(DetectorConfig(pad_fraction=args.pad_fraction))
    points, boxes, missed = [], [], 0
    start = time.perf_counter()
    for i, path in enumerate(df["path"]):
        img = load_image(path)
        h, w = img.shape[:2]
        raw_boxes, raw_points = det.detect_raw(img, pad=True)
        ok = raw_boxes[:, 4] >= det.config.min_score
        if not ok.any():
            missed += 1
            continue
        # The chip's face is the largest; the raw (unclipped) box keeps the part outside the chip.
        areas = (raw_boxes[:, 2] - raw_boxes[:, 0]) * (raw_boxes[:, 3] - raw_boxes[:, 1])
        k = int(np.argmax(np.where(ok, areas, -1)))
        x1, y1, x2, y2 = raw_boxes[k, :4]
        points.append(raw_points[k] / np.array([w, h]))
        boxes.append([x2 - x1, y2 - y1, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, w])
        if (i + 1) % 500 == 0:
            print(f"  {i + 1}/{len(df)} chips, {time.perf_counter() - start:.0f}s", flush=True)
    pts = np.stack(points)
    # Drop the few misdetections (a landmark far from its mean) before averaging.
    dev = np.abs(pts - np.median(pts, axis=0)).max(axis=(1, 2))
    keep = dev < 0.1
    template = pts[keep].mean(axis=0)
    spread = pts[keep].std(axis=0)

    print(f"\n{len(df)} training-split chips from {os.path.abspath(args.data)}; MTCNN found a face "
          f"in {len(pts)} ({len(pts) / len(df):.1%}), {keep.sum()} kept as inliers "
          f"(pad {args.pad_fraction} per side)")
    print("\nlandmark      mean x   mean y   std x   std y")
    for name, (mx, my), (sx, sy) in zip(LANDMARK_NAMES, template, spread, strict=True):
        print(f"{name:<12}  {mx:6.4f}   {my:6.4f}   {sx:5.3f}   {sy:5.3f}")
    b = np.asarray(boxes)[keep]
    side = b[:, 4]
    print("\nMTCNN box vs chip (medians): chip side / box height "
          f"{np.median(side / b[:, 1]):.3f}, / box width {np.median(side / b[:, 0]):.3f}, "
          f"/ sqrt(box area) {np.median(side / np.sqrt(b[:, 0] * b[:, 1])):.3f}; "
          f"chip centre below box centre by {np.median((0.5 - b[:, 3]) * side / b[:, 1]):.3f} "
          "x box height")
    eye_dist = np.linalg.norm(template[1] - template[0])
    print(f"eye distance {eye_dist:.4f} of the chip side; eye line tilt "
          f"{np.degrees(np.arctan2(*(template[1] - template[0])[::-1])):.2f} deg")
    print("\nUTKFACE_CHIP_TEMPLATE = (")
    for mx, my in template:
        print(f"    ({mx:.4f}, {my:.4f}),")
    print(")")


if __name__ == "__main__":
    main()
