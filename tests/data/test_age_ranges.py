"""Age-range labels (issue 20): a CSV row with ``age_low,age_high`` instead of ``age``, read,
split by a key column (``split_by``), trained on (the range loss and the censored Laplace
likelihood) and evaluated (range accuracy, within one range, distance, signed error per range).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from faceage.cli import main
from faceage.config import DataConfig, SourceConfig, SplitConfig, load_config
from faceage.data.prepare import detector_metadata, prepare_detector
from faceage.data.prepared_sources import prepare_key, prepare_source
from faceage.data.readers import LoadReport, read_manifest, read_prepared
from faceage.data.run_data import SPLIT_COLUMNS, RunData
from faceage.data.sources import read_sources
from faceage.data.split import split_by_key
from faceage.errors import UserError
from faceage.training.loop import make_loss, range_loss
from faceage.training.metrics import range_val_metrics, source_val_metrics

KFAD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kfad"
KFAD_RANGES = [(0, 6), (7, 12), (13, 19), (20, 30), (31, 45), (46, 55), (56, 66), (67, 80)]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def family_manifest(folder: Path, utkface_images, families: int = 40, per_family: int = 2,
                    seed: int = 7) -> Path:
    """Generated chips in a manifest: even families labelled by KFAD's ranges, odd ones by exact
    ages, each row with its ``family``."""
    paths = utkface_images(folder / "img", families * per_family, seed=seed)
    rows = []
    for i, p in enumerate(paths):
        family = i // per_family
        age = int(p.name.split("_")[0])
        if family % 2 == 0:
            lo, hi = next(r for r in KFAD_RANGES if r[0] <= min(age, 80) <= r[1])
            rows.append(f"img/{p.name},,{lo},{hi},F{family:02d}")
        else:
            rows.append(f"img/{p.name},{age},,,F{family:02d}")
    return write_csv(folder / "faces.csv", "path,age,age_low,age_high,family\n"
                     + "\n".join(rows) + "\n")


# -- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, why", [
    ("a.jpg,,30,20", "age_low 30 is above age_high 20"),
    ("a.jpg,,-1,6", "age_low -1 is outside 0-120"),
    ("a.jpg,,60,121", "age_high 121 is outside 0-120"),
    ("a.jpg,130,,", "age 130 is outside 0-120"),
    ("a.jpg,30,20,40", "has both age and age_low/age_high"),
    ("a.jpg,,,", "has no age"),
    ("a.jpg,,20,", "has age_low but no age_high"),
    ("a.jpg,thirty,,", "age 'thirty' is not a number"),
    ("a.jpg,,7,twelve", "age_high 'twelve' is not a number"),
])
def test_a_bad_row_names_the_file_and_its_line(tmp_path, row, why):
    # Line 1 is the header, line 2 a good row, line 3 blank (pandas skips it), line 4 the bad one.
    csv = write_csv(tmp_path / "labels.csv",
                    f"path,age,age_low,age_high\nok.jpg,20,,\n\n{row}\nok2.jpg,,0,6\n")
    with pytest.raises(UserError) as err:
        read_manifest(csv)
    assert str(err.value).startswith(f"{csv}, line 4: {why}")


def test_several_bad_rows_are_listed_with_their_lines(tmp_path):
    csv = write_csv(tmp_path / "labels.csv", "path,age_low,age_high\n"
                    + "".join(f"{i}.jpg,{9 + i},{i}\n" for i in range(7)))
    message = str(pytest.raises(UserError, read_manifest, csv).value)
    assert f"{csv}: 7 rows have bad age labels" in message
    assert "line 2: age_low 9 is above age_high 0" in message and "... and 2 more" in message


def test_missing_label_columns_are_named(tmp_path):
    csv = write_csv(tmp_path / "half.csv", "path,age_low\na.jpg,3\n")
    with pytest.raises(UserError, match=r"half.csv needs columns path and age, or path, age_low "
                                        r"and age_high.*missing \['age_high'\]"):
        read_manifest(csv)


def test_labels_become_ranges_an_exact_age_its_own(tmp_path):
    from faceage.data.age_labels import manifest_ages, with_age_range

    rows = pd.DataFrame({"path": ["a", "b"], "age": [30, None], "age_low": [None, 7],
                         "age_high": [None, 12]})
    ages = manifest_ages(rows, tmp_path / "labels.csv")  # the path only names the file in errors
    assert ages[["age", "age_low", "age_high"]].values.tolist() == [[30, 30, 30], [9.5, 7, 12]]
    exact = with_age_range(pd.DataFrame({"age": [4, 50]}))
    assert exact["age_low"].tolist() == exact["age_high"].tolist() == [4.0, 50.0]
    assert with_age_range(ages).equals(ages)


def test_mixed_rows_carry_their_ranges_to_the_table_and_split_csv(tmp_path, utkface_images):
    paths = utkface_images(tmp_path / "img", 4)
    csv = write_csv(tmp_path / "faces.csv", "path,age,age_low,age_high\n"
                    f"img/{paths[0].name},30,,\nimg/{paths[1].name},,0,6\n"
                    f"img/{paths[2].name},,31,45\nimg/{paths[3].name},0,,\n")
    df, report = read_manifest(csv)
    assert list(df["age"]) == [30.0, 3.0, 38.0, 0.0]  # a range's age is its middle
    assert list(df["age_low"]) == [30.0, 0.0, 31.0, 0.0]
    assert list(df["age_high"]) == [30.0, 6.0, 45.0, 0.0]
    assert report.kept == 4

    data = RunData.read(DataConfig(sources=[SourceConfig(format="manifest", path=str(csv))],
                                   limit=None))
    assert list(data.table["age_low"]) == [30.0, 0.0, 31.0, 0.0] and data.has_ranges
    assert list(data.split_table().columns) == [*SPLIT_COLUMNS, "age_low", "age_high"]
    assert data.counts()["manifest"]["ranges"] == 2


def test_split_csv_of_exact_ages_keeps_its_columns(tmp_path, utkface_images):
    utkface_images(tmp_path / "utk", 6)
    data = RunData.read(DataConfig(path=str(tmp_path / "utk"), limit=None))
    assert not data.has_ranges and list(data.split_table().columns) == SPLIT_COLUMNS
    assert "ranges" not in data.counts()["utkface"]


def test_the_decoded_target_is_the_range(tmp_path, utkface_images):
    csv = family_manifest(tmp_path, utkface_images, families=10)
    cfg = DataConfig(sources=[SourceConfig(format="manifest", path=str(csv))], limit=None,
                     cache_dir=str(tmp_path / "cache"), split=SplitConfig(val=0.0, test=0.0))
    data = RunData.read(cfg).decoded(cfg, input_size=32, progress=False)
    train = data.subset("train")
    targets = np.stack([t.numpy() for _, t in data.dataset("train")])
    assert np.array_equal(targets, train[["age_low", "age_high"]].to_numpy(np.float32))
    assert (targets[:, 0] < targets[:, 1]).any() and (targets[:, 0] == targets[:, 1]).any()
    summary = data.summary()
    assert summary["ranges"] == 10 and summary["sources"]["manifest"]["ranges"] == 10


# -- the split key -------------------------------------------------------------------------------


def test_split_by_keeps_each_family_in_one_split(tmp_path, utkface_images):
    csv = family_manifest(tmp_path, utkface_images, families=30, per_family=4)
    split = SplitConfig(val=0.2, test=0.2, seed=3)
    data = DataConfig(sources=[SourceConfig(format="manifest", path=str(csv),
                                            split_by="family")], limit=None, split=split)
    table, _, specs = read_sources(data)
    assert specs[0].split_by == "family" and specs[0].describe()["split_by"] == "family"
    families = pd.read_csv(csv)["family"].to_numpy()
    assert table.assign(family=families).groupby("family")["split"].nunique().max() == 1
    # The same hash rule as file names, on the key.
    assert list(table["split"]) == list(split_by_key(list(families), split))
    assert set(table["split"]) == {"train", "val", "test"}
    # By file name (the default), families straddle the splits.
    by_file, _, _ = read_sources(DataConfig(sources=[SourceConfig(format="manifest",
                                                                  path=str(csv))],
                                            limit=None, split=split))
    assert by_file.assign(family=families).groupby("family")["split"].nunique().max() > 1


def test_split_by_a_missing_column_names_the_source_and_its_columns(tmp_path, utkface_images):
    csv = family_manifest(tmp_path, utkface_images, families=4)
    data = DataConfig(sources=[SourceConfig(format="manifest", path=str(csv), name="kids",
                                            split_by="household")], limit=None)
    message = str(pytest.raises(UserError, read_sources, data).value)
    assert "data source 'kids'" in message and "'household' is not one of its columns" in message
    assert "family" in message and "age_low" in message

    text = csv.read_text().splitlines()
    text[1] = text[1].rsplit(",", 1)[0] + ","  # a row without a family
    csv.write_text("\n".join(text) + "\n")
    data.sources[0].split_by = "family"
    with pytest.raises(UserError, match="data source 'kids'.*1 rows have no 'family' value"):
        read_sources(data)


# -- prepare -------------------------------------------------------------------------------------


def test_prepare_keeps_ranges_and_the_split_column(tmp_path, astronaut_path, rocket_path):
    from faceage.data.prepare import DIGEST_COLUMN, INDEX_COLUMNS, file_digest, run_prepare

    shutil.copy(astronaut_path, tmp_path / "astronaut.jpg")
    shutil.copy(rocket_path, tmp_path / "rocket.jpg")
    csv = write_csv(tmp_path / "faces.csv", "path,age,age_low,age_high,family\n"
                    "astronaut.jpg,,31,45,F1\nrocket.jpg,30,,,F2\n")
    run_prepare(str(csv), "csv", str(tmp_path / "out"), local=True)
    index = pd.read_csv(tmp_path / "out" / "index.csv")
    assert list(index.columns) == [*INDEX_COLUMNS, "family", DIGEST_COLUMN]
    assert index[DIGEST_COLUMN].iloc[0] == file_digest(tmp_path / "astronaut.jpg")
    df, _ = read_prepared(tmp_path / "out")
    assert (df["age_low"].iloc[0], df["age_high"].iloc[0], df["age"].iloc[0]) == (31, 45, 38)
    data = DataConfig(sources=[SourceConfig(format="prepared", path=str(tmp_path / "out"),
                                            split_by="family")], limit=None)
    table, _, _ = read_sources(data)
    assert list(table["split"]) == list(split_by_key(["F1"], data.split))


def test_a_prepared_cache_from_before_ranges_is_read_with_todays_labels(tmp_path,
                                                                        astronaut_path):
    """The cache gives crops only: an index written before ranges (no age_low/age_high, its own
    ages) leaves the rows' ranges as the CSV says them now."""
    from faceage.inference.alignment import CropPolicy

    shutil.copy(astronaut_path, tmp_path / "astronaut.jpg")
    csv = write_csv(tmp_path / "faces.csv", "path,age_low,age_high\nastronaut.jpg,31,45\n")
    data = DataConfig(sources=[SourceConfig(format="csv", path=str(csv))], limit=None,
                      prepared_dir=str(tmp_path / "prepared"))
    table, _, specs = read_sources(data)
    # The detector settings as every prepared set so far recorded them (before decode_side and
    # the photo profile's min_face_fraction): such sets must still be found.
    detector = {"min_face_size": 20, "min_face_fraction": 0.0, "thresholds": [0.6, 0.7, 0.7],
                "min_score": 0.9, "factor": 0.709, "max_side": 1280, "pad": "auto",
                "pad_fraction": 0.3, "max_faces": 100}
    assert detector_metadata(prepare_detector()) == detector
    key = prepare_key(table["origin"].tolist(), CropPolicy().to_metadata(), 200, detector)
    old = tmp_path / "prepared" / f"csv-{key}"
    (old / "crops").mkdir(parents=True)
    shutil.copy(astronaut_path, old / "crops" / "astronaut.jpg")
    pd.DataFrame({"source_path": table["origin"], "crop_path": ["crops/astronaut.jpg"],
                  "age": [99], "gender": [-1], "race": [-1], "group": [""], "status": ["ok"]}
                 ).to_csv(old / "index.csv", index=False)
    (old / "prepare.json").write_text("{}")
    lines: list[str] = []
    rows = prepare_source(specs[0], table, data, LoadReport(), local=True, say=lines.append)
    assert "reusing the prepared crops" in lines[-1]
    assert (rows["age_low"].iloc[0], rows["age_high"].iloc[0], rows["age"].iloc[0]) == \
        (31, 45, 38)
    assert rows["path"].iloc[0] == str(old / "crops" / "astronaut.jpg")


