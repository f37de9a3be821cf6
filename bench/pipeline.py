"""Where the time of one frame goes: decode, detection, alignment, regression (ms per frame).

Frames are the public-domain rocket photo as background with 1 or 5 copies of the astronaut's
face (tests/data), JPEG-encoded; each frame is decoded from bytes as Serve would.

    uv run python bench/pipeline.py [--model models/faceage-default.pt] [--frames 20]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from faceage.inference.alignment import align_face
from faceage.inference.images import load_image
from faceage.inference.modelfile import DEFAULT_MODEL_PATH, load_model_file
from faceage.inference.pipeline import FaceFinder

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def make_frame(width: int, height: int, faces: int) -> bytes:
    """A JPEG frame with ``faces`` faces about a quarter of the frame height tall."""
    scene = Image.open(DATA / "rocket.jpg").convert("RGB").resize((width, height))
    face = Image.open(DATA / "astronaut.jpg").convert("RGB").crop((150, 30, 300, 210))
    side = height // 4
    face = face.resize((side * 150 // 180, side))
    spots = [(0.5, 0.5), (0.15, 0.25), (0.85, 0.25), (0.2, 0.75), (0.8, 0.75)][:faces]
    for fx, fy in spots:
        scene.paste(face, (int(fx * width - face.width / 2), int(fy * height - face.height / 2)))
    buf = io.BytesIO()
    scene.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def untrained_model_file() -> Path:
    from faceage.inference.modelfile import save_model_file
    from faceage.inference.preprocess import preprocessing_metadata
    from faceage.models.network import build_model

    path = Path(tempfile.mkdtemp()) / "untrained.pt"
    return save_model_file(build_model("mobilenet_v2", "none", 256, 0.0), path, {
        "preprocessing": preprocessing_metadata(128), "crop_policy": {"name": "utkface-chip"}})


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
        DEFAULT_MODEL_PATH if DEFAULT_MODEL_PATH.exists() else untrained_model_file())
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
