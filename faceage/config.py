"""Typed configuration: one schema, loaded from YAML, overridable with ``--set key=value``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from faceage.errors import UserError
from faceage.yaml_settings import apply_overrides, read_yaml_mapping

# The oldest age a label or a correction may give.
MAX_AGE = 120
# The losses train.loss takes (faceage.training.loop.make_loss implements them).
LOSSES = ("l1", "smooth_l1", "mse")


class StrictModel(BaseModel):  # unknown keys are errors, not silent defaults
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(StrictModel):
    """Fractions of the data held out; assignment hashes each file name, so it is stable."""

    val: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError("split.val + split.test must leave something to train on (< 1.0)")
        return self


class SourceConfig(StrictModel):
    """One data source of a run (``data.sources``): where its labelled faces come from.

    ``format``: a name in ``faceage.data.readers.FORMATS``, e.g. ``utkface`` (chips named
    AGE_GENDER_RACE_DATETIME.jpg.chip.jpg), ``aaf`` (All-Age-Faces photos named NNNNNAaa.jpg) or
    ``csv`` (a manifest with ``path`` and ``age``, or ``age_low,age_high`` for a row labelled by
    an age range, and optional ``gender,group`` columns). ``prepared:
    true`` says ``path`` is a ``faceage prepare`` output folder; sources of photos (raw ``aaf``
    and ``csv``) are prepared (MTCNN + the crop policy) once and cached, ``utkface`` chips are
    used as they are. ``weight`` multiplies the chance of each of the source's images being
    drawn relative to other sources' (all equal: every training image once per epoch, as with
    one source). ``split_by`` names a column of the source (e.g. ``family`` in a CSV) whose rows
    share a split: relatives and the same person at several ages never straddle train and test.
    """

    format: str  # checked by faceage.data.sources against the registry, naming the source
    path: str
    prepared: bool = False
    weight: float = Field(1.0, gt=0.0)
    name: str | None = None
    limit: int | None = Field(None, ge=1, description="at most this many images (default "
                                                      "data.limit)")
    split_by: str | None = Field(
        None, description="a column of the source whose rows share a split (e.g. family); "
                          "default: each file is split by the hash of its name")


# The old one-source form (``data.format`` + ``data.path``) and its defaults: the built-in config
# trains on this one source.
ONE_SOURCE_DEFAULTS = {"format": "utkface", "path": "../shared/data/utkface"}


# Life-stage age bands (lower edges, years): the KFAD ranges' edges, so a range label falls in one
# band; also the bands that balance, per-band calibration and the reports use.
AGE_BANDS = (0.0, 7.0, 13.0, 20.0, 31.0, 46.0, 56.0, 67.0)


class BalanceConfig(StrictModel):
    """Age-band balance of the training draws (``faceage.data.sampling``).

    ``by: band``: each age band gets a share of every epoch proportional to
    ``images ** (1 - strength)`` (strength 1: every band the same share; 0: as the data is);
    ``source_band``: the same within each source, whose own share stays as without balance.
    """

    by: Literal["none", "band", "source_band"] = "none"
    bands: list[float] = Field(default_factory=lambda: list(AGE_BANDS),
                               description="lower edges of the age bands, increasing")
    strength: float = Field(0.5, ge=0.0, le=1.0)

    @field_validator("bands")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if len(v) < 2 or any(b <= a for a, b in zip(v, v[1:], strict=False)) or v[0] < 0:
            raise ValueError("balance.bands needs at least two increasing ages from 0 up, "
                             "e.g. [0, 7, 13, 20, 31, 46, 56, 67]")
        return v


class DataConfig(StrictModel):
    """Where a run's labelled faces come from (``sources``) and how they are split and cached.

    ``format`` + ``path`` (configs/train.yaml) still say one source: they become a one-item
    ``sources`` as the config is read, so nothing after validation sees them.
    """

    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(**ONE_SOURCE_DEFAULTS)],
        description="the data sources (format + path: one source); see SourceConfig")
    prepared_dir: str | None = Field(
        None, description="where raw aaf/csv sources are prepared once and reused "
                          "(default ~/.cache/faceage/prepared)")
    split: SplitConfig = SplitConfig()
    # The built-in defaults are docs/training.md's quick run (a few minutes on two cores);
    # recipes such as configs/train.yaml set ``limit: null`` to use every image.
    limit: int | None = Field(
        4000, ge=1, description="use a stable subset of at most this many images (null: all)"
    )
    cache_dir: str | None = Field(
        None, description="where decoded images are cached (default ~/.cache/faceage/decoded)"
    )
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per trainer")
    balance: BalanceConfig = BalanceConfig()

    @model_validator(mode="before")
    @classmethod
    def _one_source_form(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        one = {k: raw.pop(k) for k in ONE_SOURCE_DEFAULTS if k in raw}
        if raw.get("sources") is None:
            raw["sources"] = [{**ONE_SOURCE_DEFAULTS, **one}]
        # Saved configs of earlier versions carry every key, so only values other than the
        # defaults conflict.
        elif any(one.get(k, v) != v for k, v in ONE_SOURCE_DEFAULTS.items()):
            raise ValueError("give either data.sources or data.format/data.path, not both")
        elif not raw["sources"]:
            raise ValueError("data.sources is empty: list at least one source")
        return raw


# model.pretrained words that are not paths: the backbones' published starts
# (``faceage.models.backbones``), and none.
PUBLISHED_STARTS = ("imagenet", "dlib-age")
PRETRAINED_WORDS = (*PUBLISHED_STARTS, "none")


class ModelConfig(StrictModel):
    backbone: str = "mobilenet_v2"
    pretrained: str = Field(
        "imagenet", description="the backbone's published weights (imagenet; dlib-age for "
        "dlib_age_resnet), none, or a path to a weights file")
    weights_dir: str | None = Field(
        "../shared/weights",
        description="folder searched for torchvision's weight files before the torch hub cache "
        "and a download (a missing folder is skipped)",
    )
    input_size: int = Field(128, ge=32, le=512)
    head_hidden: int = Field(256, ge=1)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    uncertainty: Literal["none", "laplace"] = Field(
        "laplace", description="laplace: the head also predicts a scale (how unsure it is of "
        "each face), trained by a Laplace likelihood on the detached age error and calibrated "
        "into an age interval after training; none: a one-output head (intervals the same width "
        "for every face)")


class AugmentConfig(StrictModel):
    """Training augmentation (``faceage.data.augment.BatchAugment``). ``grayscale``, ``blur``,
    ``downscale`` and ``jpeg`` are the share of images that get each; they imitate real photos
    (old grey prints, soft focus, small faces, compressed uploads), which read otherwise
    younger or older than the clean chips the model trains on."""

    flip: bool = True
    scale: tuple[float, float] = (0.75, 1.0)
    rotate: float = Field(10.0, ge=0.0, le=45.0)
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)
    grayscale: float = Field(0.15, ge=0.0, le=1.0)
    blur: float = Field(0.1, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = Field((0.4, 1.5), description="Gaussian sigma, pixels "
                                                                     "of the input")
    downscale: float = Field(0.15, ge=0.0, le=1.0)
    downscale_to: tuple[float, float] = Field((0.3, 0.7), description="side as a share of the "
                                                                      "input, then back up")
    jpeg: float = Field(0.2, ge=0.0, le=1.0)
    jpeg_quality: tuple[int, int] = (30, 90)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        for name in ("scale", "blur_sigma", "downscale_to", "jpeg_quality"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"train.augment.{name} must be (low, high) with 0 < low <= high")
        if self.scale[1] > 1 or self.downscale_to[1] > 1 or self.jpeg_quality[1] > 100:
            raise ValueError("train.augment: scale and downscale_to go up to 1, jpeg_quality to "
                             "100")
        return self


class StageConfig(StrictModel):
    """One stage of progressive unfreezing.

    ``train`` names the layer groups that learn in this stage: ``"all"``, an int N (the head plus
    the N backbone groups nearest the output), or an explicit list of group names.
    """

    name: str | None = None
    train: int | Literal["all"] | list[str] = 0
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0.0)


class ScheduleConfig(StrictModel):
    stages: list[StageConfig] = Field(
        default_factory=lambda: [
            StageConfig(name="head", train=0, epochs=1, lr=1e-3),
            StageConfig(name="top", train=3, epochs=1, lr=3e-4),
        ]
    )
    layer_lr_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="LR multiplier per group step away from the head"
    )
    warmup: float = Field(0.1, ge=0.0, lt=1.0, description="share of each stage spent warming up")
    decay: Literal["cosine", "plateau", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0)
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(1, ge=0)

    @field_validator("stages")
    @classmethod
    def _non_empty(cls, v: list[StageConfig]) -> list[StageConfig]:
        if not v:
            raise ValueError("schedule.stages needs at least one stage")
        return v


class TrainConfig(StrictModel):
    batch_size: int = Field(64, ge=1, description="per worker")
    loss: Literal[LOSSES] = "l1"
    weight_decay: float = Field(1e-4, ge=0.0)
    augment: AugmentConfig = AugmentConfig()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: AMP fp16 on GPUs, bf16 on CPUs with native bf16, else fp32"
    )
    channels_last: bool = True
    eval_tta: bool = Field(False, description="average with the flipped image when validating")
    eval_zoom: float | None = Field(
        None, gt=0.5, lt=1.0, description="with eval_tta, also average a closer view of each "
        "face (this share of each side) and its mirror; the model file's tta_zoom")
    keep_checkpoints: int = Field(2, ge=1, description="best N checkpoints kept, by val MAE")
    checkpoint_every: int = Field(5, ge=1, description="checkpoint when val MAE improves, at "
                                  "the last epoch, and at least every N epochs")
    checkpoint_minutes: float = Field(10.0, gt=0, description="... and N minutes after the last")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap (quick runs, tests)")
    consistency: float = Field(
        0.0, ge=0.0, description="train on two augmented views of every image (another crop, "
        "tilt, mirror) and add this times their mean age difference in years: a face and its "
        "mirror, or two framings of it, read the same; doubles each step's work (0: off)")
    stop_patience: int | None = Field(
        None, ge=1, description="end the last stage once val MAE has not improved for this "
                                "many of its epochs, counted once half the stage has run "
                                "(null: every planned epoch runs)")
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="Ray Train's own console logs (INFO adds a line per report)"
    )


class ScalingSettings(StrictModel):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(2.0, gt=0.0, description="also the torch threads per worker")
    gpus_per_worker: float | None = Field(None, gt=0.0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)


class TrackingConfig(StrictModel):
    """Experiment tracking (``faceage.training.experiment``): every run is an MLflow run."""

    mlflow: bool = Field(True, description="log params, per-epoch metrics and artifacts to MLflow")
    experiment: str = Field("faceage", min_length=1, description="MLflow experiment name")
    uri: str | None = Field(
        None, description="tracking URI (default: MLFLOW_TRACKING_URI, else "
                          "sqlite:///<storage_path>/mlflow.db)")


class Config(StrictModel):
    name: str = "faceage"
    storage_path: str = "runs"
    seed: int = 0
    max_failures: int = Field(0, ge=-1, description="worker failures to recover from (-1: no end)")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingSettings = ScalingSettings()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.schedule.stages)

    def run_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_absolute_paths(self, base: str | Path | None = None) -> Config:
        """A copy whose local paths are absolute, resolved against ``base`` (default: cwd).

        Ray workers may run in another directory (a job's uploaded working dir, another node),
        so the driver resolves paths before shipping the config.
        """
        root = Path(base) if base is not None else Path.cwd()

        def fix(p: str | None) -> str | None:
            if p is None or "://" in p:  # leave s3://, gs://, ... alone
                return p
            return str((root / Path(p).expanduser()).resolve())

        out = self.model_copy(deep=True)
        out.storage_path = fix(out.storage_path)
        out.data.cache_dir = fix(out.data.cache_dir)
        out.data.prepared_dir = fix(out.data.prepared_dir)
        for src in out.data.sources:
            src.path = fix(src.path)
        out.model.weights_dir = fix(out.model.weights_dir)
        if out.model.pretrained not in PRETRAINED_WORDS:
            out.model.pretrained = fix(out.model.pretrained)
        return out


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source} is not valid:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise UserError("\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the built-in defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        raw = read_yaml_mapping(Path(path), "config file")
        source = str(path)
    apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