# -- the losses ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["l1", "smooth_l1", "mse"])
def test_range_loss_of_exact_rows_is_todays_loss_bit_for_bit(name):
    torch.manual_seed(0)
    pred = (torch.randn(64) * 20 + 40).requires_grad_()
    y = torch.randint(1, 90, (64,)).float()
    loss_fn = make_loss(name)
    today = loss_fn(pred, y)
    (g_today,) = torch.autograd.grad(today, pred)
    ranged = range_loss(loss_fn, pred, y, y)
    (g_ranged,) = torch.autograd.grad(ranged, pred)
    assert torch.equal(today, ranged) and torch.equal(g_today, g_ranged)


def test_range_loss_is_zero_inside_and_the_distance_to_the_nearer_end_outside():
    pred = torch.tensor([3.0, 10.0, 50.0, 25.0, 40.0], requires_grad=True)
    low = torch.tensor([0.0, 13.0, 31.0, 20.0, 40.0])
    high = torch.tensor([6.0, 19.0, 45.0, 30.0, 40.0])  # the last row: an exact age
    loss = range_loss(make_loss("l1"), pred, low, high)
    assert loss.item() == pytest.approx((0 + 3 + 5 + 0 + 0) / 5)
    loss.backward()
    assert pred.grad.tolist() == pytest.approx([0, -0.2, 0.2, 0, 0])
    mse = range_loss(make_loss("mse"), pred.detach(), low, high)
    assert mse.item() == pytest.approx((9 + 25) / 5)


