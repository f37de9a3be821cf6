"""The readers, one per data format, and ``FORMATS``: the one registry of format names.

A reader takes a folder or file and returns ``(rows, LoadReport)``: a table with ``path`` (what is
decoded), ``age`` and what labels the format has (``gender``, ``race``, ``group``; a prepared
index also ``source_path``; a CSV ``age_low`` and ``age_high``: rows labelled by an age range),
and what it skipped. ``read_dataset`` adds the range to every row (an exact age is its own;
``faceage.data.age_labels`` checks and completes the labels).
A new format is a reader here and an entry in ``FORMATS``; ``data.sources``, ``faceage prepare``
and ``faceage evaluate`` take it from there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from faceage.config import MAX_AGE
from faceage.data.age_labels import RANGE_COLUMNS, manifest_ages, with_age_range
from faceage.data.split import stable_subset
from faceage.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
UTKFACE_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_(\d+)\.jpg\.chip\.jpg$")
UTKFACE_COLUMNS = ["path", "age", "gender", "race"]
# UTKFace's label codes (-1: unknown, e.g. a manifest without the column).
UTKFACE_GENDERS = {0: "male", 1: "female"}
UTKFACE_RACES = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
GENDER_CODES = {"male": 0, "female": 1}
AAF_NAME = re.compile(r"^(\d{5})A(\d{2})\.jpg$", re.IGNORECASE)
AAF_FIRST_MALE = 7381  # AAF serials below this are female, the rest male
AAF_GROUP = "AAF"


@dataclass
class LoadReport:
    """What a reader kept and what it skipped, so a run can say it once."""

    kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)
    available: int | None = None  # images before ``data.limit`` took a subset

    def skip(self, reason: str, item: str) -> None:
        """Record a skipped ``item`` (a file name or path, shown as given) under ``reason``."""
        self.skipped.setdefault(reason, []).append(item)

    def summary(self, first: int = 3) -> str:
        parts = [f"{self.kept} images"]
        if self.available is not None:
            parts[0] += f" (a stable subset of {self.available}: data.limit)"
        for reason, items in self.skipped.items():
            shown = ", ".join(items[:first])
            more = ", ..." if len(items) > first else ""
            parts.append(f"skipped {len(items)} {reason} ({shown}{more})")
        return "; ".join(parts)


def scan_labelled_images(root: Path, parse, bad_name: str) -> tuple[list[tuple], LoadReport]:
    """``(path, *labels)`` of every image file in ``root`` (sorted by name) whose name ``parse``
    reads (it returns a tuple of labels, or None); the others are counted under ``bad_name``."""
    report = LoadReport()
    rows = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_file() or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        labels = parse(entry.name)
        if labels is None:
            report.skip(bad_name, entry.name)
            continue
        rows.append((entry.path, *labels))
    return rows, report


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


# -- UTKFace -------------------------------------------------------------------------------------


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """Age, gender, race from ``AGE_GENDER_RACE_DATETIME.jpg.chip.jpg``; None if malformed."""
    m = UTKFACE_NAME.match(name)
    if not m:
        return None
    age = int(m.group(1))
    if not 0 < age <= MAX_AGE:
        return None
    return age, int(m.group(2)), int(m.group(3))


def _require_dir(path: Path) -> None:
    if not path.exists():
        raise UserError(f"data directory not found: {path} (set data.path to the image folder)")
    if not path.is_dir():
        raise UserError(f"expected a directory of UTKFace images, got a file: {path}")


def read_utkface(directory: str | Path) -> tuple[pd.DataFrame, LoadReport]:
    """Every well-named UTKFace image in ``directory``; malformed names are counted, not fatal."""
    root = Path(directory).expanduser()
    _require_dir(root)
    rows, report = scan_labelled_images(root, parse_utkface_name, "malformed names")
    if not rows:
        raise UserError(
            f"no UTKFace images found in {root} (expected names like "
            "25_0_1_20170116174525125.jpg.chip.jpg)"
        )
    report.kept = len(rows)
    return pd.DataFrame(rows, columns=UTKFACE_COLUMNS), report


# -- All-Age-Faces -------------------------------------------------------------------------------


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
    return df.assign(group=AAF_GROUP), report


# -- CSV manifests -------------------------------------------------------------------------------


def read_manifest(csv_path: str | Path) -> tuple[pd.DataFrame, LoadReport]:
    """A CSV with ``path`` and, per row, ``age`` or ``age_low,age_high`` (extra columns kept);
    relative paths are relative to the CSV."""
    p = Path(csv_path).expanduser()
    if not p.is_file():
        raise UserError(f"manifest not found: {p}")
    try:
        df = pd.read_csv(p)
    except Exception as exc:
        raise UserError(f"{p} is not a readable CSV: {exc}") from None
    has_range = [c for c in RANGE_COLUMNS if c in df.columns]
    if "path" not in df.columns or not ("age" in df.columns or len(has_range) == 2):
        missing = ["path"] if "path" not in df.columns else []
        if "age" not in df.columns:
            missing += ([c for c in RANGE_COLUMNS if c not in df.columns] if has_range
                        else ["age"])
        raise UserError(f"{p} needs columns path and age, or path, age_low and age_high (a "
                        f"range per row; both forms may mix); missing {missing} (it has "
                        f"{list(df.columns)})")
    if df.empty:
        raise UserError(f"{p} lists no rows (path, age)")
    df = manifest_ages(df, p)
    base = p.parent
    df["path"] = [str(x) if os.path.isabs(str(x)) else str(base / str(x)) for x in df["path"]]
    for col in ("gender", "race"):
        if col not in df.columns:
            df[col] = -1
    report = LoadReport(kept=len(df))
    return df.reset_index(drop=True), report


# -- `faceage prepare` output --------------------------------------------------------------------


def read_prepared(index_path: str | Path) -> tuple[pd.DataFrame, LoadReport]:
    """An index written by ``faceage prepare``: rows with a face use their aligned crop."""
    p = Path(index_path).expanduser()
    if p.is_dir():
        p = p / "index.csv"
    if not p.is_file():
        raise UserError(f"prepared index not found: {p} (run `faceage prepare` first)")
    df = pd.read_csv(p)
    if not {"crop_path", "age"} <= set(df.columns):
        raise UserError(f"{p} is not a prepare index (needs crop_path and age columns)")
    report = LoadReport()
    no_face = df["crop_path"].isna()
    for src in df.loc[no_face, "source_path" if "source_path" in df.columns else "age"]:
        report.skip("images without a detected face", str(src))
    df = df.loc[~no_face].copy()
    base = p.parent
    df["path"] = [c if os.path.isabs(c) else str(base / c) for c in df["crop_path"].astype(str)]
    for col in ("gender", "race"):
        if col not in df.columns:
            df[col] = -1
    report.kept = len(df)
    if df.empty:
        raise UserError(f"{p} lists no crops with a face")
    return df.reset_index(drop=True), report


# -- the registry --------------------------------------------------------------------------------

Reader = Callable[[str | Path], tuple[pd.DataFrame, LoadReport]]


@dataclass(frozen=True)
class DataFormat:
    """What a format's files are and how they are read."""

    read: Reader
    about: str  # one line for messages and --help
    detect: bool = False  # photos: faces are detected and aligned (prepare) before training
    prepared: bool = False  # a `faceage prepare` output: crops made with its prepare.json
    group: str = ""  # the group of rows that name none


