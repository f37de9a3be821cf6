"""``faceage tune``: the trial function, ASHA, concurrency and the search on Ray Tune."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from faceage.arguments import add_set_argument
from faceage.config import Config
from faceage.errors import TrainingFailed
from faceage.training.checkpoints import METRIC
from faceage.training.tune.plan import (
    TunePlan,
    TuneSettings,
    check_trials_buildable,
    load_tune_settings,
    plan_search,
    trial_config,
)
from faceage.training.tune.results import collect_results, export_best_trial, markdown_table

if TYPE_CHECKING:  # pandas loads only when a search runs: `faceage --help` stays quick
    import pandas as pd


def train_trial(params: dict[str, Any], base: dict, schedules: dict, tune_dir: str) -> None:
    """One Tune trial: a Ray Train run with the trial's settings, reporting every epoch to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from faceage.training.driver import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(Config.model_validate(base), params, schedules,
                       str(Path(tune_dir) / trial_id), "train")
    run_training(cfg, callbacks=[TuneReportCallback()])


def placement_group_reaper(interval_s: float = 10.0):
    """A Tune callback that removes orphaned placement groups every ``interval_s``.

    When ASHA stops a trial, Tune ends the trial's actor and with it the Train controller it
    owns; the controller's worker placement group lives on until the job ends, and the held CPUs
    would starve every later trial (``faceage.compat.orphaned_placement_groups`` says why Ray
    Train's own cleaner misses it).
    """
    import ray
    from ray.tune import Callback

    from faceage.compat import orphaned_placement_groups

    class PlacementGroupReaper(Callback):
        def __init__(self):
            self._next = 0.0
            self._broken = False

        def on_step_begin(self, iteration, trials, **info):
            if self._broken or time.monotonic() < self._next:
                return
            self._next = time.monotonic() + interval_s
            try:
                for pg in orphaned_placement_groups():
                    ray.util.remove_placement_group(pg)
                    print(f"[faceage] removed placement group {pg.id.hex()[:12]} of a stopped "
                          "trial's Train run", flush=True)
            except Exception as exc:  # internal API: a Ray upgrade may change it; keep tuning
                self._broken = True
                print(f"[faceage] note: cannot check for orphaned placement groups ({exc!r}); "
                      "stopped trials' workers may hold CPUs until the search ends",
                      file=sys.stderr)

    return PlacementGroupReaper()


