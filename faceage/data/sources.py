"""Several data sources in one run: reading, checking, preparing once, sampling, scoring.

``data.sources`` lists UTKFace folders, All-Age-Faces (AAF) folders and CSV manifests, raw or
already prepared; the old ``data.format``/``data.path`` keys mean one source. Every row of the
combined table carries ``path`` (what is decoded), ``age``, ``gender`` (male/female/unknown),
``group`` (UTKFace race names; "AAF"; a CSV's group column or ""), ``source`` (its name),
``origin`` (the raw file, resolved) and ``split``.

Each source is split by the hash of its raw file names (``assign_split``), so a source's split does
not depend on which other sources a run uses. Raw AAF and CSV sources go through ``faceage prepare``
(MTCNN and the crop policy) once; the crops are cached under a key of their files, the crop policy
and the crop size, and later runs reuse them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from faceage.config import DataConfig
from faceage.data.datasets import (
    MAX_AGE,
    UTKFACE_RACES,
    LoadReport,
    _unit_hash,
    assign_split,
    read_manifest,
    read_prepared,
    read_utkface,
    scan_labelled_images,
)
from faceage.errors import UserError

SOURCE_FORMATS = ("utkface", "aaf", "csv")
LEGACY_FORMATS = ("manifest", "prepared")  # data.format only: used as they are, never prepared
AAF_NAME = re.compile(r"^(\d{5})A(\d{2})\.jpg$", re.IGNORECASE)
AAF_FIRST_MALE = 7381  # AAF serials below this are female, the rest male
TABLE_COLUMNS = ["path", "age", "gender", "group", "source", "origin", "split"]
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
GENDER_CODES = {"male": 0, "female": 1}


@dataclass(frozen=True)
class SourceSpec:
    """One source after defaults: its unique name, format, path and how it is used."""

    name: str
    format: str
    path: str
    prepared: bool = False
    weight: float = 1.0
    limit: int | None = None
    legacy: bool = False  # from data.format/data.path: messages as before sources existed

    @property
    def needs_prepare(self) -> bool:
        """Raw AAF photos and raw CSV images are not chips: detect and crop them first."""
        return not self.prepared and self.format in ("aaf", "csv")

    def label(self) -> str:
        return f"data source {self.name!r} ({self.format}, {self.path})"

    def describe(self) -> dict:
        return {"name": self.name, "format": self.format, "path": self.path,
                "prepared": self.prepared, "weight": self.weight, "limit": self.limit}


def resolve_sources(data: DataConfig) -> list[SourceSpec]:
    """The run's sources with names and limits filled in; unknown formats and clashing names
    end in one message naming the source."""
    if data.sources is None:
        return [SourceSpec(name=data.format, format=data.format, path=data.path,
                           prepared=data.format == "prepared", limit=data.limit, legacy=True)]
    specs: list[SourceSpec] = []
    taken: set[str] = set()
    explicit = {s.name for s in data.sources if s.name}
    for i, s in enumerate(data.sources):
        where = f"data.sources[{i}]" + (f" ({s.name!r})" if s.name else "")
        if s.format not in SOURCE_FORMATS:
            raise UserError(f"{where}: unknown format {s.format!r}; use one of "
                            f"{', '.join(SOURCE_FORMATS)} (csv: a manifest with path,age and "
                            "optional gender,group columns)")
        name = s.name
        if name is None:  # the format, numbered when it repeats: utkface, utkface-2, ...
            name, k = s.format, 2
            while name in taken or name in explicit:
                name, k = f"{s.format}-{k}", k + 1
        elif name in taken:
            raise UserError(f"{where}: the name {name!r} is used by two sources; give each "
                            "source its own name")
        if not SOURCE_NAME.match(name):
            raise UserError(f"{where}: name {name!r} may hold only letters, digits, '_', '-' "
                            "and '.' (it becomes a metric name: val_mae/<name>)")
        taken.add(name)
        specs.append(SourceSpec(name=name, format=s.format, path=s.path, prepared=s.prepared,
                                weight=s.weight,
                                limit=s.limit if s.limit is not None else data.limit))
    return specs


# -- reading one source --------------------------------------------------------------------------


def parse_aaf_name(name: str) -> tuple[int, str] | None:
    """Age and gender from an AAF name ``NNNNNAaa.jpg`` (serial below 07381: female)."""
    m = AAF_NAME.match(name)
    if not m:
        return None
    age = int(m.group(2))
    if not 0 < age <= MAX_AGE:
        return None
    return age, "female" if int(m.group(1)) < AAF_FIRST_MALE else "male"


def read_aaf(directory: str | Path) -> tuple[pd.DataFrame, LoadReport]:
    """Every AAF photo in ``directory`` with its age and gender; other names are counted."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise UserError(f"AAF folder not found: {root}" if not root.exists()
                        else f"expected a folder of AAF photos, got a file: {root}")
    rows, report = scan_labelled_images(root, parse_aaf_name, "names not like NNNNNAaa.jpg")
    if not rows:
        bad = report.skipped.get("names not like NNNNNAaa.jpg", [])
        seen = f": {len(bad)} images with other names ({', '.join(bad[:3])})" if bad else ""
        raise UserError(f"no AAF images found in {root}{seen}; AAF names are NNNNNAaa.jpg, "
                        "e.g. 00012A25.jpg (serial, 'A', age)")
    report.kept = len(rows)
    df = pd.DataFrame(rows, columns=["path", "age", "gender"]).astype({"age": float})
    return df.assign(group="AAF"), report


