"""Ray Tune over training runs: one ``TorchTrainer`` per trial, ASHA on val MAE.

Run locally with ``faceage tune --config configs/tune.yaml`` or on a cluster with
``ray job submit --working-dir . -- python -m faceage.tune --config configs/tune.yaml``.

Each trial is a function that builds a training config from the base settings and its sampled
parameters and calls ``faceage.training.driver.run_training`` with Ray Train V2's
``TuneReportCallback``, so the scheduler sees every epoch. The tune folder ``<storage_path>/<name>``
holds one folder per trial (its Train run in ``<trial>/train``), ``results.md``, ``results.csv``,
``val_mae.png`` and ``best_model.pt``, the best trial's exported model file."""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from faceage.config import (
    Config,
    StageConfig,
    apply_overrides,
    config_from_dict,
    read_yaml_mapping,
)
from faceage.errors import TrainingFailed, UserError

if TYPE_CHECKING:  # pandas loads only when a search runs: `faceage --help` stays quick
    import pandas as pd

METRIC = "val_mae"
SPACE_KEYS = ("backbone", "pretrained", "input_size", "uncertainty", "lr_scale", "schedule",
              "loss")
# ``weight.<source>``: the sampling weight of the training source named <source> (data.sources).
WEIGHT_PREFIX = "weight."
LOSSES = ("l1", "smooth_l1", "mse")
# --set keys whose first part is one of these go to the tune settings; all others to ``base``.
TUNE_KEYS = ("name", "storage_path", "train_config", "base", "schedules", "space", "search")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AshaSettings(_Strict):
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before a cut")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep 1 in this many at each rung")


class SearchSettings(_Strict):
    num_samples: int = Field(1, ge=1, description="samples drawn (each grid point this often)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="default: cluster CPUs / CPUs per trial, at most the trial count")
    seed: int | None = Field(0, description="seed of the random draws (null: unseeded)")
    asha: AshaSettings = AshaSettings()


class TuneSettings(_Strict):
    name: str = "tune"
    storage_path: str = "runs"
    train_config: str | None = Field(None, description="training YAML the base settings start from")
    base: dict[str, Any] = Field(default_factory=dict, description="training settings on top")
    schedules: dict[str, list[StageConfig]] = Field(
        default_factory=dict, description="named unfreezing schedules (lists of stages)")
    space: dict[str, Any] = Field(default_factory=dict)
    search: SearchSettings = SearchSettings()


@dataclass
class Dimension:
    """One searched setting: ``kind`` is fixed, choice, grid, uniform or loguniform."""

    key: str
    kind: str
    values: list[Any]

    def candidates(self) -> list[Any]:
        """The values a trial can get (the bounds, for a range)."""
        return self.values

    def to_tune(self):
        from ray import tune

        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return tune.choice(self.values)
        if self.kind == "grid":
            return tune.grid_search(self.values)
        return getattr(tune, self.kind)(*self.values)


@dataclass
class TunePlan:
    """A validated search: base training config, dimensions, schedules and where it writes."""

    settings: TuneSettings
    base: Config
    dims: list[Dimension]
    tune_dir: Path
    schedules: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.dims if d.kind == "grid")

    @property
    def trial_count(self) -> int:
        return self.grid_size * self.settings.search.num_samples

    def trial_epochs(self, params: dict[str, Any]) -> int:
        if "schedule" in params:
            return sum(s["epochs"] for s in self.schedules[params["schedule"]])
        return self.base.total_epochs

    def max_epochs(self) -> int:
        """The longest trial's epochs: ASHA's ``max_t``."""
        names = next((d.values for d in self.dims if d.key == "schedule"), None)
        if names is None:
            return self.base.total_epochs
        return max(sum(s["epochs"] for s in self.schedules[n]) for n in names)


# -- settings ------------------------------------------------------------------------------------