def laplace_cdf(x: float, mu: float, b: float) -> float:
    z = (x - mu) / b
    return 0.5 * math.exp(z) if z < 0 else 1 - 0.5 * math.exp(-z)


def test_censored_laplace_nll_is_minus_log_the_range_probability():
    from faceage.models.network import laplace_nll, laplace_range_nll

    age_std = torch.tensor(15.0)
    ages = torch.tensor([3.0, 40.0, 10.0, 60.0, 25.0, 33.0])
    log_scale = torch.tensor([-1.0, 0.5, -0.3, 0.0, 1.5, -2.0])
    low = torch.tensor([0.0, 31.0, 13.0, 20.0, 20.0, 33.0])
    high = torch.tensor([6.0, 45.0, 19.0, 30.0, 30.0, 33.0])  # the last row: an exact age
    nll = laplace_range_nll(ages, log_scale, low, high, age_std)
    terms = []
    for a, s, lo, hi in zip(ages.tolist(), log_scale.tolist(), low.tolist(), high.tolist(),
                            strict=True):
        b = math.exp(s)
        if lo == hi:
            terms.append(abs(hi - a) / 15 / b + s)  # laplace_nll's point term
        else:
            terms.append(-math.log(laplace_cdf(hi / 15, a / 15, b)
                                   - laplace_cdf(lo / 15, a / 15, b)))
    assert nll.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)

    # Exact rows alone: laplace_nll's value, bit for bit.
    y = torch.tensor([5.0, 25.0, 45.0, 80.0, 33.0, 33.0])
    assert torch.equal(laplace_range_nll(ages, log_scale, y, y, age_std),
                       laplace_nll(ages, log_scale, y, age_std))


