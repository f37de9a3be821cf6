"""The sources of a run: resolving them and reading them into one table (sources of photos are
then prepared once: ``faceage.data.prepared_sources``).

``data.sources`` lists data sets of any format in ``faceage.data.readers.FORMATS`` (the old
``data.format``/``data.path`` keys are a one-item list by then, see ``DataConfig``). Every row of
the combined table carries ``path`` (what is decoded), ``age``, ``age_low`` and ``age_high`` (the
row's age range: both equal ``age`` for an exact age; for a range ``age`` is its middle, used
only where one number is unavoidable, such as the training ages' mean), ``gender``
(male/female/unknown), ``group`` (UTKFace race names; "AAF"; a CSV's group column or ""),
``source`` (its name), ``origin`` (the raw file, resolved) and ``split``.

Each source is split by the hash of its raw file names (``assign_split``), or of the values of the
column its ``split_by`` names (rows sharing a family share a split), so a source's split does
not depend on which other sources a run uses."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pandas as pd

from faceage.config import DataConfig
from faceage.data.age_labels import with_age_range
from faceage.data.readers import (
    FORMATS,
    UTKFACE_RACES,
    LoadReport,
    formats_help,
    gender_name,
    read_prepared,
    take_limit,
)
from faceage.data.split import split_by_key
from faceage.errors import UserError

TABLE_COLUMNS = ["path", "age", "age_low", "age_high", "gender", "group", "source", "origin",
                 "split"]
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class SourceSpec:
    """One source after defaults: its unique name, format, path and how it is used
    (``prepared``: ``path`` is a ``faceage prepare`` output)."""

    name: str
    format: str
    path: str
    prepared: bool = False
    weight: float = 1.0
    limit: int | None = None
    split_by: str | None = None  # a column whose rows share a split (None: by file name)

    @property
    def needs_prepare(self) -> bool:
        """Photos (raw AAF, CSV) are not framed as chips: detect and crop their faces first."""
        return not self.prepared and FORMATS[self.format].detect

    def label(self) -> str:
        return f"data source {self.name!r} ({self.format}, {self.path})"

    def describe(self) -> dict:
        return {"name": self.name, "format": self.format, "path": self.path,
                "prepared": self.prepared, "weight": self.weight, "limit": self.limit,
                "split_by": self.split_by}


def resolve_sources(data: DataConfig) -> list[SourceSpec]:
    """The run's sources with names and limits filled in; unknown formats and clashing names
    end in one message naming the source."""
    specs: list[SourceSpec] = []
    taken: set[str] = set()
    explicit = {s.name for s in data.sources if s.name}
    for i, s in enumerate(data.sources):
        where = f"data.sources[{i}]" + (f" ({s.name!r})" if s.name else "")
        if s.format not in FORMATS:
            raise UserError(f"{where}: unknown format {s.format!r}; use one of:\n"
                            f"{formats_help()}")
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
        specs.append(SourceSpec(name=name, format=s.format, path=s.path,
                                prepared=s.prepared or FORMATS[s.format].prepared,
                                weight=s.weight,
                                limit=s.limit if s.limit is not None else data.limit,
                                split_by=s.split_by))
    return specs


# -- reading one source --------------------------------------------------------------------------


def _group_names(df: pd.DataFrame, spec: SourceSpec) -> list[str]:
    if "group" in df.columns:
        groups = ["" if pd.isna(g) else str(g) for g in df["group"]]
    else:
        groups = [""] * len(df)
    if "race" in df.columns:
        races = pd.to_numeric(df["race"], errors="coerce")
        groups = [g or UTKFACE_RACES.get(int(r), "") if pd.notna(r) else g
                  for g, r in zip(groups, races, strict=True)]
    default = FORMATS[spec.format].group
    return [g or default for g in groups] if default else groups


def _read_raw(spec: SourceSpec) -> tuple[pd.DataFrame, LoadReport]:
    """The source's rows with ``origin`` (the raw file) and ``split_key`` (what is hashed)."""
    fmt = FORMATS[spec.format]
    if not (spec.prepared or fmt.prepared):
        df, report = fmt.read(spec.path)
        df = df.assign(origin=df["path"], split_key=[os.path.basename(p) for p in df["path"]])
    else:
        df, report = read_prepared(spec.path)
        origin = df["source_path"] if "source_path" in df.columns else df["path"]
        # A prepared index named by its own format (data.format: prepared) is split by its
        # crops' names, as it always was; a prepared source of another format by its raw files'.
        key = df["path"] if fmt.prepared else origin
        df = df.assign(origin=origin.astype(str),
                       split_key=[os.path.basename(p) for p in key.astype(str)])
    if spec.split_by is not None:
        df = df.assign(split_key=_split_by_keys(df, spec))
    return with_age_range(df), report


def _split_by_keys(df: pd.DataFrame, spec: SourceSpec) -> list[str]:
    """The values of the source's ``split_by`` column, as text; a missing column or an empty
    value ends in a message naming the source."""
    col = spec.split_by
    if col not in df.columns:
        have = [c for c in df.columns if c not in ("origin", "split_key")]
        raise UserError(f"{spec.label()}: split_by: {col!r} is not one of its columns "
                        f"({', '.join(have)}); name a column of the source, or leave split_by "
                        "out to split by file name")
    values = df[col]
    empty = values.isna() | values.astype(str).str.strip().eq("")
    if empty.any():
        files = ", ".join(os.path.basename(str(p)) for p in df.loc[empty, "path"][:3])
        raise UserError(f"{spec.label()}: {int(empty.sum())} rows have no {col!r} value to "
                        f"split by (e.g. {files}); give every row one")
    return [str(v).strip() for v in values]


def read_source(spec: SourceSpec, data: DataConfig) -> tuple[pd.DataFrame, LoadReport]:
    """One source's rows (``TABLE_COLUMNS``) with their split; errors name the source."""
    try:
        df, report = _read_raw(spec)
    except UserError as exc:
        raise UserError(f"{spec.label()}: {exc}\nFix its format or path in the config "
                        "(data.sources, or data.format and data.path).") from None
    df = take_limit(df, spec.limit, report)
    if df.empty:
        raise UserError(f"{spec.label()} has no images; check its path and format")
    gender = df["gender"] if "gender" in df.columns else [None] * len(df)
    table = pd.DataFrame({
        "path": df["path"].astype(str).to_numpy(),
        "age": df["age"].astype(float).to_numpy(),
        "age_low": df["age_low"].to_numpy(),
        "age_high": df["age_high"].to_numpy(),
        "gender": [gender_name(g) for g in gender],
        "group": _group_names(df, spec),
        "source": spec.name,
        "origin": [os.path.realpath(p) for p in df["origin"]],
        "split": split_by_key(df["split_key"].tolist(), data.split),
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


def range_rows(table: pd.DataFrame) -> pd.Series:
    """Which rows are labelled by an age range (not one exact age)."""
    if "age_low" not in table.columns:
        return pd.Series(False, index=table.index)
    return table["age_low"] != table["age_high"]


def source_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per split of each source (and ``ranges``: how many are labelled by an age range,
    for a source that has any)."""
    out = {}
    ranges = range_rows(table)
    for name, rows in table.groupby("source", sort=False):
        counts = rows["split"].value_counts()
        out[str(name)] = {"images": int(len(rows)),
                          **{s: int(counts.get(s, 0)) for s in ("train", "val", "test")}}
        if n := int(ranges[rows.index].sum()):
            out[str(name)]["ranges"] = n
    return out