def gender_name(value) -> str:
    """male/female/unknown from a UTKFace code (0/1) or a word (m, male, F, woman, ...)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "unknown"
    text = str(value).strip().lower()
    if text in ("0", "0.0", "m", "male", "man", "boy"):
        return "male"
    if text in ("1", "1.0", "f", "female", "woman", "girl"):
        return "female"
    return "unknown"


def _group_names(df: pd.DataFrame, fmt: str) -> list[str]:
    if "group" in df.columns:
        groups = ["" if pd.isna(g) else str(g) for g in df["group"]]
    else:
        groups = [""] * len(df)
    if "race" in df.columns:
        races = pd.to_numeric(df["race"], errors="coerce")
        groups = [g or UTKFACE_RACES.get(int(r), "") if pd.notna(r) else g
                  for g, r in zip(groups, races, strict=True)]
    if fmt == "aaf":
        groups = [g or "AAF" for g in groups]
    return groups


def _read_raw(spec: SourceSpec) -> tuple[pd.DataFrame, LoadReport]:
    if spec.prepared or spec.format == "prepared":
        df, report = read_prepared(spec.path)
        origin = df["source_path"] if "source_path" in df.columns else df["path"]
        # A legacy prepared index was split by its crop names, as before sources existed.
        key = df["path"] if spec.format == "prepared" else origin
        return df.assign(origin=origin.astype(str), split_key=key.astype(str)), report
    if spec.format == "utkface":
        df, report = read_utkface(spec.path)
    elif spec.format == "aaf":
        df, report = read_aaf(spec.path)
    else:  # csv, manifest
        df, report = read_manifest(spec.path)
    return df.assign(origin=df["path"], split_key=df["path"]), report


def read_source(spec: SourceSpec, data: DataConfig) -> tuple[pd.DataFrame, LoadReport]:
    """One source's rows (``TABLE_COLUMNS``) with their split; errors name the source."""
    try:
        df, report = _read_raw(spec)
    except UserError as exc:
        if spec.legacy:
            raise
        raise UserError(f"{spec.label()}: {exc}\nFix data.sources (its format and path)."
                        ) from None
    if spec.limit is not None and len(df) > spec.limit:
        # The hash-ordered subset of datasets.read_dataset: stable and spread over ages.
        order = np.argsort([_unit_hash(f"limit:{os.path.basename(p)}") for p in df["path"]])
        report.available = len(df)
        df = df.iloc[np.sort(order[: spec.limit])].reset_index(drop=True)
        report.kept = len(df)
    if df.empty:
        raise UserError(f"{spec.label()} has no images; check its path and format")
    gender = df["gender"] if "gender" in df.columns else [None] * len(df)
    table = pd.DataFrame({
        "path": df["path"].astype(str).to_numpy(),
        "age": df["age"].astype(float).to_numpy(),
        "gender": [gender_name(g) for g in gender],
        "group": _group_names(df, spec.format),
        "source": spec.name,
        "origin": [os.path.realpath(p) for p in df["origin"]],
        "split": assign_split(df["split_key"].tolist(), data.split),
    })
    return table, report