def test_censored_laplace_nll_stays_finite_far_from_the_range():
    from faceage.models.network import laplace_range_nll

    log_scale = torch.tensor([-6.0, -6.0, 2.0, 0.0], requires_grad=True)
    ages = torch.tensor([90.0, 0.0, 40.0, 40.0])
    low, high = torch.tensor([0.0, 67.0, 0.0, 40.0]), torch.tensor([6.0, 80.0, 120.0, 40.0])
    nll = laplace_range_nll(ages, log_scale, low, high, torch.tensor(15.0))
    nll.backward()
    assert torch.isfinite(nll) and torch.isfinite(log_scale.grad).all()
    # 84 years below the age at scale e^-6 standard units: -log P ~ 84/15 * e^6 + log 2.
    far = laplace_range_nll(ages[:1], log_scale[:1].detach(), low[:1], high[:1],
                            torch.tensor(15.0))
    assert far.item() == pytest.approx(84 / 15 * math.exp(6) + math.log(2), rel=1e-4)


def _head_epoch(images: torch.Tensor, targets: torch.Tensor):
    """One head-only epoch of a small laplace model on ``images`` and ``targets`` (ages, or
    ranges as (N, 2)), seeded: its stats and the trained weights."""
    from faceage.config import AugmentConfig, ScheduleConfig, StageConfig
    from faceage.data.augment import BatchAugment
    from faceage.models.network import build_model
    from faceage.training.loop import StepContext, build_optimizer, train_one_epoch
    from faceage.training.schedule import UnfreezeSchedule

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", "none", head_hidden=8, dropout=0.0,
                        uncertainty="laplace")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets),
                                         batch_size=3)
    cfg = ScheduleConfig(stages=[StageConfig(name="head", train=0, epochs=1, lr=0.01)])
    schedule = UnfreezeSchedule(cfg, model.group_names(), steps_per_epoch=2)
    ctx = StepContext(torch.device("cpu"), None, channels_last=False, scaler=None)
    opt = build_optimizer(model, schedule, schedule.stage_at(0), weight_decay=0.0)
    stats = train_one_epoch(model, loader, opt, schedule, 0, make_loss("l1"), ctx,
                            BatchAugment(32, AugmentConfig()), None)
    return stats, model.state_dict()


