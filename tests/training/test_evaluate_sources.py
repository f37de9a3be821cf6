"""``faceage evaluate`` over several data sources: per source and whole, in table, JSON, CSV."""

from __future__ import annotations

import json

import pandas as pd
from PIL import Image

from faceage.cli import main


def _aaf(folder, names):
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((40, 40, 3), 40 + i * 30, np.uint8)).save(folder / name)


def test_evaluate_reports_each_source_and_the_whole(untrained_model_file, utkface_images,
                                                    tmp_path, capsys):
    utkface_images(tmp_path / "a", 6, seed=1)
    utkface_images(tmp_path / "b", 4, seed=2)
    report = tmp_path / "multi.json"
    code = main(["evaluate", "--model", str(untrained_model_file),
                 "--data", f"utkface:{tmp_path / 'a'}", "--data", f"utkface:{tmp_path / 'b'}",
                 "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    head = next(line for line in out.splitlines() if "utkface-2" in line)
    assert head.split() == ["utkface", "utkface-2", "all"]
    assert "MAE by decade" in out and "MAE by gender" in out and "MAE by group" in out
    rep = json.loads(report.read_text())
    assert set(rep["sources"]) == {"utkface", "utkface-2"}
    assert rep["sources"]["utkface"]["evaluated"] == 6 and rep["all"]["evaluated"] == 10
    assert rep["metrics"] == rep["all"]["metrics"]
    assert set(rep["all"]["mae_by_gender"]) <= {"male", "female"}
    assert rep["all"]["mae_by_group"] and rep["sources"]["utkface-2"]["mae_by_decade"]
    preds = pd.read_csv(report.with_suffix(".csv"))
    assert {"source", "gender", "group", "pred", "age"} <= set(preds.columns)
    assert preds["source"].value_counts().to_dict() == {"utkface": 6, "utkface-2": 4}
    assert rep["plot"] == str(report.with_suffix(".png"))
    assert Image.open(rep["plot"]).size[0] > 500  # one scatter colour and bar per source


def test_evaluate_takes_a_training_config(untrained_model_file, utkface_images, tmp_path,
                                          capsys):
    utkface_images(tmp_path / "utk", 5, seed=3)
    _aaf(tmp_path / "aaf", ["00001A02.jpg", "09000A50.jpg", "wrong.jpg"])
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(f"data:\n  sources:\n    - {{format: utkface, path: {tmp_path / 'utk'}}}\n"
                   f"    - {{format: aaf, path: {tmp_path / 'aaf'}, name: asian}}\n")
    report = tmp_path / "cfg.json"
    code = main(["evaluate", "--model", str(untrained_model_file), "--config", str(cfg),
                 "--report", str(report), "--json"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in rep["data"]["sources"]] == ["utkface", "asian"]
    # Raw AAF photos are detected and aligned (these plain squares have no face).
    assert rep["data"]["sources"][1]["detect"] is True
    assert rep["sources"]["asian"]["images"] == 2 and rep["sources"]["asian"]["no_face"] == 2
    assert rep["data"]["skipped_when_reading"] == {"asian: names not like NNNNNAaa.jpg": 1}
    assert rep["all"]["evaluated"] == 5


def test_single_source_evaluate_is_unchanged(untrained_model_file, utkface_images, tmp_path,
                                             capsys):
    utkface_images(tmp_path / "one", 4, seed=5)
    report = tmp_path / "one.json"
    code = main(["evaluate", "--model", str(untrained_model_file), "--data",
                 str(tmp_path / "one"), "--report", str(report)])
    assert code == 0
    rep = json.loads(report.read_text())
    assert rep["data"]["format"] == "utkface" and "sources" not in rep
    assert rep["evaluated"] == 4 and "mae_by_race" in rep
