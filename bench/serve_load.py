"""Throughput, latency and memory of the Serve API against the in-process pipeline.

    uv run python bench/serve_load.py                     # the shipped model, 15 s per level
    uv run python bench/serve_load.py --model m.pt --seconds 20 --clients 1 4 16
    uv run python bench/serve_load.py --paths predict stream --soak 300   # + memory after a soak

Frames are 640x480 JPEGs with one face (tests/data/astronaut.jpg, shifted a little per frame).
Each Serve run is serve/config.yaml on a private local Ray (``faceage.serving.local``, 2 CPUs by
default).
Paths: ``predict`` POSTs each frame to /predict (full detection, the photo profile), ``stream``
sends frames over one WebSocket per client to /stream (the live-stream profile; a client sends
the next frame when the previous answer is back, as the webcam page does), ``unbatched`` is
/predict with AgeRegressor's max_batch_size 1. The in-process rows are FacePipeline on the same
bytes (decode, detect, align, age) in this process, with each detection profile.

``--soak S`` then runs 16 /predict clients (``--soak-clients``) for S seconds and reports each
replica's private memory (USS: pages no other process shares) and resident memory. Every level
is bounded in time. Without the shipped model, an untrained one with the default recipe's
architecture and input size is written to a temporary folder: the speed is the same, the ages
are not meaningful.
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
import psutil
import requests
from PIL import Image

from faceage import DEFAULT_MODEL_PATH
from faceage.config import add_set_argument, parse_override
from faceage.runtime import apply_ray_env_defaults
from faceage.serving.local import LocalServe
from faceage.webapp.client import StreamClient

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
    from faceage.inference.modelfile import save_model_file
    from faceage.inference.preprocess import preprocessing_metadata
    from faceage.models.network import build_model

    m = Config().model
    net = build_model(m.backbone, "none", m.head_hidden, m.dropout)
    return save_model_file(net, folder / "untrained-default.pt", {
        "name": "untrained-default-architecture",
        "preprocessing": preprocessing_metadata(m.input_size),
        "crop_policy": {"name": "utkface-chip"},
    })


def run_level(call, frames: list[bytes], clients: int, seconds: float, warmup: float) -> dict:
    """``clients`` threads calling ``call(frame)`` back to back; latencies after ``warmup``.

    ``call`` returns the stage timings of a good answer (a dict of ms, maybe empty) or None;
    the row keeps their medians under ``stages``, with the client's own latency as ``client``.
    """
    start = time.monotonic()
    measure_from, deadline = start + warmup, start + warmup + seconds
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stages: list[dict] = []
    errors = [0] * clients

    def client(index: int) -> None:
        i = index
        while (now := time.monotonic()) < deadline:
            try:
                timings = call(frames[i % len(frames)])
            except Exception:
                timings = None
            done = time.monotonic()
            if now >= measure_from:
                if timings is not None:
                    latencies[index].append(done - now)
                    stages.append({**timings, "client": (done - now) * 1000})
                else:
                    errors[index] += 1
            i += clients

    if clients == 1:
        # In this thread: an in-process pipeline then runs where a program's would (the main
        # thread). From a second thread torch's OpenMP threads barely spin once the process
        # has more of them than CPUs, and the same pipeline is ~1.5x slower (docs/serve.md).
        client(0)
    else:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
    lat = np.array([x for per in latencies for x in per])
    row = {"clients": clients, "ok": len(lat), "errors": sum(errors),
           "throughput": len(lat) / seconds,
           "stages": {k: float(np.median([s[k] for s in stages if k in s]))
                      for k in dict.fromkeys(k for s in stages for k in s)}}
    for q in (50, 95, 99):
        row[f"p{q}"] = float(np.percentile(lat, q) * 1000) if len(lat) else float("nan")
    return row


PATH_LABELS = {"predict": "Serve /predict", "stream": "Serve /stream",
               "unbatched": "Serve /predict, batching off"}
DEPLOYMENTS = ("Ingress", "Detector", "AgeRegressor")


def http_call(url: str):
    local = threading.local()

    def call(frame: bytes) -> bool:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = local.session.post(url + "/predict", data=frame, timeout=120,
                               headers={"Content-Type": "image/jpeg"})
        body = r.json() if r.status_code == 200 else {}
        return body["timings_ms"] if len(body.get("faces", [])) == 1 else None

    return call


def stream_call(url: str, clients: list):
    local = threading.local()

    def call(frame: bytes) -> bool:
        if not hasattr(local, "client"):
            local.client = StreamClient(url)
            clients.append(local.client)
        body = local.client.predict(frame, timeout=120)
        return body["timings_ms"] if len(body["faces"]) == 1 else None

    return call


def replica_memory(service: LocalServe) -> list[dict]:
    """Private (USS) and resident memory of every replica and of Ray's own processes."""
    from faceage.runtime import process_tree

    names = {p.pid: d for d in DEPLOYMENTS for p in service.replica_processes(d)}
    rows = []
    for proc in process_tree(service.pid)[1:]:
        try:
            title = " ".join(proc.cmdline())
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        name = names.get(proc.pid)
        if name is None:
            if "ServeController" in title:
                name = "Serve controller"
            elif "ProxyActor" in title:
                name = "Serve HTTP proxy"
            elif title.startswith("ray::") or "ray" in proc.name():
                name = "Ray (raylet, GCS, dashboard, idle workers)"
            else:
                name = f"other ({proc.name()})"
        rows.append({"process": name, "pid": proc.pid, "uss": info.uss / 2**20,
                     "rss": info.rss / 2**20})
    order = {d: i for i, d in enumerate(DEPLOYMENTS)}
    return sorted(rows, key=lambda r: (order.get(r["process"], 9), r["process"], r["pid"]))


