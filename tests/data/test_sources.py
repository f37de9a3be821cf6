"""Several data sources (issue 12): reading and checking them, AAF names, CSV labels, weighted
sampling, per-source splits and metrics, the prepare cache, and a multi-source Ray Train run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from faceage.config import BalanceConfig, DataConfig, SourceConfig, load_config
from faceage.data.prepared_sources import prepare_source
from faceage.data.readers import (
    FORMATS,
    DataFormat,
    LoadReport,
    parse_aaf_name,
    read_aaf,
    read_dataset,
    read_manifest,
)
from faceage.data.sampling import (
    WeightedDrawSampler,
    age_band,
    band_labels,
    draw_probabilities,
    draw_shares,
    train_sampler,
)
from faceage.data.sources import read_sources, resolve_sources
from faceage.data.split import assign_split
from faceage.errors import UserError
from faceage.training.metrics import source_val_metrics

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_aaf_images(folder: Path, names: list[str], size: int = 24) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(names):
        Image.fromarray(np.full((size, size, 3), i * 7 % 255, np.uint8)).save(folder / name)
        out.append(folder / name)
    return out


def sources(*items: dict, **data) -> DataConfig:
    return DataConfig(sources=[SourceConfig(**i) for i in items], limit=None, **data)


@pytest.mark.parametrize("name, expected", [
    ("00001A02.jpg", (2, "female")),
    ("07380A30.jpg", (30, "female")),
    ("07381A30.jpg", (30, "male")),
    ("13322A80.JPG", (80, "male")),
])
def test_aaf_names_give_age_and_gender(name, expected):
    assert parse_aaf_name(name) == expected


@pytest.mark.parametrize("name", ["0001A02.jpg", "00001B02.jpg", "00001A00.jpg", "00001A2.jpg",
                                  "00001A02.png", "25_0_1_2017.jpg.chip.jpg"])
def test_aaf_names_that_do_not_parse(name):
    assert parse_aaf_name(name) is None


def test_read_aaf_counts_other_names(tmp_path):
    write_aaf_images(tmp_path, ["00001A02.jpg", "08000A41.jpg", "holiday.jpg"])
    df, report = read_aaf(tmp_path)
    assert list(df["age"]) == [2.0, 41.0] and list(df["gender"]) == ["female", "male"]
    assert set(df["group"]) == {"AAF"}
    assert report.skipped == {"names not like NNNNNAaa.jpg": ["holiday.jpg"]}


def test_rows_carry_source_age_gender_group(tmp_path, utkface_images):
    utk = tmp_path / "utk"
    utkface_images(utk, 6)
    write_aaf_images(tmp_path / "aaf", ["00001A02.jpg", "08000A41.jpg"])
    table, _, specs = read_sources(sources({"format": "utkface", "path": str(utk)},
                                           {"format": "aaf", "path": str(tmp_path / "aaf")}))
    assert [s.name for s in specs] == ["utkface", "aaf"]
    assert list(table.columns) == ["path", "age", "age_low", "age_high", "gender", "group",
                                   "source", "origin", "split"]
    assert (table["age_low"] == table["age"]).all() and (table["age_high"] == table["age"]).all()
    assert set(table["source"]) == {"utkface", "aaf"}
    utk_rows = table[table.source == "utkface"]
    assert set(utk_rows["gender"]) <= {"male", "female"}
    assert set(utk_rows["group"]) <= {"White", "Black", "Asian", "Indian", "Others"}
    assert list(table[table.source == "aaf"]["group"]) == ["AAF", "AAF"]


def test_csv_source_reads_gender_and_group(tmp_path, utkface_images):
    paths = utkface_images(tmp_path / "img", 4)
    csv = tmp_path / "faces.csv"
    pd.DataFrame({"path": [p.name for p in paths], "age": [20, 30, 40, 50],
                  "gender": ["F", "male", "", "woman"], "group": ["a", "b", None, "a"]}
                 ).to_csv(csv, index=False)
    (tmp_path / "img" / "faces.csv").write_text(csv.read_text())
    table, _, specs = read_sources(sources({"format": "csv", "path": str(tmp_path / "img" /
                                                                           "faces.csv")}))
    assert specs[0].needs_prepare  # a raw csv source is detected and cropped before training
    assert list(table["gender"]) == ["female", "male", "unknown", "female"]
    assert list(table["group"]) == ["a", "b", "", "a"]
    assert list(table["age"]) == [20.0, 30.0, 40.0, 50.0]


def test_source_names_default_to_the_format_and_stay_unique(tmp_path):
    specs = resolve_sources(sources({"format": "utkface", "path": "a"},
                                    {"format": "utkface", "path": "b", "weight": 2},
                                    {"format": "aaf", "path": "c", "name": "asian", "limit": 5}))
    assert [s.name for s in specs] == ["utkface", "utkface-2", "asian"]
    assert specs[1].weight == 2 and specs[2].limit == 5 and specs[0].limit is None


def test_one_source_keys_become_a_one_item_sources_list(tmp_path, utkface_images):
    utkface_images(tmp_path, 30)
    data = DataConfig(path=str(tmp_path), limit=20)
    assert data.sources == [SourceConfig(format="utkface", path=str(tmp_path))]
    assert "format" not in data.model_dump() and "path" not in data.model_dump()
    table, report, specs = read_sources(data)
    # The rows, split and report of the format's reader with the limit, as before sources.
    before, before_report = read_dataset("utkface", tmp_path, 20)
    assert [s.name for s in specs] == ["utkface"] and specs[0].limit == 20
    assert list(table["path"]) == list(before["path"])
    assert list(table["split"]) == list(assign_split(before["path"].tolist(), data.split))
    assert report.summary() == before_report.summary()
    # configs/train.yaml is one source, read exactly so.
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "train.yaml")
    assert cfg.data.sources == [SourceConfig(format="utkface", path="../shared/data/utkface")]
    assert [s.name for s in resolve_sources(cfg.data)] == ["utkface"]
    # A saved config of an earlier version (every key, the defaults beside sources) still loads.
    old = cfg.to_dict()
    old["data"].update(format="utkface", path="../shared/data/utkface", sources=None)
    assert DataConfig.model_validate(old["data"]) == cfg.data
    multi = load_config(Path(__file__).resolve().parents[2] / "configs" / "multi.yaml")
    saved = {**multi.to_dict()["data"], "format": "utkface", "path": "../shared/data/utkface"}
    assert DataConfig.model_validate(saved) == multi.data


def test_old_manifest_and_prepared_formats_keep_their_meaning(tmp_path, utkface_images):
    paths = utkface_images(tmp_path / "img", 6)
    csv = tmp_path / "faces.csv"
    csv.write_text("path,age\n" + "".join(f"img/{p.name},{20 + i}\n" for i, p in enumerate(paths)))
    manifest = resolve_sources(DataConfig(format="manifest", path=str(csv)))[0]
    assert (manifest.name, manifest.prepared, manifest.needs_prepare) == ("manifest", False, False)
    # A prepare index: prepared, used whole, split by its crops' names.
    out = tmp_path / "prep"
    (out / "crops").mkdir(parents=True)
    crops = [f"crops/{p.name}.jpg" for p in paths]
    pd.DataFrame({"source_path": [str(p) for p in paths], "crop_path": crops,
                  "age": range(20, 26)}).to_csv(out / "index.csv", index=False)
    data = DataConfig(format="prepared", path=str(out), limit=None)
    spec = resolve_sources(data)[0]
    assert (spec.name, spec.prepared, spec.needs_prepare) == ("prepared", True, False)
    table, _, _ = read_sources(data)
    assert list(table["split"]) == list(assign_split(crops, data.split))
    assert list(table["origin"]) == [os.path.realpath(p) for p in paths]


def test_a_new_format_is_a_reader_and_a_registry_entry(tmp_path, monkeypatch, utkface_images):
    """What a new format needs: its entry in FORMATS; sources, names and splits come with it."""
    paths = utkface_images(tmp_path / "img", 5)
    (tmp_path / "ages.txt").write_text("".join(f"{p} {30 + i}\n" for i, p in enumerate(paths)))

    def read_ages_txt(path):
        rows = [line.split() for line in Path(path).read_text().splitlines()]
        df = pd.DataFrame({"path": [r[0] for r in rows], "age": [float(r[1]) for r in rows]})
        return df, LoadReport(kept=len(df))

    monkeypatch.setitem(FORMATS, "agestxt", DataFormat(read_ages_txt, "path age per line",
                                                       group="txt"))
    table, _, specs = read_sources(DataConfig(sources=[SourceConfig(
        format="agestxt", path=str(tmp_path / "ages.txt"))], limit=None))
    assert specs[0].name == "agestxt" and not specs[0].needs_prepare
    assert list(table["age"]) == [30.0, 31.0, 32.0, 33.0, 34.0]
    assert set(table["group"]) == {"txt"} and set(table["gender"]) == {"unknown"}
    assert read_manifest is FORMATS["csv"].read is FORMATS["manifest"].read


def test_split_of_a_source_does_not_depend_on_the_others(tmp_path, utkface_images):
    utkface_images(tmp_path / "a", 40, seed=1)
    utkface_images(tmp_path / "b", 40, seed=2)
    alone, _, _ = read_sources(sources({"format": "utkface", "path": str(tmp_path / "a")}))
    both, _, _ = read_sources(sources({"format": "utkface", "path": str(tmp_path / "a")},
                                      {"format": "utkface", "path": str(tmp_path / "b")}))
    a = both[both.source == "utkface"].reset_index(drop=True)
    assert list(a["path"]) == list(alone["path"]) and list(a["split"]) == list(alone["split"])
    again, _, _ = read_sources(sources({"format": "utkface", "path": str(tmp_path / "a")}))
    assert list(again["split"]) == list(alone["split"])


def _error(data: DataConfig) -> str:
    with pytest.raises(UserError) as err:
        read_sources(data)
    return str(err.value)


def test_source_errors_name_the_source_and_the_fix(tmp_path, utkface_images):
    utk = tmp_path / "utk"
    utkface_images(utk, 5)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_aaf_images(tmp_path / "badnames", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])

    msg = _error(sources({"format": "fer2013", "path": str(utk), "name": "fer"}))
    assert "data.sources[0] ('fer'): unknown format 'fer2013'; use one of:\n  utkface: " in msg
    assert all(f"\n  {name}: " in msg for name in FORMATS)
    msg = _error(sources({"format": "utkface", "path": str(utk)},
                         {"format": "aaf", "path": str(tmp_path / "nowhere")}))
    assert f"data source 'aaf' (aaf, {tmp_path / 'nowhere'}): AAF folder not found" in msg
    assert "Fix its format or path in the config" in msg
    msg = _error(sources({"format": "aaf", "path": str(tmp_path / "badnames")}))
    assert "no AAF images found" in msg and "4 images with other names (a.jpg, b.jpg, c.jpg)" in msg
    assert "NNNNNAaa.jpg" in msg
    msg = _error(sources({"format": "utkface", "path": str(empty), "name": "mine"}))
    assert "data source 'mine' (utkface," in msg and "no UTKFace images found" in msg
    msg = _error(sources({"format": "utkface", "path": str(utk)},
                         {"format": "utkface", "path": str(utk) + "/"}))
    assert "5 files are in more than one data source ('utkface', 'utkface-2')" in msg
    assert "list each file in one source only" in msg
    msg = _error(sources({"format": "utkface", "path": str(utk), "name": "x"},
                         {"format": "aaf", "path": str(utk), "name": "x"}))
    assert "the name 'x' is used by two sources" in msg
    with pytest.raises(UserError, match="give either data.sources or data.format/data.path"):
        load_config(None, [f"data.sources=[{{format: utkface, path: {utk}}}]",
                           f"data.path={utk}"])
    with pytest.raises(UserError, match="data.sources is empty"):
        load_config(None, ["data.sources=[]"])


def test_a_source_without_validation_images_is_refused(tmp_path, utkface_images):
    from faceage.training.checks import check_split_counts

    cfg = load_config(None, [f"data.sources=[{{format: utkface, path: {tmp_path}}}, "
                             f"{{format: aaf, path: {tmp_path}/b}}]", "train.batch_size=2"])
    table = pd.DataFrame({"split": ["train"] * 4 + ["val", "train"],
                          "source": ["utkface"] * 5 + ["aaf"]})
    with pytest.raises(UserError, match="data source 'aaf': none of its 1 images fell into the "
                                        "validation split"):
        check_split_counts(cfg, table)


def test_equal_weights_draw_every_image_once_per_epoch():
    import torch

    names = ["a"] * 10 + ["b"] * 6
    sampler = train_sampler(list(range(16)), names, {"a": 2.0, "b": 2.0}, 1, 0, seed=0)
    assert isinstance(sampler, torch.utils.data.DistributedSampler)
    sampler.set_epoch(3)
    assert sorted(sampler) == list(range(16))


def test_weights_scale_each_images_draw_probability():
    names = ["a"] * 1000 + ["b"] * 1000
    sampler = train_sampler(list(range(2000)), names, {"a": 1.0, "b": 3.0}, 1, 0, seed=0)
    assert isinstance(sampler, WeightedDrawSampler) and len(sampler) == 2000
    counts = np.zeros(2)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        drawn = np.array(list(sampler))
        counts += [(drawn < 1000).sum(), (drawn >= 1000).sum()]
    assert 2.7 < counts[1] / counts[0] < 3.3  # source b: three times as often per image
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == first  # seeded per epoch: a resumed epoch draws the same
    sampler.set_epoch(2)
    assert list(sampler) != first


def test_weighted_draws_are_sharded_across_workers():
    names = ["a"] * 50 + ["b"] * 51
    weights = {"a": 1.0, "b": 0.5}
    p = draw_probabilities(names, np.zeros(len(names)), weights, BalanceConfig())
    full = WeightedDrawSampler(p, 1, 0, seed=4)
    shards = [WeightedDrawSampler(p, 2, r, seed=4) for r in (0, 1)]
    for s in (full, *shards):
        s.set_epoch(7)
    assert len(shards[0]) == len(shards[1]) == 50  # as DistributedSampler with drop_last
    dealt = [i for pair in zip(list(shards[0]), list(shards[1]), strict=True) for i in pair]
    assert dealt == list(full)[:100]


def test_age_bands_and_their_names():
    edges = [0, 7, 13, 20, 31, 46, 56, 67]
    assert age_band([0, 6.9, 7, 12.5, 19, 20, 45.5, 66, 67, 95], edges).tolist() == [
        0, 0, 1, 1, 2, 3, 4, 6, 7, 7]
    assert band_labels(edges) == ["0-6", "7-12", "13-19", "20-30", "31-45", "46-55", "56-66",
                                  "67+"]
    with pytest.raises(ValueError, match="increasing"):
        BalanceConfig(bands=[0, 20, 10])


def test_band_balance_gives_each_band_its_share():
    # 900 adults, 100 children: full strength gives both bands half of the draws.
    ages = np.array([30.0] * 900 + [5.0] * 100)
    names = ["a"] * 1000
    edges = [0, 13, 20]
    full = draw_probabilities(names, ages, {"a": 1.0}, BalanceConfig(by="band", bands=edges,
                                                                      strength=1.0))
    assert full[ages < 13].sum() == pytest.approx(0.5) and full.sum() == pytest.approx(1.0)
    half = draw_probabilities(names, ages, {"a": 1.0}, BalanceConfig(by="band", bands=edges,
                                                                      strength=0.5))
    assert half[ages < 13].sum() == pytest.approx(10 / (10 + 30))  # sqrt(100) : sqrt(900)
    none = draw_probabilities(names, ages, {"a": 1.0}, BalanceConfig(by="band", bands=edges,
                                                                      strength=0.0))
    assert none == pytest.approx(np.full(1000, 1e-3))
    sampler = train_sampler(list(range(1000)), names, {"a": 1.0}, 1, 0, seed=0, ages=ages,
                            balance=BalanceConfig(by="band", bands=edges, strength=1.0))
    assert isinstance(sampler, WeightedDrawSampler)
    drawn = np.array(list(sampler))
    assert 0.45 < (drawn >= 900).mean() < 0.55


def test_source_band_balance_keeps_each_sources_share():
    # Source a: 600 adults; source b: 300 children and 100 adults. Within b the bands even out;
    # a keeps 600/1000 of the draws (weight 1), b 400/1000.
    names = ["a"] * 600 + ["b"] * 400
    ages = np.array([40.0] * 600 + [3.0] * 300 + [40.0] * 100)
    edges = [0, 13]
    p = draw_probabilities(names, ages, {"a": 1.0, "b": 1.0},
                           BalanceConfig(by="source_band", bands=edges, strength=1.0))
    assert p[:600].sum() == pytest.approx(0.6) and p[600:].sum() == pytest.approx(0.4)
    assert p[600:900].sum() == pytest.approx(0.2) and p[900:].sum() == pytest.approx(0.2)
    shares = draw_shares(p, names, ages, edges)
    assert shares == {"a": {"13+": 0.6}, "b": {"0-12": 0.2, "13+": 0.2}}
    # Source weights still scale a source's share: b drawn twice as often per image.
    p2 = draw_probabilities(names, ages, {"a": 1.0, "b": 2.0},
                            BalanceConfig(by="source_band", bands=edges, strength=1.0))
    assert p2[600:].sum() == pytest.approx(800 / 1400)


def test_val_mae_is_the_mean_over_sources_and_equals_pooled_for_one():
    pred, true = np.array([10.0, 20, 30, 40]), np.array([12.0, 20, 30, 30])
    one = source_val_metrics(pred, true, ["u"] * 4, ["u"])
    assert one["val_mae"] == one["val_mae_all"] == pytest.approx(3.0)
    assert one["val_mae/u"] == pytest.approx(3.0)
    two = source_val_metrics(pred, true, ["u", "u", "u", "a"], ["u", "a"])
    assert two["val_mae/u"] == pytest.approx(2 / 3) and two["val_mae/a"] == pytest.approx(10)
    assert two["val_mae"] == pytest.approx((2 / 3 + 10) / 2)
    assert two["val_mae_all"] == pytest.approx(3.0) and two["val_images/a"] == 1


def test_raw_sources_are_prepared_once_and_reused(tmp_path, astronaut_path, rocket_path,
                                                  monkeypatch):
    """A raw csv source goes through prepare's code (in process here) once; a faceless image is
    left out and counted; the second time the cached crops are reused without detecting."""
    import shutil

    shutil.copy(astronaut_path, tmp_path / "astronaut.jpg")
    shutil.copy(rocket_path, tmp_path / "rocket.jpg")
    (tmp_path / "faces.csv").write_text("path,age,gender\nastronaut.jpg,40,f\nrocket.jpg,30,m\n")
    data = sources({"format": "csv", "path": str(tmp_path / "faces.csv")},
                   prepared_dir=str(tmp_path / "prepared"))
    table, _, specs = read_sources(data)
    lines: list[str] = []
    report = LoadReport()
    first = prepare_source(specs[0], table, data, report, local=True, say=lines.append)
    assert len(first) == 1 and Path(first["path"].iloc[0]).name == "astronaut.jpg"
    assert Path(first["path"].iloc[0]).is_file() and "prepared" in first["path"].iloc[0]
    assert first["gender"].iloc[0] == "female" and first["split"].iloc[0] == table["split"][0]
    assert list(report.skipped) == ["csv: images without a detected face"]
    assert "preparing 2 images once" in lines[0]

    def no_second_prepare(*a, **k):
        raise AssertionError("prepared again")

    monkeypatch.setattr("faceage.data.prepared_sources.prepare_table", no_second_prepare)
    again = prepare_source(specs[0], table, data, LoadReport(), local=True, say=lines.append)
    assert list(again["path"]) == list(first["path"])
    assert "reusing the prepared crops" in lines[-1]
    meta = json.loads(next((tmp_path / "prepared").glob("csv-*/prepare.json")).read_text())
    assert meta["crop_size"] == 200 and meta["crop_policy"]["name"] == "utkface-chip"

    # A subset (as a smaller limit gives) is served from the larger prepared set.
    subset = prepare_source(specs[0], table.iloc[:1], data, LoadReport(), local=True,
                            say=lines.append)
    assert list(subset["path"]) == list(first["path"])
    assert "reusing 1 images' crops from the prepared set" in lines[-1]
    assert len(list((tmp_path / "prepared").glob("csv-*/prepare.json"))) == 1

    # A copy of the data (new modification times, the same bytes) still finds its crops.
    later = time.time() + 5
    for name in ("astronaut.jpg", "rocket.jpg"):
        os.utime(tmp_path / name, (later, later))
    table, _, specs = read_sources(data)
    copied = prepare_source(specs[0], table, data, LoadReport(), local=True, say=lines.append)
    assert list(copied["path"]) == list(first["path"])
    assert "(the same files, by their bytes)" in lines[-1]

    # An image whose bytes changed after the prepare is not served from it: prepared anew.
    monkeypatch.undo()
    with Image.open(tmp_path / "astronaut.jpg") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "astronaut.jpg")
    table, _, specs = read_sources(data)
    fresh = prepare_source(specs[0], table.iloc[:1], data, LoadReport(), local=True,
                           say=lines.append)
    assert "preparing 1 images once" in lines[-2] and len(fresh) == 1
    assert fresh["path"].iloc[0] != first["path"].iloc[0]
    assert len(list((tmp_path / "prepared").glob("csv-*/prepare.json"))) == 2


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)
@pytest.mark.skipif(not (SHARED_DATA / "utkface").is_dir() or not (SHARED_DATA / "aaf").is_dir(),
                    reason=f"UTKFace and AAF not present under {SHARED_DATA}")
def test_utkface_and_aaf_train_together_with_per_source_metrics(ray_local, tmp_path, capsys):
    from faceage.inference.modelfile import load_model_file
    from faceage.training.driver import run_training

    cfg = load_config(None, [
        f"data.sources=[{{format: utkface, path: {SHARED_DATA / 'utkface'}, limit: 80}}, "
        f"{{format: aaf, path: {SHARED_DATA / 'aaf'}, limit: 80, weight: 2}}]",
        f"data.prepared_dir={tmp_path / 'prepared'}", f"data.cache_dir={tmp_path / 'decoded'}",
        f"storage_path={tmp_path}", "name=multi", "model.pretrained=none",
        "model.input_size=32", "model.head_hidden=16", "train.batch_size=8",
        "train.max_steps_per_epoch=3", "train.eval_tta=false", "scaling.num_workers=1",
        "scaling.cpus_per_worker=1", "schedule.stages=[{name: head, train: 0, epochs: 1}]"])
    outcome = run_training(cfg)
    out = capsys.readouterr().out
    assert "aaf: preparing 80 images once" in out
    split = pd.read_csv(outcome.run_dir / "split.csv")
    assert set(split["source"]) == {"utkface", "aaf"}
    assert set(split.loc[split.source == "aaf", "group"]) == {"AAF"}
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    best = summary["best"]
    for key in ("val_mae", "val_mae_all", "val_mae/utkface", "val_mae/aaf"):
        assert np.isfinite(best[key]), key
    assert best["val_mae"] == pytest.approx((best["val_mae/utkface"] + best["val_mae/aaf"]) / 2)
    assert set(summary["data"]["sources"]) == {"utkface", "aaf"}
    meta = load_model_file(outcome.model_path).metadata
    assert [s["name"] for s in meta["data"]["sources"]] == ["utkface", "aaf"]
    assert meta["data"]["sources"][1]["train"] == summary["data"]["sources"]["aaf"]["train"]
    assert "val_mae/aaf" in meta["metrics"]


def test_band_metrics_weigh_every_age_band_the_same():
    from faceage.training.metrics import band_val_metrics

    # Nine adults read exactly, one child read 6 years too old; a range label scores 0 inside.
    pred = np.array([30.0] * 9 + [10.0, 50.0])
    low = np.array([30.0] * 9 + [4.0, 46.0])
    high = np.array([30.0] * 9 + [4.0, 55.0])
    m = band_val_metrics(pred, low, high, [0, 13, 46])
    assert m["val_signed/0-12"] == pytest.approx(6.0) and m["val_signed/13-45"] == 0.0
    assert m["val_signed/46_plus"] == 0.0  # MLflow takes no "+" in a metric name
    assert m["val_band_mae"] == pytest.approx(2.0)  # (6 + 0 + 0) / 3, not 6 / 11