def test_an_epoch_on_exact_ranges_is_an_epoch_on_ages_bit_for_bit():
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    ages = torch.tensor([5.0, 18, 27, 33, 61, 80])
    plain = _head_epoch(images, ages)
    ranged = _head_epoch(images, torch.stack([ages, ages], dim=1))
    assert plain[0]["loss_sum"] == ranged[0]["loss_sum"]
    assert plain[0]["abs_sum"] == ranged[0]["abs_sum"]
    assert all(torch.equal(v, ranged[1][k]) for k, v in plain[1].items())


def test_an_epoch_trains_on_range_targets():
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    targets = torch.tensor([[0.0, 6], [31, 45], [20, 20], [7, 12], [50, 50], [67, 80]])
    stats, _ = _head_epoch(images, targets)
    assert stats["images"] == 6 and np.isfinite(stats["loss_sum"])
    assert np.isfinite(stats["abs_sum"]) and stats["abs_sum"] >= 0


def test_validation_scores_ranges_by_their_distance():
    pred = np.array([3.0, 10.0, 50.0, 25.0, 41.0])
    low = np.array([0.0, 13.0, 31.0, 20.0, 40.0])
    high = np.array([6.0, 19.0, 45.0, 30.0, 40.0])
    sources = np.array(["kfad", "kfad", "kfad", "kfad", "utk"])
    val = source_val_metrics(pred, np.clip(pred, low, high), sources, ["kfad", "utk"])
    assert val["val_mae/kfad"] == pytest.approx((0 + 3 + 5 + 0) / 4)
    assert val["val_mae/utk"] == pytest.approx(1.0)
    assert range_val_metrics(pred, low, high, sources, ["kfad", "utk"]) == \
        {"val_range_acc/kfad": 0.5}