def check_no_shared_files(table: pd.DataFrame) -> None:
    """The same file (resolved path) in two sources would leak between splits: refuse it."""
    owners = table.groupby("origin")["source"].nunique()
    shared = owners[owners > 1].index
    if len(shared) == 0:
        return
    rows = table[table["origin"].isin(shared)]
    names = sorted(set(rows["source"]))
    examples = ", ".join(list(shared[:3]))
    raise UserError(f"{len(shared)} files are in more than one data source "
                    f"({', '.join(repr(n) for n in names)}), e.g. {examples}; list each file in "
                    "one source only")


def read_sources(data: DataConfig) -> tuple[pd.DataFrame, LoadReport, list[SourceSpec]]:
    """Every source read, limited and split; one ``UserError`` for any source that is wrong."""
    specs = resolve_sources(data)
    parts, reports = [], []
    for spec in specs:
        df, report = read_source(spec, data)
        parts.append(df)
        reports.append(report)
    table = pd.concat(parts, ignore_index=True)
    check_no_shared_files(table)
    if len(specs) == 1:
        return table, reports[0], specs
    merged = LoadReport(kept=len(table))
    for spec, report in zip(specs, reports, strict=True):
        for reason, items in report.skipped.items():
            for item in items:
                merged.skip(f"{spec.name}: {reason}", item)
    return table, merged, specs


