"""Phone photos on /predict: a 12 MP JPEG, a 48 MP JPEG and a 12 MP HEIC against a 640x480
photo of the same scene, through the Serve `faceage up` runs.

    uv run python bench/phone_photos.py                     # 5 rounds of 8 requests per photo
    uv run python bench/phone_photos.py --rounds 7 --requests 12 --model m.pt

One client sends each photo ``--requests`` times in a row; the photos take turns within each
round (a busy minute on a shared machine slows them alike), and each photo's p50 is divided by
the 640x480 photo's p50 of the same round. The table has the medians over rounds, the min-max of
the ratio, and the Detector's decode and detect times (from ``timings_ms``). Then four clients
send a 16 MiB photo (the body limit) at once, twice, and the Ingress replica's resident memory
is read before, at its peak and after. The photos are testkit/photos.py's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from faceage import DEFAULT_MODEL_PATH
from faceage.runtime import apply_ray_env_defaults
from faceage.serving.local_process import LocalServe
from testkit.photos import phone_heic, phone_jpeg, small_jpeg

MAX_BODY = 16 * 1024 * 1024


def post(url: str, data: bytes) -> dict:
    r = requests.post(url + "/predict", data=data, timeout=120,
                      headers={"Content-Type": "application/octet-stream"})
    r.raise_for_status()
    return r.json()


def one_round(url: str, photos: dict[str, bytes], requests_per_photo: int) -> dict[str, dict]:
    out = {}
    for name, data in photos.items():
        seconds, decode, detect = [], [], []
        for _ in range(requests_per_photo):
            start = time.perf_counter()
            body = post(url, data)
            seconds.append(time.perf_counter() - start)
            assert len(body["faces"]) == 1, (name, body["faces"])
            decode.append(body["timings_ms"]["decode"])
            detect.append(body["timings_ms"]["detect"])
        out[name] = {"p50": statistics.median(seconds) * 1000,
                     "decode": statistics.median(decode), "detect": statistics.median(detect)}
    return out


def ingress_memory(service: LocalServe, url: str, photo: bytes) -> tuple[float, float, float]:
    """The Ingress's RSS (MiB) before, at the peak of, and after 2 x 4 concurrent uploads."""
    [ingress] = service.replica_processes("Ingress")
    before = peak = ingress.memory_info().rss
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, ingress.memory_info().rss)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            list(pool.map(lambda _: post(url, photo), range(4)))
    done.set()
    watcher.join()
    after = ingress.memory_info().rss
    return before / 2**20, peak / 2**20, after / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=8, help="per photo per round")
    args = parser.parse_args()
    apply_ray_env_defaults()

    print("making the photos ...", flush=True)
    twelve = phone_jpeg(12)
    photos = {"640x480 JPEG": small_jpeg(), "12 MP JPEG q95": twelve,
              "48 MP JPEG q85": phone_jpeg(48), "12 MP HEIC": phone_heic(preset="medium")}
    at_limit = twelve + b"\0" * (MAX_BODY - len(twelve))
    rounds: list[dict[str, dict]] = []
    with LocalServe({"args.model_path": args.model}, num_cpus=2, timeout=900) as service:
        url = service.url
        one_round(url, photos, 2)  # warm-up
        for i in range(args.rounds):
            rounds.append(one_round(url, photos, args.requests))
            print(f"round {i + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['p50']:.0f} ms" for k, v in rounds[-1].items()), flush=True)
        memory = ingress_memory(service, url, at_limit)

    print(f"\n{platform.processor() or platform.machine()}, {args.rounds} rounds x "
          f"{args.requests} requests per photo, one client, RAY_SERVE_THROUGHPUT_OPTIMIZED=1\n")
    print("| photo | size | p50 | ÷ 640x480 (min-max) | decode | detect |")
    print("|---|---:|---:|---:|---:|---:|")
    base = "640x480 JPEG"
    for name, data in photos.items():
        p50 = statistics.median(r[name]["p50"] for r in rounds)
        ratios = [r[name]["p50"] / r[base]["p50"] for r in rounds]
        decode = statistics.median(r[name]["decode"] for r in rounds)
        detect = statistics.median(r[name]["detect"] for r in rounds)
        print(f"| {name} | {len(data) / 1e6:.1f} MB | {p50:.0f} ms | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{decode:.0f} ms | {detect:.0f} ms |")
    before, peak, after = memory
    print(f"\nIngress RSS, 2 x 4 concurrent 16 MiB uploads: {before:.0f} MiB before, "
          f"{peak:.0f} MiB at peak, {after:.0f} MiB after")


if __name__ == "__main__":
    main()
