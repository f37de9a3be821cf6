"""Throughput and latency of the Serve API against the in-process pipeline, batching on and off.

    uv run python bench/serve_load.py                     # the shipped model, 15 s per level
    uv run python bench/serve_load.py --model m.pt --seconds 20 --clients 1 4 16

Frames are 640x480 JPEGs with one face (tests/data/astronaut.jpg, shifted a little per frame).
Each Serve run is serve/config.yaml on a private local Ray (``serve.local``, 2 CPUs by default);
"batching off" sets AgeRegressor's max_batch_size to 1. The in-process row is FacePipeline on
the same bytes (decode, detect, align, age) in this process. Every level is bounded in time.
Without the shipped model, an untrained one with the default recipe's architecture and input
size is written to a temporary folder: the speed is the same, the ages are not meaningful.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from faceage.modelfile import DEFAULT_MODEL_PATH
from faceage.runtime import apply_ray_env_defaults
from serve.local import LocalServe  # the project root is on sys.path (uv's editable install)

REPO = Path(__file__).resolve().parents[1]


def make_frames(count: int = 8) -> list[bytes]:
    """640x480 JPEG frames, one face each, the face shifted 10 px per frame."""
    face = np.asarray(Image.open(REPO / "tests/data/astronaut.jpg").convert("RGB")
                      .resize((400, 400)))
    frames = []
    for i in range(count):
        canvas = np.full((480, 640, 3), 90, np.uint8)
        canvas[40:440, 60 + 10 * i:460 + 10 * i] = face
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format="JPEG", quality=85)
        frames.append(buf.getvalue())
    return frames


def untrained_default_model(folder: Path) -> Path:
    """An untrained model file with the default recipe's backbone, head and input size."""
    from faceage.config import Config
    from faceage.modelfile import save_model_file
    from faceage.models import build_model
    from faceage.preprocess import preprocessing_metadata

    m = Config().model
    net = build_model(m.backbone, "none", m.head_hidden, m.dropout)
    return save_model_file(net, folder / "untrained-default.pt", {
        "name": "untrained-default-architecture",
        "preprocessing": preprocessing_metadata(m.input_size),
        "crop_policy": {"name": "utkface-chip"},
    })


def run_level(call, frames: list[bytes], clients: int, seconds: float, warmup: float) -> dict:
    """``clients`` threads calling ``call(frame)`` back to back; latencies after ``warmup``."""
    start = time.monotonic()
    measure_from, deadline = start + warmup, start + warmup + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def client(index: int) -> None:
        i = index
        while (now := time.monotonic()) < deadline:
            try:
                ok = call(frames[i % len(frames)])
            except Exception:
                ok = False
            done = time.monotonic()
            if now >= measure_from:
                if ok:
                    latencies[index].append(done - now)
                else:
                    errors[index] += 1
            i += clients

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    lat = np.array([x for per in latencies for x in per])
    row = {"clients": clients, "ok": len(lat), "errors": sum(errors),
           "throughput": len(lat) / seconds}
    for q in (50, 95, 99):
        row[f"p{q}"] = float(np.percentile(lat, q) * 1000) if len(lat) else float("nan")
    return row


def serve_rows(model: Path, batching: bool, frames, levels, seconds, warmup, num_cpus) -> list:
    overrides = {"args.model_path": str(model)}
    if not batching:
        overrides["deployments.AgeRegressor.user_config"] = {"max_batch_size": 1,
                                                             "batch_wait_timeout_s": 0.0}
    label = "Serve, batching on" if batching else "Serve, batching off"
    print(f"[bench] starting serve/config.yaml ({label}) ...", file=sys.stderr, flush=True)
    rows = []
    with LocalServe(overrides, num_cpus=num_cpus, timeout=900) as service:
        local = threading.local()

        def call(frame: bytes) -> bool:
            if not hasattr(local, "session"):
                local.session = requests.Session()
            r = local.session.post(service.url + "/predict", data=frame, timeout=120,
                                   headers={"Content-Type": "image/jpeg"})
            return r.status_code == 200 and len(r.json()["faces"]) == 1

        for clients in levels:
            row = run_level(call, frames, clients, seconds, warmup)
            rows.append({"path": label, **row})
            print(f"[bench] {label}: {clients} clients: {row['throughput']:.2f} frames/s",
                  file=sys.stderr, flush=True)
    return rows


def in_process_rows(model: Path, frames, seconds, warmup) -> list:
    from faceage.modelfile import load_model_file
    from faceage.vision import FacePipeline, load_image

    pipeline = FacePipeline(load_model_file(model))

    def call(frame: bytes) -> bool:
        return len(pipeline.predict(load_image(frame))) == 1

    row = run_level(call, frames, 1, seconds, warmup)
    print(f"[bench] in-process: {row['throughput']:.2f} frames/s", file=sys.stderr, flush=True)
    return [{"path": "in-process FacePipeline", **row}]


def table(rows: list[dict]) -> str:
    head = ("| path | clients | frames/s | p50 ms | p95 ms | p99 ms | frames | errors |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['path']} | {r['clients']} | {r['throughput']:.2f} | {r['p50']:.0f} | "
             f"{r['p95']:.0f} | {r['p99']:.0f} | {r['ok']} | {r['errors']} |" for r in rows]
    return "\n".join([head, *lines])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model file (default: the shipped model, else an untrained "
                                    "one of the same architecture)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per level")
    p.add_argument("--num-cpus", type=float, default=2, help="CPUs of the private Ray instance")
    p.add_argument("--skip", nargs="*", default=[], choices=["batched", "unbatched", "inprocess"])
    args = p.parse_args()
    apply_ray_env_defaults()

    with tempfile.TemporaryDirectory(prefix="faceage-bench-") as tmp:
        if args.model:
            model = Path(args.model)
        elif DEFAULT_MODEL_PATH.exists():
            model = DEFAULT_MODEL_PATH
        else:
            model = untrained_default_model(Path(tmp))
            print(f"[bench] {DEFAULT_MODEL_PATH} is missing: timing an untrained model of the "
                  "default architecture", file=sys.stderr)
        frames = make_frames()
        load_before = os.getloadavg()
        started = time.time()
        rows: list[dict] = []
        if "inprocess" not in args.skip:
            rows += in_process_rows(model, frames, args.seconds, args.warmup)
        if "batched" not in args.skip:
            rows += serve_rows(model, True, frames, args.clients, args.seconds, args.warmup,
                               args.num_cpus)
        if "unbatched" not in args.skip:
            rows += serve_rows(model, False, frames, args.clients, args.seconds, args.warmup,
                               args.num_cpus)
        load_after = os.getloadavg()

    print(f"\n640x480 JPEG frames, one face each; model {model.name}; {args.seconds:.0f} s "
          f"measured per level after {args.warmup:.0f} s warm-up; Ray with {args.num_cpus:g} "
          f"CPUs; {os.cpu_count()} cores ({platform.processor() or platform.machine()}); load "
          f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"{time.time() - started:.0f} s in all\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