def _invalid(source: str, exc: ValidationError) -> UserError:
    lines = [f"{source} is not valid:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return UserError("\n".join(lines))


def _deep_merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def parse_dimension(key: str, spec: Any) -> Dimension:
    """A space entry: a value (fixed), a list (random choice), {grid: [...]} or a range."""
    where = f"space.{key}"
    is_weight = key.startswith(WEIGHT_PREFIX) and len(key) > len(WEIGHT_PREFIX)
    if key not in SPACE_KEYS and not is_weight:
        raise UserError(f"{where}: unknown search key {key!r}; the space takes "
                        f"{', '.join(SPACE_KEYS)} and weight.<source name>")
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in ("grid", "choice", "uniform", "loguniform"):
            raise UserError(f"{where}: expected a value, a list, or one of {{grid: [...]}}, "
                            f"{{choice: [...]}}, {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}; "
                            f"got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform"):
            if key != "lr_scale" and not key.startswith(WEIGHT_PREFIX):
                raise UserError(f"{where}: a {kind} range needs a numeric key (lr_scale, "
                                "weight.<source>)")
            if (len(values) != 2 or not all(isinstance(v, (int, float)) for v in values)
                    or not 0 < values[0] < values[1]):
                raise UserError(f"{where}.{kind}: expected [low, high] with 0 < low < high, "
                                f"got {values!r}")
        return Dimension(key, kind, list(values))
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}: an empty list leaves nothing to try")
        return Dimension(key, "choice", spec)
    return Dimension(key, "fixed", [spec])


def trial_config(base: Config, params: dict[str, Any], schedules: dict[str, list[dict]],
                 storage_path: str, name: str) -> Config:
    """The training config of one trial: ``base`` with the trial's parameters applied."""
    raw = base.to_dict()
    raw.update(name=name, storage_path=storage_path)
    model, train = raw["model"], raw["train"]
    for key in ("backbone", "pretrained", "input_size", "uncertainty"):
        if key in params:
            model[key] = params[key]
    weights = {k[len(WEIGHT_PREFIX):]: v for k, v in params.items() if k.startswith(WEIGHT_PREFIX)}
    if weights:
        from faceage.data.sources import resolve_sources

        names = [s.name for s in resolve_sources(base.data)]
        unknown = sorted(set(weights) - set(names)) if base.data.sources is not None else [
            next(iter(weights))]
        if unknown:
            raise UserError(f"space.weight.{unknown[0]}: the base training settings have no data "
                            f"source named {unknown[0]!r}" + (
                                f" (sources: {', '.join(names)})" if base.data.sources is not None
                                else "; weights need data.sources"))
        for name, value in weights.items():
            raw["data"]["sources"][names.index(name)]["weight"] = value
    if "loss" in params:
        train["loss"] = params["loss"]
    if "schedule" in params:
        raw["schedule"]["stages"] = [dict(s) for s in schedules[params["schedule"]]]
    scale = float(params.get("lr_scale", 1.0))
    for stage in raw["schedule"]["stages"]:
        stage["lr"] = float(stage["lr"]) * scale
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    return config_from_dict(raw, f"trial settings ({shown})")


def load_tune_settings(path: str | Path | None, overrides: list[str] | None = None
                       ) -> TuneSettings:
    raw = read_yaml_mapping(Path(path), "tune config") if path is not None else {}
    tune_items, base_items = [], []
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        (tune_items if key.split(".")[0] in TUNE_KEYS else base_items).append(item)
    apply_overrides(raw, tune_items)
    apply_overrides(raw.setdefault("base", {}) if base_items else {}, base_items)
    try:
        return TuneSettings.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(str(path or "tune settings"), exc) from None


