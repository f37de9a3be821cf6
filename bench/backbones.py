"""What each start of the backbone study costs on this CPU: ms per face, file size, parameters.

    uv run python bench/backbones.py                 # 5 rounds, the study's six trials
    uv run python bench/backbones.py --rounds 9 --threads 1 2

The age network alone (no detection), as the Serve AgeRegressor runs it: a model file loaded
with ``load_model_file`` and ``AgeModel.predict`` on face crops, torch on ``--threads`` threads
(Serve's replicas use one), batch 1 and batch 8, plain and with the mirror average. Untrained
weights cost what trained ones do. Variants are interleaved in every round (their order
rotates), and each cell is the median over rounds of the mean ms per face of that round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from faceage.inference.modelfile import load_model_file
from testkit.models import untrained_model_file

# The trials of configs/tune-backbones.yaml: (backbone, input size).
TRIALS = [("mobilenet_v2", 128), ("mobilenet_v2", 160), ("efficientnet_lite0", 128),
          ("efficientnet_lite0", 160), ("dlib_age_resnet", 64), ("dlib_age_resnet", 96)]


def time_per_face(model, crops: list[np.ndarray], batch: int, tta: bool, calls: int) -> float:
    faces = crops[:batch]
    model.predict(faces, tta=tta, batch_size=batch)  # warm: oneDNN picks its kernels
    start = time.perf_counter()
    for _ in range(calls):
        model.predict(faces, tta=tta, batch_size=batch)
    return (time.perf_counter() - start) * 1000 / (calls * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--calls", type=int, default=20, help="calls per variant per round")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (200, 200, 3), dtype=np.uint8) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        models, sizes, params = {}, {}, {}
        for backbone, size in TRIALS:
            path = untrained_model_file(Path(tmp) / f"{backbone}-{size}.pt", backbone,
                                        input_size=size)
            models[(backbone, size)] = load_model_file(path)
            sizes[(backbone, size)] = path.stat().st_size / 1e6
            params[(backbone, size)] = sum(p.numel() for p in
                                           models[(backbone, size)].net.parameters()) / 1e6
        variants = [(key, t, b, tta) for key in models for t in args.threads for b in (1, 8)
                    for tta in (False, True)]
        results: dict[tuple, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for key, threads, batch, tta in order:
                torch.set_num_threads(threads)
                results[(key, threads, batch, tta)].append(
                    time_per_face(models[key], crops, batch, tta, args.calls))
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    for threads in args.threads:
        print(f"\n{threads} torch thread(s), ms per face, median of {args.rounds} rounds "
              f"(min-max)\n")
        print("| backbone | input | batch 1 | batch 8 | batch 1, mirror average "
              "| batch 8, mirror average | file MB | parameters (M) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for key in models:
            cells = []
            for tta in (False, True):
                for batch in (1, 8):
                    v = results[(key, threads, batch, tta)]
                    cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
            print(f"| {key[0]} | {key[1]} | " + " | ".join(cells)
                  + f" | {sizes[key]:.1f} | {params[key]:.2f} |")


if __name__ == "__main__":
    main()
