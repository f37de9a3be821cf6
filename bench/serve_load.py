"""Throughput, latency and memory of the Serve API against the in-process pipeline.

    uv run python bench/serve_load.py         # the shipped model, 3 rounds, 15 s per level
    uv run python bench/serve_load.py --rounds 5 --seconds 12 --clients 1 4 --paths predict stream
    uv run python bench/serve_load.py --model m.pt --seconds 20 --clients 1 4 16
    uv run python bench/serve_load.py --paths predict stream --soak 300   # + memory after a soak
    uv run python bench/serve_load.py --clients 1 --env-variant RAY_SERVE_THROUGHPUT_OPTIMIZED=0

Frames are 640x480 JPEGs with one face (tests/fixtures/astronaut.jpg, shifted a little per frame).
Each Serve run is serve/config.yaml on a private local Ray (``faceage.serving.local``, 2 CPUs by
default).
Paths: ``predict`` POSTs each frame to /predict (full detection, the photo profile), ``stream``
sends frames over one WebSocket per client to /stream (the live-stream profile; each socket
keeps ``--in-flight`` frames out, a row per value: 1 sends the next frame when the previous answer
is back, 2 is what the webcam page does), ``unbatched`` is /predict with AgeRegressor's
max_batch_size 1. ``--env-variant`` starts one more Serve instance per value with those
environment variables (Serve's switches are read when its processes start), ``--set-variant``
one with those serve/config.yaml overrides; their rows run in the same rounds. The in-process
rows are FacePipeline on the same bytes (decode, detect, align, age) in this process, with each
detection profile, run while the Serve application is up and idle. Every variant runs once per
round, in turn, ``--rounds`` times: the table has medians over the rounds and the ratios of each
Serve row to in-process are taken within each round (a busy minute on a shared machine slows the
variants beside each other).

``--soak S`` then runs 16 /predict clients (``--soak-clients``) for S seconds and reports each
replica's private memory (USS: pages no other process shares) and resident memory. Every level
is bounded in time. Without the shipped model, an untrained one with the default recipe's
architecture and input size is written to a temporary folder: the speed is the same, the ages
are not meaningful.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests

from faceage import DEFAULT_MODEL_PATH
from faceage.arguments import add_set_argument
from faceage.runtime import apply_ray_env_defaults
from faceage.serving.local_process import LocalServe
from faceage.webapp.client import ServeError, StreamClient
from faceage.yaml_settings import parse_override
from testkit.frames import webcam_jpegs
from testkit.models import untrained_model_file

REPO = Path(__file__).resolve().parents[1]


class Level:
    """One level's clock and tally: ``seconds`` measured after ``warmup``; the latency and stage
    timings of each good answer, and the errors, per client."""

    def __init__(self, clients: int, seconds: float, warmup: float):
        start = time.monotonic()
        self.clients, self.seconds = clients, seconds
        self.measure_from, self.deadline = start + warmup, start + warmup + seconds
        self.latencies: list[list[float]] = [[] for _ in range(clients)]
        self.stages: list[dict] = []
        self.errors = [0] * clients

    def record(self, index: int, sent: float, done: float, timings: dict | None) -> None:
        """Client ``index``'s answer to what it sent at ``sent``: the stage timings of a good
        answer (a dict of ms, maybe empty), or None for an error."""
        if timings is None:
            self.errors[index] += 1
        else:
            self.latencies[index].append(done - sent)
            self.stages.append({**timings, "client": (done - sent) * 1000})

    def row(self) -> dict:
        """Frames/s, p50/p95/p99 latency (ms) and the median of each stage."""
        lat = np.array([x for per in self.latencies for x in per])
        row = {"clients": self.clients, "ok": len(lat), "errors": sum(self.errors),
               "throughput": len(lat) / self.seconds,
               "stages": {k: float(np.median([s[k] for s in self.stages if k in s]))
                          for k in dict.fromkeys(k for s in self.stages for k in s)}}
        for q in (50, 95, 99):
            row[f"p{q}"] = float(np.percentile(lat, q) * 1000) if len(lat) else float("nan")
        return row


def run_level(call, frames: list[bytes], clients: int, seconds: float, warmup: float) -> dict:
    """``clients`` threads calling ``call(frame)`` back to back; latencies after ``warmup``.

    ``call`` returns the stage timings of a good answer (a dict of ms, maybe empty) or None;
    the row keeps their medians under ``stages``, with the client's own latency as ``client``.
    """
    level = Level(clients, seconds, warmup)

    def client(index: int) -> None:
        i = index
        while (now := time.monotonic()) < level.deadline:
            try:
                timings = call(frames[i % len(frames)])
            except Exception:
                timings = None
            if now >= level.measure_from:
                level.record(index, now, time.monotonic(), timings)
            i += clients

    if clients == 1:
        # In this thread: an in-process pipeline then runs where a program's would (the main
        # thread). From a second thread torch's OpenMP threads barely spin once the process
        # has more of them than CPUs, and the same pipeline is ~1.5x slower (docs/serve.md).
        client(0)
    else:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
    return level.row()


def run_stream_level(url: str, frames: list[bytes], clients: int, seconds: float,
                     warmup: float, in_flight: int) -> dict:
    """``clients`` /stream sockets, each keeping ``in_flight`` frames out: the next frame goes
    when an answer comes back (as the webcam page does). Latency: a frame's send to its answer."""
    level = Level(clients, seconds, warmup)

    def client(index: int) -> None:
        stream, out, i = StreamClient(url), deque(), index
        try:
            while True:
                while len(out) < in_flight and time.monotonic() < level.deadline:
                    stream.send(frames[i % len(frames)])
                    out.append(time.monotonic())
                    i += clients
                if not out:
                    return
                sent = out.popleft()
                try:
                    body = stream.receive(timeout=120)
                except ServeError:
                    body = None
                    if not stream.connected:  # closed: what was out is lost
                        if sent >= level.measure_from:
                            level.errors[index] += len(out)
                        out.clear()
                done = time.monotonic()
                if sent < level.measure_from or done > level.deadline:
                    continue
                level.record(index, sent, done, body["timings_ms"]
                             if body is not None and len(body["faces"]) == 1 else None)
        finally:
            stream.close()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return level.row()


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


