"""`faceage prepare`: Ray Data detector actors write crops, an index and prepare.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from faceage.cli import main
from faceage.data.prepare import DIGEST_COLUMN, INDEX_COLUMNS, crop_name, run_prepare
from faceage.data.readers import read_prepared
from faceage.inference.alignment import CropPolicy
from faceage.inference.detection import DetectorConfig

UTKFACE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "utkface"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, astronaut_path, rocket_path) -> Path:
    d = tmp_path_factory.mktemp("raw")
    (d / "people").mkdir()
    shutil.copy(astronaut_path, d / "people" / "astronaut.jpg")
    Image.open(astronaut_path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        d / "people" / "mirrored.png")
    shutil.copy(rocket_path, d / "rocket.jpg")
    (d / "broken.jpg").write_text("not an image")
    path = d / "manifest.csv"
    path.write_text("path,age\npeople/astronaut.jpg,40\npeople/mirrored.png,41\nrocket.jpg,30\n"
                    "broken.jpg,20\n")
    return path


def _check_prepared(out: Path, manifest: Path) -> None:
    index = pd.read_csv(out / "index.csv")
    assert list(index.columns) == [*INDEX_COLUMNS, DIGEST_COLUMN]
    by_name = {Path(p).name: row for p, row in zip(index["source_path"], index.to_dict("records"),
                                                   strict=True)}
    assert set(by_name) == {"astronaut.jpg", "mirrored.png", "rocket.jpg", "broken.jpg"}
    assert by_name["astronaut.jpg"]["status"] == "ok"
    assert by_name["astronaut.jpg"]["crop_path"] == "crops/people/astronaut.jpg"
    assert by_name["mirrored.png"]["crop_path"] == "crops/people/mirrored.png.jpg"
    assert np.allclose([by_name["astronaut.jpg"][k] for k in ("x1", "y1", "x2", "y2")],
                       [181, 62, 268, 172], atol=10)
    assert by_name["rocket.jpg"]["status"] == "no-face"
    assert pd.isna(by_name["rocket.jpg"]["crop_path"])  # listed, not dropped
    assert by_name["broken.jpg"]["status"] == "unreadable"
    assert "not an image" in by_name["broken.jpg"]["error"]
    crop = Image.open(out / "crops" / "people" / "astronaut.jpg")
    assert crop.size == (200, 200)
    meta = json.loads((out / "prepare.json").read_text())
    assert CropPolicy.from_metadata(meta["crop_policy"]) == CropPolicy()
    assert meta["summary"]["with_face"] == 2 and meta["summary"]["no_face"] == 1
    # Training reads it (data.format=prepared): two crops, the rest reported as skipped.
    df, report = read_prepared(out)
    assert sorted(Path(p).name for p in df["path"]) == ["astronaut.jpg", "mirrored.png.jpg"]
    assert sorted(df["age"]) == [40, 41]
    assert sum(len(v) for v in report.skipped.values()) == 2


def test_prepare_in_process(capsys, manifest, tmp_path):
    code = main(["prepare", "--data", str(manifest), "--format", "manifest", "--out",
                 str(tmp_path / "prep"), "--local"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "2 with a face, 1 without, 1 unreadable" in out
    _check_prepared(tmp_path / "prep", manifest)


@pytest.mark.slow
@pytest.mark.ray
def test_prepare_with_ray_data_actors(ray_local, manifest, tmp_path):
    summary = run_prepare(str(manifest), "manifest", str(tmp_path / "prep"), workers=2,
                          batch_size=1)
    assert summary["workers"] == 2 and summary["images"] == 4
    _check_prepared(tmp_path / "prep", manifest)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(not UTKFACE.is_dir(), reason=f"UTKFace not present at {UTKFACE}")
def test_prepare_utkface_chips_keeps_names(ray_local, tmp_path):
    summary = run_prepare(str(UTKFACE), "utkface", str(tmp_path / "prep"), limit=6,
                          detector=DetectorConfig(pad="always"), workers=1)
    assert summary["with_face"] == 6
    index = pd.read_csv(tmp_path / "prep" / "index.csv")
    # Same file names as the chips, so the hash split of the raw data carries over.
    assert [Path(c).name for c in index["crop_path"]] == [Path(s).name for s in
                                                           index["source_path"]]


def test_crop_name(tmp_path):
    assert crop_name(str(tmp_path / "a" / "b.jpg"), tmp_path) == "a/b.jpg"
    assert crop_name(str(tmp_path / "x.png"), tmp_path) == "x.png.jpg"
    assert crop_name("/elsewhere/y.jpeg", tmp_path) == "y.jpeg"
