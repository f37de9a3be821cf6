"""The report of ``faceage evaluate``: summaries per source and whole, its JSON, table and CSV.

Two shapes. One source given as ``--data PATH`` keeps the report it had before several sources
existed: the summary at the top level, MAE by UTKFace race, the UTKFace label codes in the CSV.
Several sources, a ``FORMAT:PATH`` item or ``--config`` give a block per source and ``all``.

Images labelled by an age range (``range_low``, ``range_high``) are scored against it: their
error is the distance to the range (0 inside), and a block with any adds ``range`` (range
accuracy, within one range, mean distance, signed error to the middle) and ``range_by_range``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from faceage.data.readers import GENDER_CODES, UTKFACE_GENDERS, UTKFACE_RACES
from faceage.inference.interval import DEFAULT_COVERAGE
from faceage.training.metrics import mae_by, mae_by_decade, regression_metrics

RACE_CODES = {name: code for code, name in UTKFACE_RACES.items()}
ONE_SOURCE_COLUMNS = ["path", "age", "gender", "race", "pred", "age_low", "age_high", "faces",
                      "status"]
SOURCES_COLUMNS = ["path", "age", "pred", "age_low", "age_high", "faces", "status", "source",
                   "gender", "group"]
# The per-image CSV's columns for a range label, at the end when some image has one (age_low and
# age_high are the predicted interval there, as they always were).
RANGE_COLUMNS = ["range_low", "range_high", "in_range", "within_one_range"]


# -- summaries ------------------------------------------------------------------------------------


def is_range(rows: pd.DataFrame) -> pd.Series:
    """Which rows are labelled by an age range (not one exact age)."""
    if "range_low" not in rows.columns:
        return pd.Series(False, index=rows.index)
    return rows["range_low"] != rows["range_high"]


def nearest_age(rows: pd.DataFrame) -> pd.Series:
    """The age each prediction is scored against: the true age, or for a range label the
    nearest age in the range (so the error is the distance to the range)."""
    if "range_low" not in rows.columns:
        return rows["age"]
    return rows["pred"].clip(rows["range_low"], rows["range_high"]).where(is_range(rows),
                                                                         rows["age"])


def range_summary(ok: pd.DataFrame) -> dict[str, Any]:
    """For the range-labelled rows: ``range`` (accuracy: the share of predictions inside the
    range; within one range; mean distance to the range; mean signed error to its middle) and
    the same per range, ``range_by_range``; nothing for exact ages alone."""
    rows = ok[is_range(ok)]
    if rows.empty:
        return {}

    def one(r: pd.DataFrame) -> dict[str, Any]:
        middle = (r["range_low"] + r["range_high"]) / 2
        return {"accuracy": float(r["in_range"].mean()),
                "within_one": float(r["within_one_range"].mean()),
                "distance": float((r["pred"] - nearest_age(r)).abs().mean()),
                "signed": float((r["pred"] - middle).mean()), "n": int(len(r))}

    by = {f"{lo:g}-{hi:g}": one(r) for (lo, hi), r in rows.groupby(["range_low", "range_high"])}
    return {"range": one(rows), "range_by_range": by}


def interval_summary(ok: pd.DataFrame) -> dict[str, Any]:
    """``interval``: how often the true age lies in [age_low, age_high] and the mean width,
    overall; ``interval_by_decade`` and ``interval_by_band`` (life-stage bands, the ones the
    calibration and balance use): the same per decade and band of true age (exact ages only)."""
    from faceage.config import AGE_BANDS
    from faceage.data.sampling import age_band, band_labels
    from faceage.inference.interval import coverage_report
    from faceage.training.metrics import decade_label

    ok = ok[~is_range(ok)]
    if "age_low" not in ok.columns or ok.empty:
        return {"interval": {}, "interval_by_decade": {}, "interval_by_band": {}}

    def one(rows: pd.DataFrame) -> dict[str, Any]:
        return {**coverage_report(rows["age_low"], rows["age_high"], rows["age"]),
                "n": int(len(rows))}

    decades = ok["age"].map(decade_label)
    order = sorted(set(decades), key=lambda d: int(d.split("-")[0]))
    by = {d: one(ok[decades == d]) for d in order}
    labels, band = band_labels(AGE_BANDS), age_band(ok["age"], AGE_BANDS)
    by_band = {labels[b]: one(ok[band == b]) for b in sorted(set(band.tolist()))}
    return {"interval": one(ok), "interval_by_decade": by, "interval_by_band": by_band}


def _mae_by_known(ok: pd.DataFrame, column: str) -> dict[str, dict]:
    """MAE per value of ``column`` (gender, group), leaving out rows that have none."""
    known = ok[(ok[column] != "") & (ok[column] != "unknown")]
    if known.empty:
        return {}
    return mae_by(known["pred"].to_numpy(), nearest_age(known).to_numpy(),
                  known[column].to_numpy())


def summarise(preds: pd.DataFrame) -> dict[str, Any]:
    """Metrics, MAE by decade, gender and group, the intervals' coverage and the image counts of
    per-image predictions (``status``, ``pred``, ``age``, ``gender`` and ``group`` names; with
    range labels, ``range_low``, ``range_high``, ``in_range``, ``within_one_range``)."""
    ok = preds[preds["status"] == "ok"]
    exact = ok[~is_range(ok)]
    pred, age = exact["pred"].to_numpy(), exact["age"].to_numpy()
    return {
        "metrics": regression_metrics(ok["pred"].to_numpy(), nearest_age(ok).to_numpy()),
        "mae_by_decade": mae_by_decade(pred, age) if len(exact) else {},
        "mae_by_gender": _mae_by_known(ok, "gender"),
        "mae_by_group": _mae_by_known(ok, "group"),
        **range_summary(ok),
        **interval_summary(ok),
        "images": int(len(preds)),
        "evaluated": int(len(ok)),
        "no_face": int((preds["status"] == "no-face").sum()),
        "unreadable": int((preds["status"] == "unreadable").sum()),
    }


def summarise_sources(preds: pd.DataFrame, names: list[str]) -> dict[str, Any]:
    """``summarise`` per source and for the whole."""
    return {"sources": {n: summarise(preds[preds["source"] == n]) for n in names},
            "all": summarise(preds)}


def _in_order(by: dict[str, dict], names) -> dict[str, dict]:
    """``by`` restricted to ``names``, in their order."""
    return {name: by[name] for name in names if name in by}


def one_source_summary(block: dict[str, Any]) -> dict[str, Any]:
    """A ``summarise`` block as one-source reports give it: gender in UTKFace's order and MAE by
    UTKFace race (the groups that are races) where the block has MAE by group."""
    out = {}
    for key, value in block.items():
        if key == "mae_by_gender":
            out[key] = _in_order(value, UTKFACE_GENDERS.values())
        elif key == "mae_by_group":
            out["mae_by_race"] = _in_order(value, UTKFACE_RACES.values())
        else:
            out[key] = value
    return out


def predictions_table(preds: pd.DataFrame, one_source: bool) -> pd.DataFrame:
    """The per-image CSV: with one source, gender and race as UTKFace codes (-1: unknown); the
    range columns at the end when some image has a range label."""
    ranges = RANGE_COLUMNS if is_range(preds).any() else []
    if not one_source:
        return preds[SOURCES_COLUMNS + ranges]
    codes = preds.assign(gender=preds["gender"].map(GENDER_CODES).fillna(-1).astype(int),
                         race=preds["group"].map(RACE_CODES).fillna(-1).astype(int))
    return codes[ONE_SOURCE_COLUMNS + ranges]


# -- the table ------------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The report as the table ``faceage evaluate`` prints."""
    return format_sources_table(report) if "sources" in report else format_table(report)


