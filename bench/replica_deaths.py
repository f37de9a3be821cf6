"""What clients see when a Serve replica dies under load, and what a second Ingress or a client
retry changes.

    uv run python bench/replica_deaths.py      # kill the Ingress, with 1 and with 2 replicas
    uv run python bench/replica_deaths.py --kill AgeRegressor Detector --ingress-replicas 1

For each Ingress replica count, serve/config.yaml starts on a private local Ray (2 CPUs by
default); ``--clients`` threads POST 640x480 frames to /predict back to back; once answers flow,
one replica of each ``--kill`` deployment is SIGKILLed (in the order given, half a second apart);
the load goes on until Serve has replaced them and ``--after`` more seconds have passed (bounded
by ``--timeout``). Each client retries a request once when the first answer is a 500 or no answer
(``retry_once`` below, what a client could do); the table counts first answers and final ones.
The Ingress replicas' private memory (USS) is read before the kill. Every loop is bounded in
count and time and all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from faceage import DEFAULT_MODEL_PATH  # noqa: E402
from faceage.runtime import apply_ray_env_defaults, wait_until  # noqa: E402
from faceage.serving.local_process import LocalServe  # noqa: E402
from testkit.frames import webcam_jpegs
from testkit.models import untrained_model_file


@dataclass
class Answer:
    started: float
    ended: float
    first: int  # 0: no HTTP answer
    final: int
    body: str = ""
    retried: bool = False


@dataclass
class Load:
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def retry_once(session: requests.Session, url: str, frame: bytes) -> tuple[int, int, str, bool]:
    """POST the frame; on a 500 or no answer, once more. (first status, final status, the first
    error body, whether it retried)."""
    def post() -> tuple[int, str]:
        try:
            r = session.post(url + "/predict", data=frame, timeout=120,
                             headers={"Content-Type": "image/jpeg"})
            return r.status_code, ("" if r.status_code == 200 else r.text[:300])
        except requests.RequestException as exc:
            return 0, repr(exc)[:300]

    first, body = post()
    if first in (0, 500):
        final, _ = post()
        return first, final, body, True
    return first, first, body, False


def run_load(url: str, frames: list[bytes], clients: int, load: Load, seconds: float) -> None:
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        session, i = requests.Session(), index
        while time.monotonic() < deadline and not load.stop.is_set():
            start = time.monotonic()
            first, final, body, retried = retry_once(session, url, frames[i % len(frames)])
            load.answers.append(Answer(start, time.monotonic(), first, final, body, retried))
            i += clients

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))


def ready(service: LocalServe, name: str, killed: set[int]) -> list[psutil.Process]:
    """Replicas of ``name`` past their constructor that were not killed."""
    return [p for p in service.ready_replicas(name) if p.pid not in killed]


def one_run(model: Path, ingress: int, kill: list[str], clients: int, after: float,
            timeout: float, num_cpus: float, frames: list[bytes]) -> dict:
    overrides = {"args.model_path": str(model), "deployments.Ingress.num_replicas": ingress}
    print(f"[bench] starting serve/config.yaml with {ingress} Ingress replica(s) ...",
          file=sys.stderr, flush=True)
    with LocalServe(overrides, num_cpus=num_cpus, timeout=900) as service:
        counts = {name: len(service.replica_processes(name)) for name in kill}
        uss = [p.memory_full_info().uss / 2**20 for p in service.replica_processes("Ingress")]
        load = Load()
        worker = threading.Thread(target=run_load,
                                  args=(service.url, frames, clients, load, timeout))
        worker.start()
        try:
            wait_until(lambda: sum(a.final == 200 for a in load.answers) >= 2 * clients, 120,
                       what="answers under load")
            killed_at, killed = time.monotonic(), set()
            for i, name in enumerate(kill):
                if i:
                    time.sleep(0.5)
                victim = service.replica_processes(name)[0]
                victim.kill()
                killed.add(victim.pid)
            wait_until(lambda: all(len(ready(service, n, killed)) >= counts[n] for n in kill),
                       timeout, what="new replicas")
            replaced = time.monotonic() - killed_at
            time.sleep(after)
        finally:
            load.stop.set()
            worker.join()
    hit = [a for a in load.answers if a.ended > killed_at]  # in flight at the kill, or later
    bodies = Counter(a.body[:160] for a in hit if a.first != 200)
    return {"ingress": ingress, "uss": uss, "replaced_s": replaced,
            "requests": len(hit),
            "first": Counter(a.first for a in hit if a.first != 200),
            "final": Counter(a.final for a in hit if a.final != 200),
            "retried": sum(a.retried for a in hit), "bodies": bodies.most_common(3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model file (default: the shipped model)")
    p.add_argument("--kill", nargs="+", default=["Ingress"],
                   choices=["Ingress", "Detector", "AgeRegressor"])
    p.add_argument("--ingress-replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--after", type=float, default=10.0,
                   help="seconds of load after the replicas are back")
    p.add_argument("--timeout", type=float, default=300.0, help="bound on each run's load")
    p.add_argument("--num-cpus", type=float, default=2)
    args = p.parse_args()
    apply_ray_env_defaults()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="faceage-bench-") as tmp:
        model = Path(args.model) if args.model else (
            DEFAULT_MODEL_PATH if DEFAULT_MODEL_PATH.exists()
            else untrained_model_file(Path(tmp) / "untrained-default.pt"))
        frames = webcam_jpegs()
        rows = [one_run(model, n, args.kill, args.clients, args.after, args.timeout,
                        args.num_cpus, frames) for n in args.ingress_replicas]
    print(f"\nKilled {', then '.join(args.kill)} (one replica each) under {args.clients} "
          f"/predict clients; {os.cpu_count()} cores, Ray with {args.num_cpus:g} CPUs; load "
          f"average {os.getloadavg()[0]:.1f} at the end\n")
    print("| Ingress replicas | Ingress USS MB each | replaced after s | requests answered "
          "after the kill | not 200 at first | not 200 after one retry | retried |\n"
          "|---:|---:|---:|---:|---|---|---:|")
    for r in rows:
        print(f"| {r['ingress']} | {', '.join(f'{u:.0f}' for u in r['uss'])} | "
              f"{r['replaced_s']:.1f} | {r['requests']} | {dict(r['first']) or 0} | "
              f"{dict(r['final']) or 0} | {r['retried']} |")
    for r in rows:
        for body, n in r["bodies"]:
            print(f"\n{r['ingress']} Ingress: {n} x {body!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