def source_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per split of each source."""
    out = {}
    for name, rows in table.groupby("source", sort=False):
        counts = rows["split"].value_counts()
        out[str(name)] = {"images": int(len(rows)),
                          **{s: int(counts.get(s, 0)) for s in ("train", "val", "test")}}
    return out


# -- preparing raw AAF / CSV sources once --------------------------------------------------------


def prepared_root(data: DataConfig) -> Path:
    return Path(data.prepared_dir or os.path.expanduser("~/.cache/faceage/prepared"))


def prepare_key(origins: Sequence[str], policy: dict, size: int, detector: dict) -> str:
    """A key of the files (path, size, mtime), the crop policy, the crop size and the detector."""
    key = hashlib.sha1(json.dumps([policy, size, detector], sort_keys=True).encode())
    for p in sorted(origins):
        try:
            st = os.stat(p)
            key.update(f"\n{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            key.update(f"\n{p}|missing".encode())
    return key.hexdigest()[:16]


def find_covering_prepare(root: Path, fmt: str, origins: Sequence[str], policy: dict, size: int,
                          detector: dict) -> Path | None:
    """A finished prepared set of this format, crop policy, size and detector that holds every
    one of ``origins`` and is newer than each of them (a run on a subset, such as a ``limit``,
    reuses a full prepare instead of detecting the faces again); None when there is none."""
    wanted = set(origins)
    policy, detector = json.loads(json.dumps(policy)), json.loads(json.dumps(detector))
    newest = 0.0
    for p in wanted:
        try:
            newest = max(newest, os.stat(p).st_mtime)
        except OSError:
            return None
    for meta_path in sorted(root.glob(f"{fmt}-*/prepare.json")):
        try:
            meta = json.loads(meta_path.read_text())
            if (meta.get("crop_policy") != policy or meta.get("crop_size") != size
                    or meta.get("detector") != detector
                    or meta_path.stat().st_mtime < newest):
                continue
            index = pd.read_csv(meta_path.parent / "index.csv", usecols=["source_path"],
                                keep_default_na=False)
        except (OSError, ValueError):
            continue
        if wanted <= {os.path.realpath(p) for p in index["source_path"]}:
            return meta_path.parent
    return None


def prepare_source(spec: SourceSpec, rows: pd.DataFrame, data: DataConfig,
                   report: LoadReport, *, local: bool | None = None,
                   say=print) -> pd.DataFrame:
    """``rows`` of a raw AAF/CSV source with ``path`` pointing at their aligned crops, prepared
    with ``faceage prepare``'s Ray Data code the first time and reused after; images without a
    face (or unreadable) are left out and counted in ``report``."""
    from filelock import FileLock

    from faceage.data.prepare import DEFAULT_CROP_SIZE, prepare_table
    from faceage.inference.vision import CropPolicy, DetectorConfig

    policy, detector = CropPolicy(), DetectorConfig()
    policy_meta, detector_meta = policy.to_metadata(), detector.model_dump(mode="json")
    origins = rows["origin"].tolist()
    key = prepare_key(origins, policy_meta, DEFAULT_CROP_SIZE, detector_meta)
    root = prepared_root(data)
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{spec.format}-{key}"
    with FileLock(str(root / f"{spec.format}-{key}.lock")):
        covering = None if (out / "prepare.json").is_file() else find_covering_prepare(
            root, spec.format, origins, policy_meta, DEFAULT_CROP_SIZE, detector_meta)
        if covering is not None:
            out = covering
            say(f"[faceage] {spec.name}: reusing {len(rows)} images' crops from the larger "
                f"prepared set in {out}")
        elif (out / "prepare.json").is_file():
            say(f"[faceage] {spec.name}: reusing the prepared crops in {out}")
        else:
            if local is None:
                import ray

                # Inside an actor (a Tune trial) the trial holds the CPUs Ray Data's actors
                # would wait for: prepare in this process instead.
                local = (not ray.is_initialized()
                         or ray.get_runtime_context().get_actor_id() is not None)
            say(f"[faceage] {spec.name}: preparing {len(rows)} images once (MTCNN + crop "
                f"policy {policy.name}) into {out}")
            table = pd.DataFrame({
                "source_path": origins, "age": rows["age"].to_numpy(),
                "gender": [GENDER_CODES.get(g, -1) for g in rows["gender"]],
                "race": -1, "group": rows["group"].to_numpy()})
            src_dir = Path(spec.path).expanduser().resolve()
            summary = prepare_table(
                table, src_dir if src_dir.is_dir() else src_dir.parent, out,
                source={"path": str(src_dir), "format": spec.format, "limit": spec.limit},
                policy=policy, detector=detector, local=local)
            say(f"[faceage] {spec.name}: prepared {summary['images']} images in "
                f"{summary['seconds']:.0f}s ({summary['images_per_second']:.1f}/s): "
                f"{summary['with_face']} with a face, {summary['no_face']} without, "
                f"{summary['unreadable']} unreadable")
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    crops = {}
    for src, crop, status in zip(index["source_path"], index["crop_path"], index["status"],
                                 strict=True):
        crops[os.path.realpath(src)] = (str(out / crop) if crop else None, status)
    paths, keep = [], []
    for origin in origins:
        crop, status = crops.get(origin, (None, "missing from the prepared index"))
        if crop is None:
            why = {"no-face": "images without a detected face",
                   "unreadable": "unreadable images"}.get(status, status)
            report.skip(f"{spec.name}: {why}" if not spec.legacy else why, origin)
        paths.append(crop)
        keep.append(crop is not None)
    prepared = rows.assign(path=paths)[keep]
    if prepared.empty:
        raise UserError(f"{spec.label()}: no face was found in any of its {len(rows)} images; "
                        "check that they are face photos")
    return prepared


def prepare_raw_sources(table: pd.DataFrame, data: DataConfig, report: LoadReport,
                        say=print) -> pd.DataFrame:
    """The table with every raw AAF/CSV source's rows on their (cached) aligned crops."""
    parts = []
    for spec in resolve_sources(data):
        rows = table[table["source"] == spec.name]
        parts.append(prepare_source(spec, rows, data, report, say=say)
                     if spec.needs_prepare else rows)
    out = pd.concat(parts, ignore_index=True)
    report.kept = len(out)
    return out


