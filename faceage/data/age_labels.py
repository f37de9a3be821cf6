"""Age labels as the readers give them: an exact age, or a range ``age_low``-``age_high`` (a
KFAD-style label). ``manifest_ages`` checks a CSV manifest's labels row by row (errors name the
line); ``with_age_range`` gives every row a range, an exact age being its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from faceage.config import MAX_AGE
from faceage.errors import UserError

RANGE_COLUMNS = ("age_low", "age_high")


def _record_lines(p: Path) -> list[int]:
    """The line each CSV record starts on, as a spreadsheet numbers them (the header is line 1),
    blank lines left out as ``pd.read_csv`` leaves them out."""
    import csv

    lines, last = [], 0
    with open(p, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        for record in reader:
            if any(cell.strip() for cell in record):
                lines.append(last + 1)
            last = reader.line_num
    return lines


def _number_column(df: pd.DataFrame, col: str) -> tuple[pd.Series, pd.Series, pd.Series]:
    """``col`` as numbers, which of its cells are blank, and which hold something not a number
    (a missing column is blank everywhere)."""
    if col not in df.columns:
        blank = pd.Series(True, index=df.index)
        return pd.Series(np.nan, index=df.index), blank, ~blank
    raw = df[col]
    text = raw.astype(str).str.strip()
    blank = raw.isna() | text.eq("")
    values = pd.to_numeric(text.where(~blank), errors="coerce")
    return values, blank, ~blank & values.isna()


def _row_problem(row: dict) -> str | None:
    """Why one manifest row's age labels are unusable (None: they are fine)."""
    for col in ("age", *RANGE_COLUMNS):
        if row[f"{col}_nan"]:
            return f"{col} {row[f'{col}_raw']!r} is not a number"
    has = {col: not row[f"{col}_blank"] for col in ("age", *RANGE_COLUMNS)}
    if has["age"] and (has["age_low"] or has["age_high"]):
        return "has both age and age_low/age_high: give one age or one range"
    if not any(has.values()):
        return "has no age: give age, or age_low and age_high"
    if has["age_low"] != has["age_high"]:
        given, missing = ("age_low", "age_high") if has["age_low"] else ("age_high", "age_low")
        return f"has {given} but no {missing}"
    for col in ("age", *RANGE_COLUMNS):
        if has[col] and not 0 <= row[col] <= MAX_AGE:
            return f"{col} {row[col]:g} is outside 0-{MAX_AGE}"
    if has["age_low"] and row["age_low"] > row["age_high"]:
        return f"age_low {row['age_low']:g} is above age_high {row['age_high']:g}"
    return None


def manifest_ages(df: pd.DataFrame, p: Path) -> pd.DataFrame:
    """``age``, ``age_low`` and ``age_high`` of every row of a manifest: an exact age is its own
    range, a range's ``age`` is its middle; a bad row ends in a ``UserError`` naming ``p`` and
    the row's line (the header is line 1)."""
    cells = {}
    for col in ("age", *RANGE_COLUMNS):
        values, blank, nan = _number_column(df, col)
        cells.update({col: values, f"{col}_blank": blank, f"{col}_nan": nan,
                      f"{col}_raw": df[col] if col in df.columns else values})
    problems = [(i, why) for i, row in enumerate(pd.DataFrame(cells).to_dict("records"))
                if (why := _row_problem(row)) is not None]
    if problems:
        lines = _record_lines(p)[1:]
        if len(lines) != len(df):  # a quoted field over several lines, say: count the rows
            lines = list(range(2, len(df) + 2))
        rule = (f"each row needs either age, or a range age_low and age_high, within "
                f"0-{MAX_AGE}")
        if len(problems) == 1:
            i, why = problems[0]
            raise UserError(f"{p}, line {lines[i]}: {why} ({rule})")
        shown = "\n".join(f"  line {lines[i]}: {why}" for i, why in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UserError(f"{p}: {len(problems)} rows have bad age labels ({rule}):\n"
                        f"{shown}{more}")
    exact = ~cells["age_blank"]
    low = cells["age"].where(exact, cells["age_low"]).astype(float)
    high = cells["age"].where(exact, cells["age_high"]).astype(float)
    return df.assign(age=((low + high) / 2).where(~exact, low), age_low=low, age_high=high)


def with_age_range(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``age_low`` and ``age_high`` on every row: an exact age is its own range (the
    readers of exact ages, and prepare indexes written before ranges, have no range columns)."""
    age = df["age"].astype(float)
    low = df["age_low"].astype(float).fillna(age) if "age_low" in df.columns else age
    high = df["age_high"].astype(float).fillna(age) if "age_high" in df.columns else age
    return df.assign(age=age, age_low=low, age_high=high)