def plan_search(settings: TuneSettings, config_dir: Path | None = None) -> TunePlan:
    """Check the whole search space before any trial starts; every mistake is a ``UserError``."""
    from faceage.models.network import backbone_spec

    raw: dict[str, Any] = {}
    if settings.train_config:
        # Relative to the working directory, as --config is; else beside the tune YAML.
        p = Path(settings.train_config).expanduser()
        if not p.is_file() and config_dir is not None and (config_dir / p.name).is_file():
            p = config_dir / p.name
        raw = read_yaml_mapping(p, "train_config")
    _deep_merge(raw, settings.base)
    raw.update(name=settings.name, storage_path=settings.storage_path)
    base = config_from_dict(raw, "base training settings (train_config + base)")

    dims = [parse_dimension(k, v) for k, v in settings.space.items()]
    schedules = {n: [s.model_dump() for s in stages] for n, stages in settings.schedules.items()}
    for name, stages in schedules.items():
        if not stages:
            raise UserError(f"schedules.{name}: needs at least one stage")
    for d in dims:
        if d.key == "backbone":
            for b in d.values:
                backbone_spec(b)
        elif d.key == "loss":
            bad = [v for v in d.values if v not in LOSSES]
            if bad:
                raise UserError(f"space.loss: unknown loss {bad[0]!r}; choose from "
                                f"{', '.join(LOSSES)}")
        elif d.key == "schedule":
            bad = [v for v in d.values if v not in schedules]
            if bad:
                known = ", ".join(schedules) or "none defined"
                raise UserError(f"space.schedule: {bad[0]!r} is not a named schedule under "
                                f"schedules: ({known})")
    # Every discrete combination must make a valid training config (sizes, stage groups, ...).
    discrete = [d for d in dims if d.kind not in ("uniform", "loguniform")]
    for combo in itertools.product(*(d.candidates() for d in discrete)):
        trial_config(base, dict(zip([d.key for d in discrete], combo, strict=True)),
                     schedules, base.storage_path, base.name)
    tune_dir = Path(settings.storage_path).expanduser().resolve() / settings.name
    return TunePlan(settings, base, dims, tune_dir, schedules)


