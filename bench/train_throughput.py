"""Training images/s: the Ray Train loop (1 and 2 workers) against a plain PyTorch loop.

Both run the same model, data, augmentation and ``train_one_epoch``; the difference is what Ray
Train and DDP cost on this machine. Each measurement trains ``--epochs`` short epochs of
``--steps`` steps per worker and reports the last one (the first warms up), so run time stays
bounded. Not a test: it prints a table.

    uv run python bench/train_throughput.py --rounds 3          # ../shared UTKFace, 2 CPUs
    uv run python bench/train_throughput.py --stage head --steps 20 --ddp
    uv run python bench/train_throughput.py --precisions fp32 bf16 --worker-niceness 0
    uv run python bench/train_throughput.py --backbone dlib_age_resnet --size 64 \
        --images 16896 --steps 256 --rounds 2        # the shipped recipe's epochs

Variants run interleaved, every one once per round; the table gives medians over rounds and the
median of each variant's ratio to the plain loop within its round. ``cores busy``: the CPU time
of the training process (all its threads; rank 0's for DDP) per second of
the reported epoch; the cores it asked for less this is what other processes (Ray's own
included) took.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from faceage.runtime import apply_ray_env_defaults, start_ray

apply_ray_env_defaults()  # before `import ray`

REPO = Path(__file__).resolve().parents[1]
UTKFACE = REPO.parent / "shared" / "data" / "utkface"


def make_config(args, workers: int, threads: int, storage: str, name: str,
                precision: str = "auto"):
    from faceage.config import load_config

    stage = "all" if args.stage == "all" else 0
    return load_config(None, [
        f"data.path={args.data}", f"data.limit={args.images}", f"storage_path={storage}",
        f"name={name}", "model.pretrained=none", f"model.input_size={args.size}",
        f"model.backbone={args.backbone}",
        f"train.batch_size={args.batch}", f"train.max_steps_per_epoch={args.steps}",
        f"schedule.stages=[{{name: {args.stage}, train: {stage}, epochs: {args.epochs}}}]",
        f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={threads}",
        "train.ray_log_level=WARNING", f"train.precision={precision}",
    ])


def plain_loop(cfg, threads: int) -> dict:
    """The training loop without Ray: one process, ``threads`` torch threads."""
    import torch

    from faceage.data.augment import BatchAugment
    from faceage.data.run_data import RunData
    from faceage.models.network import build_model_from
    from faceage.training.loop import (
        StepContext,
        autocast_dtype,
        build_optimizer,
        make_loss,
        train_one_epoch,
    )
    from faceage.training.schedule import UnfreezeSchedule

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = RunData.read(cfg.data).decoded(cfg.data, cfg.model.input_size)
    loader = torch.utils.data.DataLoader(data.dataset("train"), shuffle=True,
                                         batch_size=cfg.train.batch_size, drop_last=True)
    model = build_model_from(cfg.model)  # make_config sets model.pretrained=none
    model = model.to(memory_format=torch.channels_last)
    steps = min(len(loader), cfg.train.max_steps_per_epoch)
    schedule = UnfreezeSchedule(cfg.schedule, model.group_names(), steps)
    optimizer = build_optimizer(model, schedule, schedule.stage_at(0), cfg.train.weight_decay)
    device = torch.device("cpu")
    ctx = StepContext(device, autocast_dtype(cfg.train.precision, device), True, None)
    augment = BatchAugment(cfg.model.input_size, cfg.train.augment)
    for epoch in range(schedule.total_epochs):
        stats = train_one_epoch(model, loader, optimizer, schedule, epoch,
                                make_loss(cfg.train.loss), ctx, augment, steps)
    return {"images_per_s": stats["images"] / stats["seconds"],
            "data_share": stats["data_seconds"] / stats["seconds"],
            "cpus_busy": stats["cpu_seconds"] / stats["seconds"]}


def ray_loop(cfg) -> dict:
    """The real ``train_loop_per_worker`` under ``TorchTrainer``; metrics of the last epoch."""
    from faceage.data.run_data import RunData
    from faceage.training.driver import build_trainer

    data = RunData.read(cfg.data).decoded(cfg.data, cfg.model.input_size)
    result = build_trainer(cfg, data).fit()
    return {"images_per_s": result.metrics["images_per_s"],
            "data_share": result.metrics["data_share"], "cpus_busy": result.metrics["cpus_busy"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(UTKFACE), help="UTKFace folder (default ../shared)")
    p.add_argument("--images", type=int, default=2048, help="stable subset of the data")
    p.add_argument("--size", type=int, default=128, help="input size in pixels")
    p.add_argument("--backbone", default="mobilenet_v2",
                   help="the network (the shipped recipe: dlib_age_resnet --size 64)")
    p.add_argument("--batch", type=int, default=64, help="batch per worker")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch per worker")
    p.add_argument("--epochs", type=int, default=2, help="epochs; the last one is reported")
    p.add_argument("--stage", choices=["all", "head"], default="all",
                   help="all: the whole network learns; head: the backbone is frozen")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs to use")
    p.add_argument("--rounds", type=int, default=3, help="rounds; every variant once a round")
    p.add_argument("--worker-niceness", type=int, nargs="+", default=[0, 15],
                   help="Ray worker niceness of the Ray rows (Ray's own default is 15; the "
                        "Ray faceage starts uses 0)")
    p.add_argument("--ddp", action="store_true", help="also 2 Ray Train workers x 1 thread")
    p.add_argument("--precisions", nargs="+", default=["fp32"],
                   choices=["auto", "fp32", "bf16", "fp16"],
                   help="train.precision of each row (bf16 is fast only with native bf16)")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"data folder not found: {args.data} (pass --data)")

    import statistics

    import ray

    from faceage.training.loop import autocast_dtype

    def dtype_name(precision: str) -> str:
        import torch

        dtype = autocast_dtype(precision, torch.device("cpu"))
        return str(dtype or torch.float32).replace("torch.", "")

    # Every variant once per round, in the same order, so a drift in the machine's load touches
    # all of them alike; each variant's ratio to the plain loop is taken within its round.
    variants = [("plain PyTorch", 0, 1, p_) for p_ in args.precisions]
    for niceness in args.worker_niceness:
        variants += [("Ray Train", niceness, 1, p_) for p_ in args.precisions]
        if args.ddp:
            variants += [("Ray Train (DDP)", niceness, 2, p_) for p_ in args.precisions]
    speeds: dict[tuple, list[float]] = {v: [] for v in variants}
    ratios: dict[tuple, list[float]] = {v: [] for v in variants}
    walls: dict[tuple, list[float]] = {v: [] for v in variants}
    data_share: dict[tuple, list[float]] = {v: [] for v in variants}
    busy: dict[tuple, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="faceage-bench-") as storage:
        for r in range(args.rounds):
            base = None
            for niceness in [None, *args.worker_niceness]:
                mine = [v for v in variants if (v[0] == "plain PyTorch") == (niceness is None)
                        and (niceness is None or v[1] == niceness)]
                if niceness is not None:  # a Ray head whose workers run at this niceness
                    os.environ["RAY_worker_niceness"] = str(niceness)
                    start_ray(None, num_cpus=args.cpus, include_dashboard=False,
                              log_to_driver=False)
                for v in mine:
                    name, _, workers, precision = v
                    threads = max(1, args.cpus // workers)
                    start = time.perf_counter()
                    if niceness is None:
                        res = plain_loop(make_config(args, 1, args.cpus, storage, "plain",
                                                     precision), args.cpus)
                    else:
                        res = ray_loop(make_config(args, workers, threads, storage,
                                                   f"r{r}-n{niceness}-{workers}-{precision}",
                                                   precision))
                    walls[v].append(time.perf_counter() - start)
                    speeds[v].append(res["images_per_s"])
                    data_share[v].append(res["data_share"])
                    busy[v].append(res["cpus_busy"])
                    base = base or res["images_per_s"]
                    ratios[v].append(res["images_per_s"] / base)
                    print(f"[bench] round {r + 1}: {name} nice {niceness} {workers}x{threads} "
                          f"{precision}: {res['images_per_s']:.1f} images/s", file=sys.stderr)
                if niceness is not None:
                    ray.shutdown()

    load = os.getloadavg()[0]
    print(f"\n{args.backbone} @ {args.size}px, stage '{args.stage}', batch {args.batch}/worker, "
          f"{args.steps} steps x {args.epochs} epochs (last reported), {args.cpus} CPUs, "
          f"{args.rounds} rounds, load average {load:.1f}")
    print("| loop | worker niceness | precision | workers x threads | images/s (median) "
          "| vs plain (median of rounds) | data share | cores busy | wall s |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for v in variants:
        name, niceness, workers, precision = v
        threads = max(1, args.cpus // workers)
        nice = "-" if name == "plain PyTorch" else str(niceness)
        print(f"| {name} | {nice} | {dtype_name(precision)} | {workers} x {threads} | "
              f"{statistics.median(speeds[v]):.1f} | {statistics.median(ratios[v]):.2f} | "
              f"{statistics.median(data_share[v]):.0%} | {statistics.median(busy[v]):.2f} | "
              f"{statistics.median(walls[v]):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
