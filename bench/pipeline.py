"""Where the time of one frame goes: decode, detection, alignment, regression (ms per frame).

Frames are the public-domain rocket photo as background with 1 or 5 copies of the astronaut's
face (tests/fixtures), JPEG-encoded; each frame is decoded from bytes as Serve would.

    uv run python bench/pipeline.py [--model models/faceage-default.pt] [--frames 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from faceage.inference.alignment import align_face
from faceage.inference.images import load_image
from faceage.inference.modelfile import DEFAULT_MODEL_PATH, load_model_file
from faceage.inference.pipeline import FaceFinder
from testkit.frames import group_photo, jpeg
from testkit.models import untrained_model_file

DATA = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def make_frame(width: int, height: int, faces: int) -> bytes:
    """A JPEG frame with ``faces`` faces about a quarter of the frame height tall."""
    return jpeg(group_photo((width, height), faces), quality=90)


def untrained_model() -> Path:
    return untrained_model_file(Path(tempfile.mkdtemp()) / "untrained.pt", "mobilenet_v2",
                                head_hidden=256, input_size=128)


def time_frame(jpeg: bytes, finder: FaceFinder, model) -> tuple[dict[str, float], int]:
    t0 = time.perf_counter()
    image = load_image(jpeg)
    t1 = time.perf_counter()
    faces = finder.detector.detect(image)
    t2 = time.perf_counter()
    crops = [align_face(image, f, finder.policy, finder.size) for f in faces]
    t3 = time.perf_counter()
    if crops:
        model.predict(crops)
    t4 = time.perf_counter()
    ms = {"decode": t1 - t0, "detect": t2 - t1, "align": t3 - t2, "regress": t4 - t3}
    return {k: v * 1000 for k, v in ms.items()}, len(faces)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model file (default: the shipped one, else an untrained "
                                   "MobileNetV2 at 128 px: same cost)")
    p.add_argument("--frames", type=int, default=20, help="timed frames per case (after 3 warm)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else (
        DEFAULT_MODEL_PATH if DEFAULT_MODEL_PATH.exists() else untrained_model())
    model = load_model_file(path)
    finder = FaceFinder.for_model(model.metadata)
    print(f"model {model.name} ({model.metadata['backbone']}, {model.input_size} px), torch "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"{args.frames} frames per case, median ms per frame")
    print("\nframe       faces  found  decode  detect  align  regress   total    fps")
    for (w, h) in ((640, 480), (1280, 720)):
        for n in (1, 5):
            jpeg = make_frame(w, h, n)
            rows = []
            for i in range(args.frames + 3):
                ms, found = time_frame(jpeg, finder, model)
                if i >= 3:
                    rows.append(ms)
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            total = statistics.median(sum(r.values()) for r in rows)
            print(f"{w}x{h:<5}  {n:>5}  {found:>5}  {med['decode']:6.1f}  {med['detect']:6.1f}  "
                  f"{med['align']:5.1f}  {med['regress']:7.1f}  {total:6.1f}  {1000 / total:5.1f}")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