def format_table(report: dict[str, Any]) -> str:
    """One source: the metrics, then MAE by decade (with the intervals), gender and race."""
    m = report["metrics"]
    lines = [
        f"model   {report['model']['name']} {report['model']['version']}",
        f"data    {report['data']['path']} ({report['data']['format']}, split {report['split']}, "
        f"{'detect + align' if report['detect'] else 'whole image'}"
        f"{', TTA' if report['tta'] else ''})",
        f"images  {report['images']}: evaluated {report['evaluated']}, no face "
        f"{report['no_face']}, unreadable {report['unreadable']}",
        "",
        f"MAE   {m['mae']:.2f} years",
        f"RMSE  {m['rmse']:.2f} years",
        f"CS@5  {m['cs5']:.1%}",
    ]
    band, by_band = report.get("interval") or {}, report.get("interval_by_decade") or {}
    if band:
        cal = report.get("interval_calibration") or {}
        lines.append(f"age interval ({cal.get('coverage', DEFAULT_COVERAGE):.0%}, "
                     f"{cal.get('method', '?')}): covers {band['coverage']:.1%}, "
                     f"mean width {band['mean_width']:.1f} years")
    lines += format_ranges(report)
    if report["mae_by_decade"]:
        lines += ["", "decade   MAE     n" + ("   covered  width" if by_band else "")]
    for decade, v in report["mae_by_decade"].items():
        b = by_band.get(decade)
        extra = f"   {b['coverage']:>6.1%}  {b['mean_width']:5.1f}" if b else ""
        lines.append(f"{decade:<7}  {v['mae']:5.2f}  {v['n']:>4}{extra}")
    for key, title in (("mae_by_gender", "gender"), ("mae_by_race", "race")):
        if report.get(key):
            lines += ["", f"{title:<7}  MAE     n"]
            lines += [f"{k:<7}  {v['mae']:5.2f}  {v['n']:>4}" for k, v in report[key].items()]
    return "\n".join(lines)