def in_process_variants(model: Path, profiles: dict,
                        frame: bytes) -> list[tuple[str, int, object]]:
    """One 1-client variant per detection profile: FacePipeline on the frame bytes here, called
    once before (torch's first call sets up its kernels, as Serve's replicas do at start)."""
    from faceage.inference.images import load_image
    from faceage.inference.modelfile import load_model_file
    from faceage.inference.pipeline import FacePipeline, face_records

    loaded = load_model_file(model)
    variants = []
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

        call(frame)
        variants.append((f"in-process FacePipeline, {label}", 1,
                         lambda f, s, w, call=call: run_level(call, f, 1, s, w)))
    return variants


def serve_variants(url: str, paths: list[str], levels: list[int], in_flight: list[int],
                   suffix: str = "") -> list[tuple[str, int, object]]:
    """A variant per Serve path, client count (and, for /stream, frames in flight per socket):
    each ``level(frames, seconds, warmup)`` runs it once."""
    out = []
    for path in paths:
        for clients in levels:
            if path == "stream":
                for depth in in_flight:
                    label = f"{PATH_LABELS[path]}, {depth} in flight{suffix}"
                    out.append((label, clients, lambda f, s, w, url=url, d=depth, n=clients:
                                run_stream_level(url, f, n, s, w, d)))
            else:
                out.append((PATH_LABELS[path] + suffix, clients,
                            lambda f, s, w, url=url, n=clients:
                            run_level(http_call(url), f, n, s, w)))
    return out


def run_rounds(variants, frames, rounds: int, seconds: float, warmup: float,
               results: dict) -> None:
    """Every variant once per round, in order, ``rounds`` times: the variants see the same
    machine state (a busy minute slows all of them), and the ratios are taken per round."""
    for r in range(rounds):
        for label, clients, level in variants:
            row = level(frames, seconds, warmup)
            results.setdefault((label, clients), []).append(row)
            print(f"[bench] round {r + 1}/{rounds}, {label}: {clients} clients: "
                  f"{row['throughput']:.2f} frames/s, p50 {row['p50']:.0f} ms",
                  file=sys.stderr, flush=True)