# -- evaluation ----------------------------------------------------------------------------------


def test_within_one_range_takes_the_neighbouring_ranges_of_the_source():
    from faceage.training.evaluate import range_outcomes

    labels = pd.DataFrame({"age_low": [0, 7, 13, 20, 31, 25],
                           "age_high": [6, 12, 19, 30, 45, 25]}, dtype=float)
    preds = pd.DataFrame({"pred": [8.0, 21.0, 5.0, 6.5, 26.0, np.nan],
                          "range_low": [7.0, 7, 31, 7, 25, 0], "range_high": [12.0, 12, 45, 12,
                                                                             25, 6]})
    out = range_outcomes(preds, labels)
    assert out["in_range"].tolist()[:3] == [1.0, 0.0, 0.0]
    # 7-12 widens to 0-19 (its neighbours 0-6 and 13-19); 31-45, the last, to 20-45.
    assert out["within_one_range"].tolist()[:4] == [1.0, 0.0, 0.0, 1.0]
    assert out["in_range"].isna().tolist()[4:] == [True, True]  # an exact age; no prediction


def test_evaluate_reports_range_accuracy(untrained_model_file, utkface_images, tmp_path,
                                         capsys):
    csv = family_manifest(tmp_path, utkface_images, families=6)
    report = tmp_path / "kfad.json"
    code = main(["evaluate", "--model", str(untrained_model_file), "--data",
                 f"manifest:{csv}", "--report", str(report), "--no-mlflow"])
    out = capsys.readouterr().out
    assert code == 0 and "in range" in out and "within one" in out
    assert "signed error to the range's middle" in out
    rep = json.loads(report.read_text())
    block = rep["sources"]["manifest"]
    assert block["range"]["n"] == 6 and 0 <= block["range"]["accuracy"] <= 1
    assert set(block["range_by_range"]) <= {f"{lo}-{hi}" for lo, hi in KFAD_RANGES}
    assert sum(v["n"] for v in block["range_by_range"].values()) == 6
    # The exact rows keep their decades; the range rows count by their distance in the MAE.
    assert sum(v["n"] for v in block["mae_by_decade"].values()) == 6
    preds = pd.read_csv(report.with_suffix(".csv"))
    assert list(preds.columns[-4:]) == ["range_low", "range_high", "in_range",
                                        "within_one_range"]
    ranged = preds[preds["range_low"] != preds["range_high"]]
    inside = (ranged["pred"] >= ranged["range_low"]) & (ranged["pred"] <= ranged["range_high"])
    assert block["range"]["accuracy"] == pytest.approx(inside.mean())

    one = tmp_path / "one.json"  # one source, its one-source report, the range block in it
    assert main(["evaluate", "--model", str(untrained_model_file), "--data", str(csv),
                 "--format", "manifest", "--report", str(one), "--no-mlflow"]) == 0
    assert "range labels (6 images): in the range" in capsys.readouterr().out
    assert json.loads(one.read_text())["range"]["n"] == 6