def serve_rows(model: Path, paths: list[str], frames, levels, seconds, warmup, num_cpus,
               soak: float, soak_clients: int, overrides: dict) -> tuple[list, list]:
    """Rows per path and level, and (after ``soak`` seconds at ``soak_clients``) memory rows."""
    rows, memory = [], []
    batched = [p for p in paths if p != "unbatched"]
    runs = ([(batched, {})] if batched else []) + ([(["unbatched"], {
        "deployments.AgeRegressor.user_config": {"max_batch_size": 1,
                                                 "batch_wait_timeout_s": 0.0}})]
        if "unbatched" in paths else [])
    for run_paths, extra in runs:
        config = {"args.model_path": str(model), **overrides, **extra}
        print(f"[bench] starting serve/config.yaml for {run_paths} ...", file=sys.stderr,
              flush=True)
        with LocalServe(config, num_cpus=num_cpus, timeout=900) as service:
            for path in run_paths:
                label = PATH_LABELS[path]
                for clients in levels:
                    opened: list = []
                    call = (stream_call(service.url, opened) if path == "stream"
                            else http_call(service.url))
                    try:
                        row = run_level(call, frames, clients, seconds, warmup)
                    finally:
                        for client in opened:
                            client.close()
                    rows.append({"path": label, **row})
                    print(f"[bench] {label}: {clients} clients: {row['throughput']:.2f} "
                          f"frames/s, p50 {row['p50']:.0f} ms", file=sys.stderr, flush=True)
            if soak and run_paths is batched:
                print(f"[bench] soak: {soak_clients} clients on /predict for {soak:.0f} s ...",
                      file=sys.stderr, flush=True)
                row = run_level(http_call(service.url), frames, soak_clients, soak, 0.0)
                rows.append({"path": f"Serve /predict, {soak:.0f} s soak", **row})
                memory = replica_memory(service)
    return rows, memory


def in_process_rows(model: Path, frames, seconds, warmup, profiles: dict) -> list:
    from faceage.inference.images import load_image
    from faceage.inference.modelfile import load_model_file
    from faceage.inference.pipeline import FacePipeline, face_records

    loaded = load_model_file(model)
    rows = []
    for label, detector in profiles.items():
        pipeline = FacePipeline(loaded, detector=detector)

        def call(frame: bytes, pipeline=pipeline) -> dict | None:
            start = time.perf_counter()
            image = load_image(frame)
            decoded = time.perf_counter()
            faces = pipeline.find_faces(image)
            found = time.perf_counter()
            [ages] = loaded.predict_groups([[f.crop for f in faces]], coverage=pipeline.coverage)
            face_records(faces, ages)
            done = time.perf_counter()
            return ({"decode": (decoded - start) * 1000, "detect": (found - decoded) * 1000,
                     "age": (done - found) * 1000, "total": (done - start) * 1000}
                    if len(faces) == 1 else None)

        row = run_level(call, frames, 1, seconds, warmup)
        print(f"[bench] in-process, {label}: {row['throughput']:.2f} frames/s, p50 "
              f"{row['p50']:.0f} ms", file=sys.stderr, flush=True)
        rows.append({"path": f"in-process FacePipeline, {label}", **row})
    return rows