def format_ranges(block: dict[str, Any]) -> list[str]:
    """The lines of a block's range labels: accuracy, within one range, distance, and the signed
    error to each range's middle (none without range labels)."""
    r = block.get("range")
    if not r:
        return []
    lines = ["", f"range labels ({r['n']} images): in the range {r['accuracy']:.1%}, within one "
                 f"range {r['within_one']:.1%}, mean distance to the range {r['distance']:.2f} "
                 f"years, signed error to its middle {r['signed']:+.2f}",
             "", "range    in range  within one  distance  signed     n"]
    for name, v in block["range_by_range"].items():
        lines.append(f"{name:<7}  {v['accuracy']:>8.1%}  {v['within_one']:>10.1%}  "
                     f"{v['distance']:>8.2f}  {v['signed']:>+6.2f}  {v['n']:>4}")
    return lines


def format_sources_table(report: dict[str, Any]) -> str:
    """Several sources: a column per source and one for the whole."""
    names = list(report["sources"])
    cols = [*names, "all"]
    blocks = {**report["sources"], "all": report["all"]}
    width = max(10, *(len(c) for c in cols)) + 2
    head = " " * 10 + "".join(f"{c:>{width}}" for c in cols)
    lines = [f"model   {report['model']['name']} {report['model']['version']}",
             f"split   {report['split']}{', TTA' if report['tta'] else ''}", "", head]

    def row(label: str, get) -> str:
        return f"{label:<10}" + "".join(f"{get(blocks[c]):>{width}}" for c in cols)

    lines.append(row("images", lambda b: str(b["images"])))
    lines.append(row("evaluated", lambda b: str(b["evaluated"])))
    lines.append(row("no face", lambda b: str(b["no_face"])))
    lines.append(row("MAE", lambda b: f"{b['metrics']['mae']:.2f}"))
    lines.append(row("RMSE", lambda b: f"{b['metrics']['rmse']:.2f}"))
    lines.append(row("CS@5", lambda b: f"{b['metrics']['cs5']:.1%}"))
    if blocks["all"].get("range"):  # range labels: inside, within one range, distance
        for label, key, fmt in (("in range", "accuracy", "{:.1%}"),
                                ("within one", "within_one", "{:.1%}"),
                                ("range dist", "distance", "{:.2f}")):
            lines.append(row(label, lambda b, key=key, fmt=fmt: fmt.format(b["range"][key])
                             if b.get("range") else "-"))
    if blocks["all"].get("interval"):  # the age interval: share holding the true age, width
        lines.append(row("in interval", lambda b: f"{b['interval']['coverage']:.1%}"
                         if b.get("interval") else "-"))
        lines.append(row("int. width", lambda b: f"{b['interval']['mean_width']:.1f}"
                         if b.get("interval") else "-"))
    for key, title, value in (("mae_by_decade", "MAE by decade", "mae"),
                              ("mae_by_decade", "signed error by decade (+: reads older)",
                               "signed"),
                              ("interval_by_band", "in interval, by age band", "coverage"),
                              ("mae_by_gender", "MAE by gender", "mae"),
                              ("mae_by_group", "MAE by group", "mae"),
                              ("range_by_range", "signed error to the range's middle", "signed")):
        keys = list(dict.fromkeys(k for c in cols for k in blocks[c].get(key, {})))
        if not keys:
            continue
        lines += ["", title]
        for k in keys:
            fmt = "{:.1%}" if value == "coverage" else "{:.2f}"
            lines.append(row(k[:10], lambda b, k=k, key=key, value=value, fmt=fmt: (
                f"{fmt.format(b[key][k][value])} ({b[key][k]['n']})" if k in b.get(key, {})
                else "-")))
    return "\n".join(lines)
