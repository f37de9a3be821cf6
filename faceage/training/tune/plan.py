"""The search of ``faceage tune``: its settings, its dimensions and the checked plan.

``plan_search`` and ``check_trials_buildable`` check the whole space before any trial starts; every
mistake is one ``UserError``. ``trial_config`` turns a trial's sampled parameters into its training
config.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from faceage import bundled_path
from faceage.config import (
    LOSSES,
    Config,
    StageConfig,
    StrictModel,
    config_from_dict,
)
from faceage.errors import UserError
from faceage.yaml_settings import apply_overrides, read_yaml_mapping

SPACE_KEYS = ("backbone", "pretrained", "input_size", "uncertainty", "lr_scale", "schedule",
              "loss")
# ``weight.<source>``: the sampling weight of the training source named <source> (data.sources).
WEIGHT_PREFIX = "weight."
# Any other dotted key is a training config setting, as ``faceage train --set`` takes it:
# ``data.balance.by``, ``data.balance.strength``, ``train.augment.jpeg``, ...
CONFIG_SECTIONS = ("data", "model", "schedule", "train")
# --set keys whose first part is one of these go to the tune settings; all others to ``base``.
TUNE_KEYS = ("name", "storage_path", "train_config", "base", "schedules", "space", "search")


class AshaSettings(StrictModel):
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before a cut")
    reduction_factor: float = Field(2.0, gt=1.0, description="keep 1 in this many at each rung")


class SearchSettings(StrictModel):
    num_samples: int = Field(1, ge=1, description="samples drawn (each grid point this often)")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="default: cluster CPUs / CPUs per trial, at most the trial count")
    seed: int | None = Field(0, description="seed of the random draws (null: unseeded)")
    asha: AshaSettings = AshaSettings()


class TuneSettings(StrictModel):
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
    is_setting = key.split(".")[0] in CONFIG_SECTIONS and "." in key
    if key not in SPACE_KEYS and key not in CONFIG_SECTIONS and not is_weight and not is_setting:
        raise UserError(f"{where}: unknown search key {key!r}; the space takes "
                        f"{', '.join(SPACE_KEYS)}, weight.<source name>, training settings "
                        f"as dotted keys ({', '.join(s + '.…' for s in CONFIG_SECTIONS)}) and "
                        "whole sections whose values are mappings (model: {grid: [{backbone: "
                        "..., input_size: ...}, ...]})")
    if key in CONFIG_SECTIONS and key not in SPACE_KEYS:
        return _section_dimension(key, spec)
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in ("grid", "choice", "uniform", "loguniform"):
            raise UserError(f"{where}: expected a value, a list, or one of {{grid: [...]}}, "
                            f"{{choice: [...]}}, {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}; "
                            f"got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform"):
            if key != "lr_scale" and not (is_weight or is_setting):
                raise UserError(f"{where}: a {kind} range needs a numeric key (lr_scale, "
                                "weight.<source>, a numeric training setting)")
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


def _section_dimension(key: str, spec: Any) -> Dimension:
    """A whole section (``model``, ``data``...) searched as a set of mappings, each merged into
    the section: settings that only make sense together (a backbone and its input size)."""
    kind, values = "fixed", [spec]
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("grid", "choice"):
        kind, values = next(iter(spec.items()))
    elif isinstance(spec, list):
        kind, values = "choice", spec
    if not isinstance(values, list) or not values or not all(isinstance(v, dict) for v in values):
        raise UserError(f"space.{key}: a whole section takes mappings of its settings, as a "
                        f"value, a list or {{grid: [...]}}; got {spec!r}")
    for value in values:
        inner = _nested_search(value, key)
        if inner:  # e.g. --set space.data.balance.strength={grid: [...]} nests the dotted key
            raise UserError(f"space.{key}: {inner!r} is searched inside a section; give it as "
                            f"one dotted key of the space, {inner!r}: {{grid: [...]}}")
    return Dimension(key, kind, list(values))


def _nested_search(value: Any, path: str) -> str | None:
    """The dotted path of a search ({grid: ...}, {choice: ...}, a range) inside ``value``."""
    if not isinstance(value, dict):
        return None
    if len(value) == 1 and next(iter(value)) in ("grid", "choice", "uniform", "loguniform"):
        return path
    return next((found for k, v in value.items() if (found := _nested_search(v, f"{path}.{k}"))),
                None)


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
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise UserError(f"space.weight.{unknown[0]}: the base training settings have no data "
                            f"source named {unknown[0]!r} (sources: {', '.join(names)})")
        for name, value in weights.items():
            raw["data"]["sources"][names.index(name)]["weight"] = value
    if "loss" in params:
        train["loss"] = params["loss"]
    if "schedule" in params:
        raw["schedule"]["stages"] = [dict(s) for s in schedules[params["schedule"]]]
    scale = float(params.get("lr_scale", 1.0))
    for stage in raw["schedule"]["stages"]:
        stage["lr"] = float(stage["lr"]) * scale
    for key, value in params.items():
        if key in CONFIG_SECTIONS and isinstance(value, dict):
            _deep_merge(raw[key], value)
        elif "." in key and not key.startswith(WEIGHT_PREFIX):
            *parents, last = key.split(".")
            node = raw
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise UserError(f"space.{key}: the training config has no section "
                                    f"{'.'.join(parents)!r}")
                node = node[part]
            node[last] = value
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
    from faceage.models.backbones import backbone_spec

    raw: dict[str, Any] = {}
    if settings.train_config:
        # Relative to the working directory, as --config is; else beside the tune YAML; else,
        # for configs/X.yaml that faceage ships (an installed wheel), the packaged copy.
        p = Path(settings.train_config).expanduser()
        if not p.is_file() and config_dir is not None and (config_dir / p.name).is_file():
            p = config_dir / p.name
        elif not p.is_file() and not p.is_absolute() and p.parts[:-1] in ((), ("configs",)):
            shipped = bundled_path(f"configs/{p.name}")
            p = shipped if shipped.is_file() else p
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
        if d.key in ("backbone", "model"):
            for b in d.values:
                if isinstance(b, str) or "backbone" in b:
                    backbone_spec(b if isinstance(b, str) else b["backbone"])
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


def trial_shape(cfg: Config) -> str:
    """What ``preflight`` checks of a trial's config (the model, the stages' groups, the batch,
    the scaling, the data), as a key: trials that differ only in learning rates, loss or source
    weights are one shape."""
    raw = cfg.to_dict()
    stages = [{k: v for k, v in s.items() if k != "lr"} for s in raw["schedule"]["stages"]]
    sources = [{k: v for k, v in s.items() if k != "weight"} for s in raw["data"]["sources"]]
    return json.dumps([raw["model"], stages, raw["train"]["batch_size"], raw["scaling"],
                       {**raw["data"], "sources": sources}], sort_keys=True, default=str)


def check_trials_buildable(plan: TunePlan) -> None:
    """``preflight``, the check every training run starts with, for each shape of trial the
    search can make (every discrete combination), on the driver before any trial starts.

    Missing pretrained weights, unknown stage groups or too little data end the search here with
    one message, instead of failing (or waiting) trial by trial.
    """
    from faceage.training.checks import preflight

    discrete = [d for d in plan.dims if d.kind not in ("uniform", "loguniform")]
    fixed = {d.key: d.candidates()[0] for d in plan.dims if d not in discrete}
    seen: set[str] = set()
    read: dict[str, Any] = {}  # the run data of each data shape, read once
    with tempfile.TemporaryDirectory(prefix="faceage-tune-") as tmp:
        for combo in itertools.product(*(d.candidates() for d in discrete)):
            params = {**fixed, **dict(zip([d.key for d in discrete], combo, strict=True))}
            cfg = trial_config(plan.base, params, plan.schedules, tmp, "preflight")
            shape = trial_shape(cfg)
            if shape in seen:
                continue
            seen.add(shape)
            data_key = json.dumps(cfg.with_absolute_paths().data.model_dump(mode="json"),
                                  sort_keys=True)
            try:
                read[data_key] = preflight(cfg, read.get(data_key)).data
            except UserError as exc:
                named = ", ".join(f"{k}={v}" for k, v in params.items()) or "the base settings"
                raise UserError(f"trials with {named}: {exc}") from None
