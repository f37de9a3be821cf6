"""Training on Ray Train, the driver: ``run_training`` checks everything once (``preflight``,
which reads and splits the data), opens the run, fits and exports.

The run's data is one ``RunData`` (``faceage.data.run_data``): read and split by the preflight,
prepared and decoded once Ray is up, shipped to the workers and handed to the export.

Run locally with ``faceage train --config configs/train.yaml`` or on a cluster with
``ray job submit --working-dir . -- python -m faceage.train --config configs/train.yaml``.
The same loop (``faceage.training.worker``) runs on one CPU or many GPUs: only ``scaling`` in the
config changes.

A run folder ``<storage_path>/<name>`` holds ``config.yaml``, ``split.csv``, Ray Train's
``checkpoint_*`` folders, and at the end ``model.pt``, ``curves.png`` and ``summary.json``.
Starting a run whose folder already has checkpoints resumes it.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from faceage.config import Config, save_config
from faceage.data.run_data import RunData
from faceage.errors import TrainingFailed, UserError
from faceage.training.checkpoints import METRIC
from faceage.training.checks import check_cluster_fits, check_split_counts, preflight
from faceage.training.export import export_best, summary_table, write_summary
from faceage.training.worker import train_loop_per_worker

# -- the driver ----------------------------------------------------------------------------------


def build_trainer(cfg: Config, data: RunData, extra_callbacks: list | None = None):
    """A ``TorchTrainer`` for ``cfg`` on ``data`` (decoded): scaling, checkpoints and failure
    handling from the config. Needs Ray up: the data goes to the workers through the object
    store."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker or 1.0
    run_dir = cfg.run_dir()
    return TorchTrainer(
        train_loop_per_worker,
        # An object ref, not the table itself: the loop config is also shown on the dashboard.
        train_loop_config={"config": cfg.to_dict(), "data": ray.put(data.ship())},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=METRIC, checkpoint_score_order="min"),
            logging_config=ray.train.LoggingConfig(log_level=cfg.train.ray_log_level),
            callbacks=extra_callbacks or None,
        ),
    )


def explain_failure(exc: Exception, cfg: Config) -> Exception:
    """One readable message for a failed ``fit()``: the worker's own error, not Ray's wrapping."""
    from ray.train import ControllerError, WorkerGroupError

    run_dir = cfg.run_dir()
    causes: list[tuple[str, BaseException]] = []
    if isinstance(exc, WorkerGroupError):
        for rank, err in sorted(exc.worker_failures.items()):
            causes.append((f"worker {rank}", getattr(err, "_base_exc", err)))
    elif isinstance(exc, ControllerError):
        causes.append(("the Ray Train controller", exc.controller_failure))
    else:
        causes.append(("Ray Train", exc))
    for _, cause in causes:
        if isinstance(cause, UserError):
            return UserError(str(cause))
    where, cause = causes[0]
    first_line = (str(cause).strip().splitlines() or [""])[0][:300]
    retries = ("" if cfg.max_failures == 0
               else f" after {cfg.max_failures} restart(s) (max_failures)")
    return TrainingFailed(
        f"training stopped{retries}: {where} failed with {type(cause).__name__}: {first_line}\n"
        f"The worker logs above have the full traceback. Checkpoints are kept in {run_dir}; "
        "run the same command again to resume from the last one.")


@dataclass
class TrainOutcome:
    run_dir: Path
    model_path: Path
    best: dict
    history: list[dict]
    resumes: list[dict]


@contextmanager
def ray_for_run(cfg: Config):
    """Ray for a driver: joins ``RAY_ADDRESS`` or an instance already up in this process, else
    starts a private local one (checked against ``cfg``'s scaling) and shuts it down after."""
    import ray

    from faceage.runtime import start_ray

    # The dashboard's Train page lists runs, attempts and workers only with state tracking on.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS") or None
    start_ray(address=address, log_to_driver=True)
    try:
        if not address:
            check_cluster_fits(cfg)
        yield
    finally:
        ray.shutdown()


def open_run_folder(cfg: Config, resuming: bool) -> Path:
    """The run folder, created, with the effective config saved in it."""
    run_dir = cfg.run_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run folder {run_dir}: {exc}") from None
    if resuming:
        print(f"[faceage] {run_dir} has checkpoints of an earlier run: resuming it "
              "(choose another name or delete the folder to start over)")
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def run_train_command(args) -> int:
    """``faceage train``: the config file and ``--set`` overrides, trained."""
    from faceage.config import load_config

    run_training(load_config(args.config, args.overrides))
    return 0