def breakdown_table(rows: list[dict]) -> str:
    """Where one client's frame time goes (medians, ms): the 1-client rows."""
    head = ("| path | client round trip | HTTP + proxy | decode | detect | Detector hop | "
            "age call | Ingress total |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = []
    for r in rows:
        s = r["stages"]
        if r["clients"] != 1 or not s:
            continue
        serve = "detect_call" in s

        def cell(value: float | None) -> str:
            return "–" if value is None else f"{value:.1f}"

        lines.append(" | ".join([
            f"| {r['path']}", cell(s["client"]),
            cell(s["client"] - s["total"] if serve else None), cell(s["decode"]),
            cell(s["detect"]),
            cell(s["detect_call"] - s["decode"] - s["detect"] if serve else None),
            cell(s["age"]), cell(s["total"] if serve else None)]) + " |")
    return "\n".join([head, *lines])


def memory_table(rows: list[dict]) -> str:
    head = ("| process | pid | private (USS) MB | resident (RSS) MB |\n"
            "|---|---:|---:|---:|")
    lines = [f"| {r['process']} | {r['pid']} | {r['uss']:.0f} | {r['rss']:.0f} |" for r in rows]
    replicas = [r for r in rows if r["process"] in DEPLOYMENTS]
    lines.append(f"| **replicas together** | | **{sum(r['uss'] for r in replicas):.0f}** | "
                 f"{sum(r['rss'] for r in replicas):.0f} |")
    lines.append(f"| everything Ray started | | {sum(r['uss'] for r in rows):.0f} | "
                 f"{sum(r['rss'] for r in rows):.0f} |")
    return "\n".join([head, *lines])


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
    p.add_argument("--paths", nargs="+", default=["predict", "stream"],
                   choices=["predict", "stream", "unbatched"])
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per level")
    p.add_argument("--num-cpus", type=float, default=2, help="CPUs of the private Ray instance")
    p.add_argument("--soak", type=float, default=0.0,
                   help="then this many seconds of --soak-clients on /predict, and memory")
    p.add_argument("--soak-clients", type=int, default=16)
    add_set_argument(p, help="serve/config.yaml override, as for faceage.serving.local "
                              "(repeatable)")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process rows")
    args = p.parse_args()
    apply_ray_env_defaults()
    from faceage.serving.app import ServeArgs

    overrides = {".".join(keys): value for keys, value in map(parse_override, args.overrides)}
    serve_args = ServeArgs()
    profiles = {"photo profile": serve_args.detector,
                "stream profile": serve_args.stream_detector}

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
        if not args.no_inprocess:
            rows += in_process_rows(model, frames, args.seconds, args.warmup, profiles)
        serve, memory = serve_rows(model, args.paths, frames, args.clients, args.seconds,
                                   args.warmup, args.num_cpus, args.soak, args.soak_clients,
                                   overrides)
        rows += serve
        load_after = os.getloadavg()

    print(f"\n640x480 JPEG frames, one face each; model {model.name}; {args.seconds:.0f} s "
          f"measured per level after {args.warmup:.0f} s warm-up; Ray with {args.num_cpus:g} "
          f"CPUs; {os.cpu_count()} cores ({platform.processor() or platform.machine()}); load "
          f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"{time.time() - started:.0f} s in all"
          + (f"; overrides {overrides}" if overrides else "") + "\n")
    print(table(rows))
    print("\nOne client, medians in ms (HTTP + proxy: the client's round trip less the Ingress's "
          "total; Detector hop: its call less decode and detect; age call: the AgeRegressor "
          "call with its hops):\n")
    print(breakdown_table(rows))
    if memory:
        print(f"\nMemory after {args.soak:.0f} s of {args.soak_clients} clients on /predict:\n")
        print(memory_table(memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
