"""Training images/s: the Ray Train loop (1 and 2 workers) against a plain PyTorch loop.

Both run the same model, data, augmentation and ``train_one_epoch``; the difference is what Ray
Train and DDP cost on this machine. Each measurement trains ``--epochs`` short epochs of
``--steps`` steps per worker and reports the last one (the first warms up), so run time stays
bounded. Not a test: it prints a table.

    nice -n 5 uv run python bench/train_throughput.py            # ../shared UTKFace, 2 CPUs
    uv run python bench/train_throughput.py --stage head --steps 20
    uv run python bench/train_throughput.py --precisions fp32 bf16   # the default: both
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
        f"train.batch_size={args.batch}", f"train.max_steps_per_epoch={args.steps}",
        f"schedule.stages=[{{name: {args.stage}, train: {stage}, epochs: {args.epochs}}}]",
        f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={threads}",
        "train.ray_log_level=WARNING", f"train.precision={precision}",
    ])


def plain_loop(cfg, threads: int) -> dict:
    """The training loop without Ray: one process, ``threads`` torch threads."""
    import torch

    from faceage.data.augment import BatchAugment
    from faceage.data.datasets import make_dataset, prepare_data
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
    data = prepare_data(cfg.data, cfg.model.input_size)
    loader = torch.utils.data.DataLoader(make_dataset(data, "train"), shuffle=True,
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
            "data_share": stats["data_seconds"] / stats["seconds"]}


def ray_loop(cfg) -> dict:
    """The real ``train_loop_per_worker`` under ``TorchTrainer``; metrics of the last epoch."""
    from faceage.data.run_data import RunData
    from faceage.training.driver import build_trainer

    data = RunData.read(cfg.data).decoded(cfg.data, cfg.model.input_size)
    result = build_trainer(cfg, data).fit()
    return {"images_per_s": result.metrics["images_per_s"],
            "data_share": result.metrics["data_share"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(UTKFACE), help="UTKFace folder (default ../shared)")
    p.add_argument("--images", type=int, default=2048, help="stable subset of the data")
    p.add_argument("--size", type=int, default=128, help="input size in pixels")
    p.add_argument("--batch", type=int, default=64, help="batch per worker")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch per worker")
    p.add_argument("--epochs", type=int, default=2, help="epochs; the last one is reported")
    p.add_argument("--stage", choices=["all", "head"], default="all",
                   help="all: the whole network learns; head: the backbone is frozen")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs to use")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                   choices=["auto", "fp32", "bf16", "fp16"],
                   help="train.precision of each row (bf16 is fast only with native bf16)")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"data folder not found: {args.data} (pass --data)")

    import ray

    from faceage.training.loop import autocast_dtype

    def dtype_name(precision: str) -> str:
        import torch

        dtype = autocast_dtype(precision, torch.device("cpu"))
        return str(dtype or torch.float32).replace("torch.", "")

    rows = []
    with tempfile.TemporaryDirectory(prefix="faceage-bench-") as storage:
        # Precisions alternate within each loop kind, so a ratio between them holds even when
        # the machine's load drifts during the run.
        for precision in args.precisions:
            start = time.perf_counter()
            res = plain_loop(make_config(args, 1, args.cpus, storage, "plain", precision),
                             args.cpus)
            rows.append(("plain PyTorch", dtype_name(precision), 1, args.cpus, res,
                         time.perf_counter() - start))
        start_ray(None, num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        for workers in (1, 2):
            threads = max(1, args.cpus // workers)
            for precision in args.precisions:
                start = time.perf_counter()
                res = ray_loop(make_config(args, workers, threads, storage,
                                           f"ray{workers}-{precision}", precision))
                rows.append(("Ray Train (DDP)" if workers > 1 else "Ray Train",
                             dtype_name(precision), workers, threads, res,
                             time.perf_counter() - start))
        ray.shutdown()

    load = os.getloadavg()[0]
    print(f"\nmobilenet_v2 @ {args.size}px, stage '{args.stage}', batch {args.batch}/worker, "
          f"{args.steps} steps x {args.epochs} epochs (last reported), {args.cpus} CPUs, "
          f"load average {load:.1f}")
    print("| loop | precision | workers x threads | images/s | vs plain (first precision) "
          "| data share | wall s |")
    print("|---|---|---|---:|---:|---:|---:|")
    base = rows[0][4]["images_per_s"]
    for name, precision, workers, threads, res, wall in rows:
        print(f"| {name} | {precision} | {workers} x {threads} | {res['images_per_s']:.1f} | "
              f"{res['images_per_s'] / base:.2f} | {res['data_share']:.0%} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