def check_trials_buildable(plan: TunePlan) -> None:
    """Build each backbone/weights pair and its schedules, and check the data once, on the driver.

    Missing pretrained weights, unknown stage groups or too little data end the search here with
    one message, instead of failing (or waiting) trial by trial.
    """
    from faceage.models.network import build_model
    from faceage.training.checks import preflight
    from faceage.training.schedule import UnfreezeSchedule

    def values(key: str, default: Any) -> list[Any]:
        for d in plan.dims:
            if d.key == key:
                return d.candidates()
        return [default]

    m = plan.base.model
    schedules = values("schedule", None)
    for backbone, pretrained in itertools.product(values("backbone", m.backbone),
                                                  values("pretrained", m.pretrained)):
        try:
            model = build_model(backbone, pretrained, m.head_hidden, m.dropout, m.weights_dir)
        except UserError as exc:
            raise UserError(f"trials with backbone={backbone}, pretrained={pretrained}: {exc}"
                            ) from None
        for name in schedules:
            stages = plan.base.schedule if name is None else plan.base.schedule.model_copy(
                update={"stages": [StageConfig(**s) for s in plan.schedules[name]]})
            try:
                UnfreezeSchedule(stages, model.group_names(), steps_per_epoch=1)
            except UserError as exc:
                raise UserError(f"schedule {name or '(base)'} with {backbone}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="faceage-tune-") as tmp:
        first = {d.key: d.candidates()[0] for d in plan.dims}
        preflight(trial_config(plan.base, first, plan.schedules, tmp, "preflight"))


# -- the trial -----------------------------------------------------------------------------------


def train_trial(params: dict[str, Any], base: dict, schedules: dict, tune_dir: str) -> None:
    """One Tune trial: a Ray Train run with the trial's settings, reporting every epoch to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from faceage.training.driver import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(Config.model_validate(base), params, schedules,
                       str(Path(tune_dir) / trial_id), "train")
    run_training(cfg, callbacks=[TuneReportCallback()])


# -- results -------------------------------------------------------------------------------------


def _params_text(config: dict, dims: list[Dimension]) -> str:
    parts = []
    for d in dims:
        if d.key == "backbone" or d.key not in config:
            continue
        v = config[d.key]
        parts.append(f"{d.key}={v:.3g}" if isinstance(v, float) else f"{d.key}={v}")
    return " ".join(parts)


def collect_results(grid, plan: TunePlan) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """One row per trial (best val MAE first) and each trial's per-epoch metrics."""
    import pandas as pd

    rows, curves = [], {}
    for r in grid:
        trial = Path(r.path).name
        config = r.config or {}
        cfg = trial_config(plan.base, config, plan.schedules, str(plan.tune_dir / trial), "train")
        df = r.metrics_dataframe
        df = df if df is not None and METRIC in getattr(df, "columns", []) else None
        epochs = 0 if df is None else int(df[METRIC].notna().sum())
        best = None if df is None or epochs == 0 else df.loc[df[METRIC].idxmin()]
        if r.error is not None:
            lines = [ln.strip() for ln in str(r.error).splitlines() if ln.strip()] or [""]
            # Ray wraps the trial's exception; its own "Type: message" line comes last.
            message = next((ln for ln in reversed(lines) if "Error: " in ln), lines[-1])
            status = f"error: {message[:200]}"
        elif epochs < cfg.total_epochs:
            status = "stopped by ASHA"
        else:
            status = "completed"
        rows.append({
            "trial": trial,
            "backbone": config.get("backbone", plan.base.model.backbone),
            "params": _params_text(config, plan.dims),
            "best_val_mae": float(best[METRIC]) if best is not None else float("nan"),
            # Several sources: val_mae is the mean of theirs; each one's at the same epoch.
            "val_mae_by_source": "" if best is None else ", ".join(
                f"{c.split('/', 1)[1]} {best[c]:.2f}" for c in df.columns
                if c.startswith(f"{METRIC}/") and pd.notna(best[c])),
            "best_epoch": int(best["epoch"]) + 1 if best is not None else None,
            "epochs_run": epochs,
            "epochs_planned": cfg.total_epochs,
            "time_s": float(df["time_total_s"].iloc[-1]) if df is not None else float("nan"),
            "status": status,
            "checkpoint": best.get("checkpoint_path") if best is not None else None,
            "run_dir": str(cfg.run_dir()),
        })
        if df is not None:
            curves[trial] = df
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values("best_val_mae", na_position="last").reset_index(drop=True)
    return table, curves


def export_best_trial(table: pd.DataFrame, plan: TunePlan) -> tuple[Path, pd.Series] | None:
    """Copy the best trial's model file to ``best_model.pt``.

    A trial ASHA stopped never reached its own export, so its best checkpoint is exported here.
    """
    from ray.train import Checkpoint

    from faceage.training.export import export_best
    from faceage.training.worker import load_checkpoint

    ranked = table[table["best_val_mae"].notna()]
    if ranked.empty:
        return None
    best = ranked.iloc[0]
    run_dir = Path(best["run_dir"])
    model = run_dir / "model.pt"
    if not model.is_file():
        if not best["checkpoint"]:
            return None
        ckpt = Checkpoint(best["checkpoint"])
        state = load_checkpoint(ckpt)
        metrics = next(h for h in state["history"] if h["epoch"] == state["epoch"])
        result = SimpleNamespace(best_checkpoints=[(ckpt, metrics)], checkpoint=ckpt)
        model, _, _ = export_best(result, Config.model_validate(state["config"]), run_dir)
    target = plan.tune_dir / "best_model.pt"
    shutil.copyfile(model, target)
    return target, best


def markdown_table(table: pd.DataFrame) -> str:
    import pandas as pd

    by_source = "val_mae_by_source" in table and table["val_mae_by_source"].astype(bool).any()
    lines = ["| trial | backbone | params | best val MAE " + ("| by source " if by_source else "")
             + "| best epoch | epochs run | time (s) | status |",
             "|---|---|---|---|" + ("---|" if by_source else "") + "---|---|---|---|"]
    for _, r in table.iterrows():
        mae = f"{r['best_val_mae']:.2f}" if pd.notna(r["best_val_mae"]) else "-"
        epoch = f"{int(r['best_epoch'])}" if pd.notna(r["best_epoch"]) else "-"
        secs = f"{r['time_s']:.0f}" if pd.notna(r["time_s"]) else "-"
        status = str(r["status"]).replace("|", "/")
        extra = f"| {r['val_mae_by_source']} " if by_source else ""
        lines.append(f"| {r['trial']} | {r['backbone']} | {r['params']} | {mae} {extra}| {epoch} "
                     f"| {r['epochs_run']}/{r['epochs_planned']} | {secs} | {status} |")
    return "\n".join(lines)


# -- the driver ----------------------------------------------------------------------------------


def orphaned_placement_groups() -> list:
    """This job's placement groups whose creating actor died (not detached ones).

    When ASHA stops a trial, Tune ends the trial's actor and with it the Train controller it
    owns; the controller's worker placement group lives on until the job ends. Ray Train's own
    cleaner removes it, but it finds the cluster through the state API, which fails on a machine
    with several Ray instances ("Found multiple active Ray instances"); the held CPUs would then
    starve every later trial. Ray has no public API for a placement group's creator, so this
    reads the GCS table the way ``ray.util.placement_group_table`` does.
    """
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    from faceage.compat import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    live = (gcs_pb2.PlacementGroupTableData.CREATED, gcs_pb2.PlacementGroupTableData.PENDING,
            gcs_pb2.PlacementGroupTableData.RESCHEDULING)
    found = []
    for pg in placement_group_table():
        # A driver's placement groups (Tune's own, one per trial) have an all-ff creator id and
        # count as "actor dead" from the start.
        by_actor = pg.creator_actor_id.strip(b"\xff") != b""
        if (pg.state in live and not pg.is_detached and by_actor and pg.creator_actor_dead
                and pg.creator_job_id.hex() == job):
            found.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return found


def placement_group_reaper(interval_s: float = 10.0):
    """A Tune callback that removes orphaned placement groups (see above) every ``interval_s``."""
    import ray
    from ray.tune import Callback

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
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from faceage.training.checks import check_job_paths
    from faceage.training.driver import ray_for_run
    from faceage.training.experiment import check_store
    from faceage.training.plots import tune_curves

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

    started = time.time()
    with ray_for_run(plan.base):
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
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: d.to_tune() for d in plan.dims},
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="min", num_samples=search.num_samples,
                scheduler=asha_letting_last_epochs_through(plan),
                # Tune ignores TuneConfig.max_concurrent_trials next to a search generator.
                search_alg=BasicVariantGenerator(random_state=search.seed,
                                                 max_concurrent=at_once),
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(name=plan.tune_dir.name,
                                      storage_path=str(plan.tune_dir.parent), verbose=1,
                                      callbacks=[placement_group_reaper()]),
        )
        grid = tuner.fit()
        table, curves = collect_results(grid, plan)
        exported = export_best_trial(table, plan)
    from faceage.training.experiment import close_run

    for _, row in table[table["status"] != "completed"].iterrows():
        # ASHA ended these trials' actors before run_training could close their MLflow runs.
        if row["status"] == "stopped by ASHA":
            close_run(Path(row["run_dir"]), "KILLED", replace=("RUNNING", "FAILED"))
        else:
            close_run(Path(row["run_dir"]), "FAILED")
    wall = time.time() - started
    table.drop(columns=["checkpoint"]).to_csv(plan.tune_dir / "results.csv", index=False)
    md = markdown_table(table)
    (plan.tune_dir / "results.md").write_text(f"# {settings.name}\n\n{md}\n")
    plot = tune_curves(
        {t: (list(df["epoch"] + 1), list(df[METRIC])) for t, df in curves.items()},
        {r["trial"]: f"{r['trial']} {r['backbone']} {r['params']}" for _, r in table.iterrows()},
        plan.tune_dir / "val_mae.png", title=f"{settings.name}: val MAE per epoch")
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
    p.add_argument("--set", dest="overrides", action="append", default=[], nargs="+",
                   metavar="KEY=VALUE",
                   help="override a setting: name, storage_path, space.*, search.*, ... go to "
                        "the tune settings, anything else (train.batch_size=32) to the base "
                        "training settings")


def run_tune_command(args: argparse.Namespace) -> int:
    overrides = [item for group in args.overrides for item in group]
    settings = load_tune_settings(args.config, overrides)
    run_tune(settings, Path(args.config).parent if args.config else None)
    return 0