def run_training(cfg: Config, callbacks: list | None = None) -> TrainOutcome:
    """Train with Ray Train, export the best checkpoint, write curves and a summary; with
    ``tracking.mlflow`` the run is an MLflow run too (``faceage.training.experiment``)."""
    from faceage.training.experiment import open_run

    checked = preflight(cfg)
    cfg, data = checked.cfg, checked.data
    run_dir = open_run_folder(cfg, checked.resuming)
    tracked = open_run(cfg)  # a bad tracking URI stops here, before Ray starts
    if tracked is not None:
        # First: Tune's report callback does not return when ASHA stops the trial.
        callbacks = [tracked.callback(), *(callbacks or [])]
        print(f"[faceage] MLflow: run {tracked.run_id} in experiment "
              f"{cfg.tracking.experiment!r} at {tracked.uri}")
    try:
        outcome = _train(cfg, data, callbacks)
    except BaseException as exc:
        if tracked is not None:  # Ctrl-C (or a stop from Tune) is KILLED, an error FAILED
            tracked.finish("FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    if tracked is not None:
        tracked.log_artifacts(outcome.model_path, run_dir / "curves.png",
                              run_dir / "summary.json", run_dir / "config.yaml")
        tracked.finish("FINISHED")
    return outcome


def decode_for_training(cfg: Config, data: RunData) -> RunData:
    """Photo sources prepared (Ray Data, the first time) and every image decoded, once, here;
    ``split.csv`` is the table the workers train on."""
    data = data.decoded(cfg.data, cfg.model.input_size)
    check_split_counts(cfg, data.table)
    data.split_table().to_csv(cfg.run_dir() / "split.csv", index=False)
    counts = data.summary()
    print(f"[faceage] data: {data.report.summary()}")
    print(f"[faceage] split: train {counts['train']}, val {counts['val']}, "
          f"test {counts['test']} (seed {cfg.data.split.seed})")
    if len(counts.get("sources", {})) > 1:
        print("[faceage] sources: " + "; ".join(
            f"{name} train {c['train']}, val {c['val']}, test {c['test']}"
            for name, c in counts["sources"].items()))
    if cfg.data.balance.by != "none":
        print("[faceage] draws per epoch (balance " + f"{cfg.data.balance.by}, strength "
              f"{cfg.data.balance.strength:g}): " + balance_line(cfg, data))
    return data


def balance_line(cfg: Config, data: RunData) -> str:
    """The expected share of each source's age bands in an epoch's draws, in per cent."""
    from faceage.data.sampling import draw_probabilities, draw_shares

    train = data.subset("train")
    sources, ages = train["source"].to_numpy(), train["age"].to_numpy()
    p = draw_probabilities(sources, ages, data.source_weights, cfg.data.balance)
    shares = draw_shares(p, sources, ages, cfg.data.balance.bands)
    return "; ".join(f"{s} " + " ".join(f"{band} {100 * v:.0f}%" for band, v in bands.items())
                     for s, bands in shares.items())


def _train(cfg: Config, data: RunData, callbacks: list | None) -> TrainOutcome:
    from ray.train import TrainingFailedError

    run_dir = cfg.run_dir()
    started = time.time()
    with ray_for_run(cfg):
        data = decode_for_training(cfg, data)
        try:
            result = build_trainer(cfg, data, callbacks).fit()
        except TrainingFailedError as exc:
            raise explain_failure(exc, cfg) from None
        model_path, best, latest = export_best(result, cfg, run_dir, data)
    history, resumes = latest["history"], latest.get("resumes", [])
    wall = time.time() - started
    curves = write_summary(cfg, run_dir, model_path, best, latest, wall)
    print("\n" + summary_table(history, best["epoch"]))
    for r in resumes:
        print(f"resumed at epoch {r['epoch'] + 1} "
              f"({'optimizer state restored' if r['optimizer_restored'] else 'new stage'})")
    print(f"\nbest val MAE {best['val_mae']:.2f} at epoch {best['epoch'] + 1}; {wall:.0f}s")
    if "val_interval_width" in best:
        print(f"age interval (80 %, calibrated on the val split): covers "
              f"{best['val_interval_coverage']:.1%} of val faces, mean width "
              f"{best['val_interval_width']:.1f} years")
    print(f"model:  {model_path}\ncurves: {curves}\nrun:    {run_dir}")
    return TrainOutcome(run_dir, model_path, best, history, resumes)
