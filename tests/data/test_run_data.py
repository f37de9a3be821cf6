"""A training run's data (``faceage.data.run_data.RunData``): read once, decoded once, shipped
to the workers whole, and what export reads from it (sources, counts, crop policy)."""

from __future__ import annotations

import json
import pickle

import pandas as pd

from faceage.config import DataConfig, SourceConfig
from faceage.data.run_data import UTKFACE_CHIP_POLICY, RunData
from faceage.data.sources import TABLE_COLUMNS
from faceage.training.export import data_metadata


def two_sources(tmp_path, utkface_images, weight: float = 1.0) -> DataConfig:
    utkface_images(tmp_path / "a", 30, seed=1)
    utkface_images(tmp_path / "b", 20, seed=2)
    return DataConfig(sources=[SourceConfig(format="utkface", path=str(tmp_path / "a")),
                               SourceConfig(format="utkface", path=str(tmp_path / "b"),
                                            name="other", weight=weight)],
                      limit=None, cache_dir=str(tmp_path / "cache"))


def test_read_splits_every_source_without_opening_an_image(tmp_path, utkface_images):
    data = RunData.read(two_sources(tmp_path, utkface_images, weight=3.0))
    assert list(data.table.columns) == TABLE_COLUMNS and data.cache is None
    assert data.source_names == ["utkface", "other"]
    assert data.source_weights == {"utkface": 1.0, "other": 3.0}
    counts = data.counts()
    assert {n: c["images"] for n, c in counts.items()} == {"utkface": 30, "other": 20}
    assert sum(c["train"] + c["val"] + c["test"] for c in counts.values()) == 50
    assert (data.source_column("val") == data.subset("val")["source"].to_numpy()).all()
    assert data.crop_policy == UTKFACE_CHIP_POLICY  # UTKFace chips alone


def test_the_crop_policy_of_a_prepared_source_is_its_prepare_json(tmp_path, utkface_images):
    chips = utkface_images(tmp_path / "crops", 6)
    pd.DataFrame({"source_path": [str(p) for p in chips], "crop_path": [p.name for p in chips],
                  "age": [20 + i for i in range(6)]}).to_csv(tmp_path / "crops" / "index.csv",
                                                              index=False)
    (tmp_path / "crops" / "prepare.json").write_text(
        json.dumps({"crop_policy": {"name": "aligned", "scale": 2.0}}))
    data = RunData.read(DataConfig(sources=[SourceConfig(format="prepared",
                                                         path=str(tmp_path / "crops"))]))
    assert data.crop_policy == {"name": "aligned", "scale": 2.0}
    assert len(data.table) == 6


def test_decoded_data_ships_to_a_worker_whole(tmp_path, utkface_images):
    cfg = two_sources(tmp_path, utkface_images)
    data = RunData.read(cfg).decoded(cfg, input_size=32, progress=False)
    assert data.cache is not None and "cache_index" in data.table.columns
    summary = data.summary()
    assert summary["images"] == 50 and set(summary["sources"]) == {"utkface", "other"}

    shipped = pickle.loads(pickle.dumps(data.ship()))  # what the object store does
    on_worker = RunData.from_shipped(shipped)
    assert on_worker.summary() == summary
    assert on_worker.sources == data.sources and on_worker.crop_policy == data.crop_policy
    pd.testing.assert_frame_equal(on_worker.table, data.table)


def test_the_model_files_data_lists_each_source_with_its_counts(tmp_path, utkface_images):
    cfg = two_sources(tmp_path, utkface_images)
    data = RunData.read(cfg)
    summary = {"train": 1, "sources": data.counts()}
    meta = data_metadata(data, cfg.split, summary)
    assert meta["format"] == "sources" and meta["path"] is None and meta["train"] == 1
    assert [s["name"] for s in meta["sources"]] == ["utkface", "other"]
    assert meta["sources"][1]["images"] == 20 and meta["sources"][1]["path"].endswith("b")
    assert meta["split"] == cfg.split.model_dump()

    one = RunData.read(DataConfig(sources=cfg.sources[:1], limit=None))
    meta = data_metadata(one, cfg.split, {})
    assert meta["format"] == "utkface" and meta["path"] == cfg.sources[0].path