def median_row(label: str, clients: int, rows: list[dict]) -> dict:
    """The median over rounds of each figure (and of each stage's median)."""
    keys = ("throughput", "p50", "p95", "p99")
    stages = {k: float(np.median([r["stages"][k] for r in rows if k in r["stages"]]))
              for k in dict.fromkeys(k for r in rows for k in r["stages"])}
    return {"path": label, "clients": clients, "rounds": len(rows),
            "ok": sum(r["ok"] for r in rows), "errors": sum(r["errors"] for r in rows),
            "stages": stages, "low": min(r["throughput"] for r in rows),
            "high": max(r["throughput"] for r in rows),
            **{k: float(np.median([r[k] for r in rows])) for k in keys}}


def ratio_table(results: dict) -> str:
    """Each Serve row against the in-process row of its detection profile, per round."""
    by_prefix = {"Serve /predict": "in-process FacePipeline, photo profile",
                 "Serve /stream": "in-process FacePipeline, stream profile"}
    reference = {label: next((ref for prefix, ref in by_prefix.items()
                              if label.startswith(prefix)), "")
                 for label, _ in results}
    head = ("| path | clients | frames/s ÷ in-process, median [min–max] | p50 minus in-process "
            "p50, median ms |\n|---|---:|---:|---:|")
    lines = []
    for (label, clients), rows in results.items():
        base = results.get((reference.get(label, ""), 1))
        if not base:
            continue
        pairs = [(a, b) for a, b in zip(rows, base, strict=False) if b["throughput"] > 0]
        if not pairs:
            continue
        ratios = [a["throughput"] / b["throughput"] for a, b in pairs]
        gaps = [a["p50"] - b["p50"] for a, b in pairs]
        lines.append(f"| {label} | {clients} | {np.median(ratios):.2f}x "
                     f"[{min(ratios):.2f}–{max(ratios):.2f}] | {np.median(gaps):+.0f} |")
    return "\n".join([head, *lines])


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
    head = ("| path | clients | rounds | frames/s (median) | [min–max] | p50 ms | p95 ms | "
            "p99 ms | frames | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['path']} | {r['clients']} | {r['rounds']} | {r['throughput']:.2f} | "
             f"{r['low']:.2f}–{r['high']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} | "
             f"{r['p99']:.0f} | {r['ok']} | {r['errors']} |" for r in rows]
    return "\n".join([head, *lines])


def as_overrides(items) -> dict:
    """``KEY=VALUE`` items (``--set``'s syntax) as ``{"dotted.key": value}``, for LocalServe."""
    return {".".join(keys): value for keys, value in map(parse_override, items)}