def asha_letting_last_epochs_through(plan: TunePlan):
    """ASHA on val MAE that never stops a trial at its own last epoch.

    Stopped there, the trial would gain nothing and lose its export (model file, curves,
    summary), which ``run_training`` writes after the last epoch.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class FinishingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if result.get("epoch", -1) + 1 >= plan.trial_epochs(trial.config):
                return TrialScheduler.CONTINUE
            return action

    asha = plan.settings.search.asha
    return FinishingASHA(max_t=plan.max_epochs(), grace_period=asha.grace_period,
                         reduction_factor=asha.reduction_factor)


def concurrency(plan: TunePlan, cluster_cpus: float) -> int:
    """Trials at once: as many Train runs as the cluster's CPUs hold, at most the trial count."""
    if plan.settings.search.max_concurrent_trials:
        return min(plan.settings.search.max_concurrent_trials, plan.trial_count)
    s = plan.base.scaling
    per_trial = s.num_workers * s.cpus_per_worker
    return max(1, min(plan.trial_count, int(cluster_cpus // per_trial)))


@dataclass
class TuneOutcome:
    tune_dir: Path
    table: pd.DataFrame
    best_model: Path | None
    plot: Path
    wall_seconds: float


def run_tune(settings: TuneSettings, config_dir: Path | None = None) -> TuneOutcome:
    """Validate the search, run it on Ray Tune, write the table, the plot and the best model."""
    from faceage.training.driver import ray_for_run

    plan = checked_plan(settings, config_dir)
    started = time.time()
    with ray_for_run(plan.base):
        grid = make_tuner(plan).fit()
        table, curves = collect_results(grid, plan)
        exported = export_best_trial(table, plan)
    close_unfinished_runs(table)
    return write_outcome(plan, table, curves, exported, time.time() - started)


def checked_plan(settings: TuneSettings, config_dir: Path | None) -> TunePlan:
    """The search planned and checked (``preflight`` for each trial shape), its tracking store
    set up and its folder made, with ``tune.yaml`` in it."""
    from faceage.training.checks import check_job_paths
    from faceage.training.experiment import check_store

    plan = plan_search(settings, config_dir)
    check_job_paths(plan.base)
    plan.base = plan.base.with_absolute_paths()
    plan.tune_dir = plan.base.run_dir()
    check_trials_buildable(plan)
    # Every trial logs to the search's store (one MLflow run each), checked and set up here
    # before any trial starts; trials on other nodes get the URI in their config.
    plan.base.tracking.uri = check_store(plan.base)
    plan.tune_dir.mkdir(parents=True, exist_ok=True)
    (plan.tune_dir / "tune.yaml").write_text(
        yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return plan


def make_tuner(plan: TunePlan):
    """The ``tune.Tuner`` of the search: ASHA on ``METRIC``, as many trials at once as the
    cluster's CPUs hold (Ray must be up)."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cpus = ray.cluster_resources().get("CPU", 0)
    at_once = concurrency(plan, cpus)
    search = plan.settings.search
    print(f"[faceage] tune: {plan.trial_count} trial(s), {at_once} at a time "
          f"({cpus:g} CPUs, {plan.base.scaling.num_workers} x "
          f"{plan.base.scaling.cpus_per_worker:g} per trial); ASHA on {METRIC} over up to "
          f"{plan.max_epochs()} epochs, grace {search.asha.grace_period}")
    trainable = tune.with_parameters(
        train_trial, base=plan.base.to_dict(), schedules=plan.schedules,
        tune_dir=str(plan.tune_dir))
    # The trial only drives its Train run, whose workers hold the CPUs. Tune refuses an empty
    # request, and a CPU sliver would leave the last Train run short of a whole CPU.
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 1 << 20})
    return tune.Tuner(
        trainable,
        param_space={d.key: d.to_tune() for d in plan.dims},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=search.num_samples,
            scheduler=asha_letting_last_epochs_through(plan),
            # Tune ignores TuneConfig.max_concurrent_trials next to a search generator.
            search_alg=BasicVariantGenerator(random_state=search.seed, max_concurrent=at_once),
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(name=plan.tune_dir.name,
                                  storage_path=str(plan.tune_dir.parent), verbose=1,
                                  callbacks=[placement_group_reaper()]),
    )


def close_unfinished_runs(table: pd.DataFrame) -> None:
    """Close the MLflow runs of trials that did not complete: ASHA ended their actors before
    run_training could."""
    from faceage.training.experiment import close_run

    for _, row in table[table["status"] != "completed"].iterrows():
        if row["status"] == "stopped by ASHA":
            close_run(Path(row["run_dir"]), "KILLED", replace=("RUNNING", "FAILED"))
        else:
            close_run(Path(row["run_dir"]), "FAILED")


def write_outcome(plan: TunePlan, table: pd.DataFrame, curves: dict, exported,
                  wall: float) -> TuneOutcome:
    """results.csv, results.md and the val MAE plot in the search's folder, and the summary on
    screen; ``TrainingFailed`` when no trial finished an epoch."""
    from faceage.training.plots import tune_curves

    table.drop(columns=["checkpoint"]).to_csv(plan.tune_dir / "results.csv", index=False)
    md = markdown_table(table)
    (plan.tune_dir / "results.md").write_text(f"# {plan.settings.name}\n\n{md}\n")
    plot = tune_curves(
        {t: (list(df["epoch"] + 1), list(df[METRIC])) for t, df in curves.items()},
        {r["trial"]: f"{r['trial']} {r['backbone']} {r['params']}" for _, r in table.iterrows()},
        plan.tune_dir / "val_mae.png", title=f"{plan.settings.name}: val MAE per epoch")
    print("\n" + md)
    best_model = None
    if exported is not None:
        best_model, best = exported
        print(f"\nbest trial {best['trial']}: {best['backbone']} {best['params']}, "
              f"val MAE {best['best_val_mae']:.2f} at epoch {int(best['best_epoch'])}")
    else:
        print("\nno trial reported a val MAE; see the errors above")
    print(f"{len(table)} trial(s) in {wall:.0f}s\ntable: {plan.tune_dir / 'results.md'}\n"
          f"plot:  {plot}\nmodel: {best_model}\nrun:   {plan.tune_dir}")
    if exported is None:
        raise TrainingFailed(f"no trial of {plan.tune_dir} finished an epoch; "
                             "the trial errors are in the table above")
    return TuneOutcome(plan.tune_dir, table, best_model, plot, wall)


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="tune YAML (e.g. configs/tune.yaml)")
    add_set_argument(p, help="override a setting: name, storage_path, space.*, search.*, ... go "
                             "to the tune settings, anything else (train.batch_size=32) to the "
                             "base training settings")


def run_tune_command(args: argparse.Namespace) -> int:
    settings = load_tune_settings(args.config, args.overrides)
    run_tune(settings, Path(args.config).parent if args.config else None)
    return 0