def prepared_crop_policy(data: DataConfig) -> dict | None:
    """The crop policy of the run's prepared sources (None: UTKFace chips alone)."""
    for spec in resolve_sources(data):
        if spec.needs_prepare:
            from faceage.inference.vision import CropPolicy

            return CropPolicy().to_metadata()
        if spec.prepared or spec.format == "prepared":
            idx = Path(spec.path)
            meta_path = (idx if idx.is_dir() else idx.parent) / "prepare.json"
            if meta_path.is_file():
                return json.loads(meta_path.read_text())["crop_policy"]
    return None


def source_column(rows: pd.DataFrame, data: DataConfig) -> np.ndarray:
    """The rows' source names (a table read without sources, e.g. by ``prepare_data``, is the
    one source of ``data``)."""
    if "source" in rows.columns:
        return rows["source"].to_numpy()
    return np.full(len(rows), resolve_sources(data)[0].name, dtype=object)


# -- sampling ------------------------------------------------------------------------------------


class SourceWeightedSampler(torch.utils.data.Sampler):
    """Draws training images with replacement, each with probability proportional to its
    source's weight; ``len(sources)`` draws per epoch in all, seeded by (seed, epoch) and dealt
    to the workers round-robin (every worker draws the same sequence and takes its share)."""

    def __init__(self, sources: Sequence[str], weights: dict[str, float], num_replicas: int = 1,
                 rank: int = 0, seed: int = 0):
        p = np.array([weights[s] for s in sources], dtype=np.float64)
        self.p = p / p.sum()
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = len(sources) // num_replicas  # as DistributedSampler's drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        draws = rng.choice(len(self.p), size=self.num_samples * self.num_replicas, p=self.p)
        return iter(draws[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def train_sampler(dataset, sources: Sequence[str], weights: dict[str, float], num_replicas: int,
                  rank: int, seed: int):
    """Equal weights: every training image once per epoch, shuffled (``DistributedSampler``,
    as with one source). Otherwise ``SourceWeightedSampler``."""
    if len({weights[s] for s in set(sources)}) <= 1:
        return torch.utils.data.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                                   shuffle=True, seed=seed, drop_last=True)
    return SourceWeightedSampler(sources, weights, num_replicas, rank, seed)


# -- scoring -------------------------------------------------------------------------------------


def source_val_metrics(pred, true, sources, names: Sequence[str]) -> dict[str, float]:
    """Validation metrics: ``val_mae`` is the mean of the per-source MAEs (the model-selection
    metric: with one source, exactly the pooled MAE); ``val_mae_all``, ``val_rmse`` and
    ``val_cs5`` are pooled; ``val_mae/<source>`` etc. per source."""
    from faceage.training.metrics import regression_metrics

    pred, true, sources = np.asarray(pred), np.asarray(true), np.asarray(sources)
    pooled = regression_metrics(pred, true)
    out: dict[str, float] = {"val_mae_all": pooled["mae"], "val_rmse": pooled["rmse"],
                             "val_cs5": pooled["cs5"], "val_images": pooled["n"]}
    maes = []
    for name in names:
        m = regression_metrics(pred[sources == name], true[sources == name])
        out[f"val_mae/{name}"], out[f"val_rmse/{name}"] = m["mae"], m["rmse"]
        out[f"val_cs5/{name}"], out[f"val_images/{name}"] = m["cs5"], m["n"]
        maes.append(m["mae"])
    out["val_mae"] = float(np.mean(maes)) if len(names) > 1 else pooled["mae"]
    return out


def say_stderr(message: str) -> None:
    print(message, file=sys.stderr)