FORMATS: dict[str, DataFormat] = {
    "utkface": DataFormat(read_utkface, "a folder of UTKFace chips named "
                                        "AGE_GENDER_RACE_DATETIME.jpg.chip.jpg, used whole"),
    "aaf": DataFormat(read_aaf, "a folder of All-Age-Faces photos named NNNNNAaa.jpg",
                      detect=True, group=AAF_GROUP),
    "csv": DataFormat(read_manifest, "a CSV of photos with path,age (or an age range "
                                     "age_low,age_high) and optional gender,group columns",
                      detect=True),
    "manifest": DataFormat(read_manifest, "the same CSV, its images already framed as UTKFace "
                                          "chips and used whole"),
    "prepared": DataFormat(read_prepared, "a `faceage prepare` output folder", prepared=True),
}


def formats_help() -> str:
    """Every format with what it reads, one per line."""
    return "\n".join(f"  {name}: {fmt.about}" for name, fmt in FORMATS.items())


def data_format(name: str) -> DataFormat:
    """The registry entry of ``name``; an unknown name ends in a message listing the formats."""
    if name not in FORMATS:
        raise UserError(f"unknown data format {name!r}; use one of:\n{formats_help()}")
    return FORMATS[name]


def take_limit(df: pd.DataFrame, limit: int | None, report: LoadReport) -> pd.DataFrame:
    """At most ``limit`` rows: a stable subset by file name (``report`` counts the rest)."""
    if limit is None or len(df) <= limit:
        return df
    report.available = len(df)
    df = df.iloc[stable_subset(df["path"].tolist(), limit)].reset_index(drop=True)
    report.kept = len(df)
    return df


def read_dataset(fmt: str, path: str | Path,
                 limit: int | None = None) -> tuple[pd.DataFrame, LoadReport]:
    """The rows of one data set of format ``fmt`` (a ``FORMATS`` name), at most ``limit``."""
    df, report = data_format(fmt).read(path)
    return take_limit(with_age_range(df), limit, report), report