@pytest.mark.skipif(not (KFAD / "manifest.csv").is_file(), reason=f"KFAD is not at {KFAD}")
def test_kfad_reads_as_ranges_split_by_family():
    data = DataConfig(sources=[SourceConfig(format="csv", path=str(KFAD / "manifest.csv"),
                                            split_by="family", limit=300)], limit=None)
    table, _, _ = read_sources(data)  # read and split only: no face is detected here
    assert len(table) == 300
    assert {(lo, hi) for lo, hi in zip(table["age_low"], table["age_high"], strict=True)} <= \
        set(KFAD_RANGES)
    families = pd.read_csv(KFAD / "manifest.csv", usecols=["path", "family"])
    family = dict(zip((os.path.realpath(KFAD / p) for p in families["path"]), families["family"],
                      strict=True))
    keyed = table.assign(family=[family[o] for o in table["origin"]])
    assert keyed.groupby("family")["split"].nunique().max() == 1


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_a_tiny_run_trains_on_ranges_and_evaluate_reports_them(ray_local, utkface_images,
                                                               tmp_path, capsys):
    from faceage.inference.modelfile import load_model_file
    from faceage.training.driver import run_training

    csv = family_manifest(tmp_path, utkface_images, families=40, per_family=2)
    cfg = load_config(None, [
        f"data.sources=[{{format: manifest, path: {csv}, name: kin, split_by: family}}]",
        f"data.cache_dir={tmp_path / 'decoded'}", f"storage_path={tmp_path}", "name=ranges",
        "data.limit=null", "data.split.val=0.25", "data.split.test=0.15",
        "model.pretrained=none", "model.input_size=32", "model.head_hidden=16",
        "train.batch_size=8", "train.max_steps_per_epoch=4", "train.eval_tta=false",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        "schedule.stages=[{name: head, train: 0, epochs: 2}]",
        "data.balance.by=source_band", "data.balance.strength=1.0"])
    outcome = run_training(cfg)
    # Balanced draws: every age band of the source gets the same share of each epoch.
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if "draws per epoch" in ln)
    shares = [float(v.rstrip("%")) for v in line.split("kin ", 1)[1].split()[1::2]]
    assert max(shares) - min(shares) <= 1, line

    split = pd.read_csv(outcome.run_dir / "split.csv")
    assert list(split.columns) == [*SPLIT_COLUMNS, "age_low", "age_high"]
    families = pd.read_csv(csv).assign(path=lambda d: [str(csv.parent / p) for p in d["path"]])
    keyed = split.merge(families[["path", "family"]], on="path")
    assert len(keyed) == 80 and keyed.groupby("family")["split"].nunique().max() == 1
    for epoch in outcome.history:
        assert np.isfinite(epoch["train_loss"]) and np.isfinite(epoch["val_mae"])
        assert 0 <= epoch["val_range_acc/kin"] <= 1
        assert np.isfinite(epoch["val_band_mae"])
        assert any(k.startswith("val_signed/") for k in epoch)
    model = load_model_file(outcome.model_path)
    meta = model.metadata
    # The interval is calibrated per band of predicted age.
    assert model.calibration.bands and len(model.calibration.band_quantiles) == len(
        model.calibration.bands)
    ranged = int((split["age_low"] != split["age_high"]).sum())
    assert meta["data"]["ranges"] == ranged and meta["data"]["sources"][0]["ranges"] == ranged
    assert meta["data"]["sources"][0]["split_by"] == "family"

    capsys.readouterr()
    report = tmp_path / "eval.json"
    # The model's own split by family: its test split is the run's.
    assert main(["evaluate", "--model", str(outcome.model_path), "--data", f"manifest:{csv}",
                 "--split", "test", "--report", str(report), "--json", "--no-mlflow"]) == 0
    rep = json.loads(capsys.readouterr().out)
    block = rep["sources"]["manifest"]
    test_rows = split[split["split"] == "test"]
    assert block["evaluated"] == len(test_rows)
    assert block["range"]["n"] == int((test_rows["age_low"] != test_rows["age_high"]).sum())
    assert 0 <= block["range"]["accuracy"] <= block["range"]["within_one"] <= 1
    assert np.isfinite(block["range"]["distance"]) and block["range_by_range"]