def key_values(parser: argparse.ArgumentParser, flag: str, spec: str) -> list[list[str]]:
    """``A=1,B=2`` as ``[["A", "1"], ["B", "2"]]``; a malformed one stops with a usage error."""
    pairs = [item.split("=", 1) for item in spec.split(",") if item]
    if not pairs or any(len(pair) != 2 or not pair[0] for pair in pairs):
        parser.error(f"{flag} {spec!r}: give KEY=VALUE pairs separated by commas")
    return pairs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model file (default: the shipped model, else an untrained "
                                    "one of the same architecture)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--paths", nargs="+", default=["predict", "stream"],
                   choices=["predict", "stream", "unbatched"])
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--rounds", type=int, default=3,
                   help="every variant once per round, interleaved; medians and per-round "
                        "ratios over the rounds")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per level")
    p.add_argument("--num-cpus", type=float, default=2, help="CPUs of the private Ray instance")
    p.add_argument("--soak", type=float, default=0.0,
                   help="then this many seconds of --soak-clients on /predict, and memory")
    p.add_argument("--soak-clients", type=int, default=16)
    add_set_argument(p, help="serve/config.yaml override, as for faceage.serving.local "
                              "(repeatable)")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process rows")
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 2],
                   help="/stream: frames each socket keeps out (1: the next frame when the "
                        "answer is back; the webcam page keeps 2)")
    p.add_argument("--env-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also run the Serve rows on a second Serve instance started with these "
                        "environment variables (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=0), in the "
                        "same rounds; repeatable")
    p.add_argument("--set-variant", action="append", default=[],
                   metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also run the Serve rows on another Serve instance with these "
                        "serve/config.yaml overrides on top of --set, in the same rounds; "
                        "repeatable")
    args = p.parse_args()
    # Each other instance: (label, its environment, its serve/config.yaml overrides).
    instances = [(spec, dict(key_values(p, "--env-variant", spec)), {})
                 for spec in args.env_variant]
    instances += [(spec, {}, as_overrides("=".join(pair)
                                          for pair in key_values(p, "--set-variant", spec)))
                  for spec in args.set_variant]
    apply_ray_env_defaults()
    from faceage.serving.app import ServeArgs

    overrides = as_overrides(args.overrides)
    serve_args = ServeArgs()
    profiles = {"photo profile": serve_args.detector,
                "stream profile": serve_args.stream_detector}

    with tempfile.TemporaryDirectory(prefix="faceage-bench-") as tmp:
        if args.model:
            model = Path(args.model)
        elif DEFAULT_MODEL_PATH.exists():
            model = DEFAULT_MODEL_PATH
        else:
            model = untrained_model_file(Path(tmp) / "untrained-default.pt",
                                         name="untrained-default-architecture")
            print(f"[bench] {DEFAULT_MODEL_PATH} is missing: timing an untrained model of the "
                  "default architecture", file=sys.stderr)
        frames = webcam_jpegs()
        load_before = os.getloadavg()
        started = time.time()
        results: dict = {}
        memory: list = []
        inproc = [] if args.no_inprocess else in_process_variants(model, profiles, frames[0])
        batched = [p for p in args.paths if p != "unbatched"]
        config = {"args.model_path": str(model), **overrides}
        if batched or inproc:
            with contextlib.ExitStack() as stack:
                service = (stack.enter_context(LocalServe(config, num_cpus=args.num_cpus,
                                                          timeout=900)) if batched else None)
                # The in-process variants run while Serve is up and idle, in the same rounds;
                # so do the other instances' (--env-variant, --set-variant): each idles while
                # another runs.
                variants = inproc + (serve_variants(service.url, batched, args.clients,
                                                    args.in_flight) if batched else [])
                for label, env, more in instances if batched else []:
                    other = stack.enter_context(LocalServe({**config, **more},
                                                           num_cpus=args.num_cpus,
                                                           timeout=900, env=env))
                    variants += serve_variants(other.url, batched, args.clients, args.in_flight,
                                               f" [{label}]")
                run_rounds(variants, frames, args.rounds, args.seconds, args.warmup, results)
                if args.soak and batched:
                    print(f"[bench] soak: {args.soak_clients} clients on /predict for "
                          f"{args.soak:.0f} s ...", file=sys.stderr, flush=True)
                    row = run_level(http_call(service.url), frames, args.soak_clients,
                                    args.soak, 0.0)
                    results[(f"Serve /predict, {args.soak:.0f} s soak", args.soak_clients)] = [row]
                    memory = replica_memory(service)
        if "unbatched" in args.paths:  # another configuration: its own instance and rounds
            config["deployments.AgeRegressor.user_config"] = {"max_batch_size": 1,
                                                             "batch_wait_timeout_s": 0.0}
            with LocalServe(config, num_cpus=args.num_cpus, timeout=900) as service:
                run_rounds(serve_variants(service.url, ["unbatched"], args.clients,
                                          args.in_flight), frames,
                           args.rounds, args.seconds, args.warmup, results)
        load_after = os.getloadavg()

    rows = [median_row(label, clients, r) for (label, clients), r in results.items()]
    print(f"\n640x480 JPEG frames, one face each; model {model.name}; {args.rounds} round(s) of "
          f"every variant in turn, each {args.seconds:.0f} s measured after {args.warmup:.0f} s "
          f"warm-up; Ray with {args.num_cpus:g} CPUs; {os.cpu_count()} cores "
          f"({platform.processor() or platform.machine()}); load average {load_before[0]:.1f} "
          f"before, {load_after[0]:.1f} after; {time.time() - started:.0f} s in all"
          + (f"; overrides {overrides}" if overrides else "") + "\n")
    print(table(rows))
    if inproc and batched:
        print("\nRatios within each round (Serve /predict against in-process with the photo "
              "profile, /stream against the stream profile):\n")
        print(ratio_table(results))
    print("\nOne client, medians over rounds of each round's median, in ms (HTTP + proxy: the "
          "client's round trip less the Ingress's total; Detector hop: its call less decode and "
          "detect; age call: the AgeRegressor call with its hops):\n")
    print(breakdown_table(rows))
    if memory:
        print(f"\nMemory after {args.soak:.0f} s of {args.soak_clients} clients on /predict:\n")
        print(memory_table(memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
