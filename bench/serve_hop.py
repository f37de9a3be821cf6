"""What one handle call between two Serve deployments costs for a large argument: the bytes
inline (over gRPC with RAY_SERVE_THROUGHPUT_OPTIMIZED=1) against a reference to the object
store (faceage/serving/payload.py).

    uv run python bench/serve_hop.py                       # gRPC limit raised to 64 MiB
    uv run python bench/serve_hop.py --grpc-limit 4194304  # Ray's default: inline fails > 4 MiB

A caller deployment sends N random bytes to a callee that returns their length, ``--calls``
times per size and way; the table has the medians. Each run starts its own Ray instance.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc-limit", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[500_000, 2_000_000, 5_000_000, 12_000_000])
    args = parser.parse_args()
    os.environ.update(RAY_SERVE_THROUGHPUT_OPTIMIZED="1", RAY_USAGE_STATS_ENABLED="0",
                      RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=str(args.grpc_limit))
    import ray
    from ray import serve

    from faceage.runtime import start_ray
    from faceage.serving.payload import pack, unpack

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Callee:
        async def size(self, data) -> int:
            return len(await unpack(data))

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Caller:
        def __init__(self, callee):
            self.callee = callee

        async def run(self, n: int, way: str, calls: int) -> float:
            data = os.urandom(n)
            seconds = []
            for _ in range(calls):
                start = time.perf_counter()
                sent = data if way == "inline" else pack(data, inline_bytes=0)
                assert await self.callee.size.remote(sent) == n
                seconds.append(time.perf_counter() - start)
            return statistics.median(seconds) * 1000

    start_ray(None, num_cpus=2, include_dashboard=False)
    try:
        handle = serve.run(Caller.bind(Callee.bind()), route_prefix=None)

        async def table() -> None:
            print(f"\nRAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH={args.grpc_limit}, "
                  f"{args.calls} calls each, medians\n")
            print("| bytes | inline (gRPC) | object store |")
            print("|---:|---:|---:|")
            for n in args.sizes:
                cells = []
                for way in ("inline", "stored"):
                    try:
                        cells.append(f"{await handle.run.remote(n, way, args.calls):.1f} ms")
                    except Exception as exc:  # noqa: BLE001 - the table says what failed
                        cells.append(f"fails ({type(exc).__name__})")
                print(f"| {n:,} | {cells[0]} | {cells[1]} |")

        asyncio.run(table())
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
