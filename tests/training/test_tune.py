"""``faceage tune`` end to end on generated images: Ray Tune, one TorchTrainer per trial, ASHA.

The search-space mistakes must end before any trial starts, with one message.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from faceage.cli import main as cli_main
from faceage.config import load_config
from faceage.errors import UserError
from faceage.inference.modelfile import load_model_file
from faceage.training.tune.driver import run_tune
from faceage.training.tune.plan import load_tune_settings, plan_search

REPO = Path(__file__).resolve().parents[2]


def tiny_tune(data: Path, storage: Path, cache: Path, **changes) -> dict:
    """A search that takes about a minute: 2 backbones at 32 px, 2 epochs of 2 steps each."""
    settings = {
        "name": "tiny",
        "storage_path": str(storage),
        "base": {
            "data": {"path": str(data), "limit": None, "cache_dir": str(cache)},
            "model": {"pretrained": "none", "input_size": 32, "head_hidden": 16},
            "train": {"batch_size": 8, "max_steps_per_epoch": 2, "eval_tta": False},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "max_failures": 0,
        },
        "schedules": {"two": [{"name": "head", "train": 0, "epochs": 1, "lr": 0.002},
                              {"name": "top", "train": 2, "epochs": 1, "lr": 0.001}]},
        # A whole-section grid: each backbone with the settings that go with it.
        "space": {"model": {"grid": [{"backbone": "mobilenet_v2"},
                                     {"backbone": "dlib_age_resnet", "dropout": 0.1}]},
                  "schedule": "two", "lr_scale": {"loguniform": [0.5, 2.0]},
                  "loss": ["l1", "smooth_l1"]},
        "search": {"asha": {"grace_period": 1, "reduction_factor": 2}},
    }
    for key, value in changes.items():
        settings[key] = value
    return settings


def write_yaml(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def faces(folder: Path, count: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())[:count]]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_tiny_search_writes_table_plot_and_best_model(ray_local, tiny_utkface, tmp_path, capsys):
    config = write_yaml(tmp_path / "tune.yaml",
                        tiny_tune(tiny_utkface, tmp_path / "runs", tmp_path / "cache"))
    code = cli_main(["tune", "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    tune_dir = tmp_path / "runs" / "tiny"

    table = pd.read_csv(tune_dir / "results.csv")
    assert len(table) == 2
    assert set(table["backbone"]) == {"mobilenet_v2", "dlib_age_resnet"}
    assert table["params"].str.contains("dropout=0.1").sum() == 1
    assert set(table["status"]) <= {"completed", "stopped by ASHA"}, table["status"].tolist()
    # ASHA saw each trial's first epoch; the first trial at the rung always continues.
    assert (table["epochs_run"] >= 1).all() and (table["epochs_run"] <= 2).all()
    assert (table["status"] == "completed").any()
    assert (table.loc[table["status"] == "completed", "epochs_run"] == 2).all()
    assert np.isfinite(table["best_val_mae"]).all() and (table["time_s"] > 0).all()
    assert table["best_val_mae"].is_monotonic_increasing
    assert table["params"].str.contains("lr_scale=").all()
    assert table["params"].str.contains("loss=").all()

    md = (tune_dir / "results.md").read_text()
    assert "| trial | backbone | params | best val MAE |" in md
    assert all(t in md for t in table["trial"])
    assert (tune_dir / "val_mae.png").read_bytes()[:4] == b"\x89PNG"

    best = table.iloc[0]
    model = load_model_file(tune_dir / "best_model.pt")
    assert model.metadata["config"]["model"]["backbone"] == best["backbone"]
    assert model.metadata["metrics"]["val_mae"] == pytest.approx(best["best_val_mae"])
    assert model.input_size == 32
    ages = model.predict(faces(tiny_utkface, 4))
    assert ages.shape == (4,) and np.isfinite(ages).all()

    # Each completed trial's Train run exported its own model and summary.
    for _, row in table[table["status"] == "completed"].iterrows():
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert len(summary["history"]) == 2
    assert f"best trial {best['trial']}" in out and str(tune_dir / "best_model.pt") in out

    # Every trial is an MLflow run in the search's store, one val_mae per epoch it ran.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("faceage").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {f"tiny/{t}/train" for t in table["trial"]}
    for _, row in table.iterrows():
        run = by_name[f"tiny/{row['trial']}/train"]
        history = client.get_metric_history(run.info.run_id, "val_mae")
        assert len(history) == row["epochs_run"]
        assert run.data.params["model.backbone"] == row["backbone"]
        # Trials ASHA stopped are closed by the driver, not left RUNNING.
        assert run.info.status == {"completed": "FINISHED",
                                   "stopped by ASHA": "KILLED"}[row["status"]]


@pytest.mark.parametrize("change, message", [
    ({"space": {"optimizer": ["adam"]}}, "space.optimizer: unknown search key 'optimizer'"),
    ({"space": {"backbone": ["mobilenet_v2", "vgg11"]}}, "unknown backbone 'vgg11'"),
    ({"space": {"loss": ["l1", "huber"]}}, "space.loss: unknown loss 'huber'"),
    ({"space": {"schedule": ["fast"]}}, "space.schedule: 'fast' is not a named schedule"),
    ({"space": {"input_size": [16]}}, "model.input_size: Input should be greater than or equal"),
    ({"space": {"lr_scale": {"loguniform": [2.0, 1.0]}}}, "expected [low, high] with 0 < low"),
    ({"serach": {"num_samples": 2}}, "serach: Extra inputs are not permitted"),
    ({"schedules": {"bad": [{"train": ["block9"]}]}, "space": {"schedule": "bad"}},
     "unknown groups ['block9']"),
    ({"space": {"pretrained": ["none", "/nowhere/weights.pth"]}},
     "pretrained=/nowhere/weights.pth: pretrained weights file not found"),
    ({"space": {"uncertainty": {"grid": ["none", "gaussian"]}}},
     "model.uncertainty: Input should be 'none' or 'laplace'"),
    ({"space": {"weight.aaf": [1, 2]}}, "space.weight.aaf: the base training settings have no "
                                        "data source named 'aaf' (sources: utkface)"),
    ({"space": {"data.balance.by": ["band", "age"]}}, "data.balance.by: Input should be 'none'"),
    ({"space": {"data.nothing.by": ["x"]}}, "space.data.nothing.by: the training config has no "
                                            "section 'data.nothing'"),
    ({"space": {"optimizer.lr": [1]}}, "space.optimizer.lr: unknown search key"),
    ({"space": {"model": {"grid": ["mobilenet_v2"]}}},
     "space.model: a whole section takes mappings of its settings"),
    ({"space": {"model": {"grid": [{"backbone": "vgg11"}]}}}, "unknown backbone 'vgg11'"),
    ({"space": {"model": {"grid": [{"input_size": 8}]}}},
     "model.input_size: Input should be greater than or equal"),
    ({"space": {"data": {"balance": {"strength": {"grid": [0.25, 0.5]}}}}},
     "'data.balance.strength' is searched inside a section; give it as one dotted key"),
])
def test_bad_search_space_stops_before_any_trial(tiny_utkface, tmp_path, change, message):
    settings = tiny_tune(tiny_utkface, tmp_path / "runs", tmp_path / "cache")
    if "space" in change:
        settings["space"] = {**settings["space"], **change.pop("space")}
    settings.update(change)
    config = write_yaml(tmp_path / "tune.yaml", settings)
    with pytest.raises(UserError) as err:
        run_tune(load_tune_settings(config))
    assert message in str(err.value)
    assert not (tmp_path / "runs" / "tiny").exists()


def test_cli_prints_the_message_without_a_traceback(tiny_utkface, tmp_path, capsys):
    config = write_yaml(tmp_path / "tune.yaml",
                        tiny_tune(tiny_utkface, tmp_path / "runs", tmp_path / "cache"))
    code = cli_main(["tune", "--config", str(config), "--set", "space.backbone=[alexnet]"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown backbone 'alexnet'")
    assert "Traceback" not in err


def test_set_splits_between_tune_and_base_settings(tiny_utkface, tmp_path):
    config = write_yaml(tmp_path / "tune.yaml",
                        tiny_tune(tiny_utkface, tmp_path / "runs", tmp_path / "cache"))
    settings = load_tune_settings(config, ["name=other", "search.num_samples=3",
                                           "train.batch_size=4", "model.dropout=0.1"])
    plan = plan_search(settings)
    assert plan.tune_dir == (tmp_path / "runs" / "other").resolve()
    assert plan.trial_count == 6  # 2 backbones (grid) x 3 samples
    assert plan.base.train.batch_size == 4 and plan.base.model.dropout == 0.1
    assert plan.base.train.max_steps_per_epoch == 2  # the YAML's base settings stay


def test_shipped_tune_config_is_valid_offline(monkeypatch):
    monkeypatch.chdir(REPO)
    plan = plan_search(load_tune_settings(REPO / "configs" / "tune.yaml"), REPO / "configs")
    assert plan.trial_count == 6 and plan.max_epochs() == 4
    assert {d.key for d in plan.dims} >= {"backbone", "pretrained", "input_size", "lr_scale",
                                          "schedule", "loss"}
    # Only MobileNetV2's ImageNet weights are available offline; the default space needs none.
    assert next(d for d in plan.dims if d.key == "pretrained").values == ["none"]


def test_backbone_study_pairs_each_start_with_its_input_size(monkeypatch):
    from faceage.training.tune.plan import trial_config

    monkeypatch.chdir(REPO)
    plan = plan_search(load_tune_settings(REPO / "configs" / "tune-backbones.yaml"),
                       REPO / "configs")
    assert plan.trial_count == 6 and plan.max_epochs() == 5
    models = next(d for d in plan.dims if d.key == "model").values
    configs = [trial_config(plan.base, {"schedule": "short", "model": m}, plan.schedules,
                            "runs/x", "t") for m in models]
    assert [(c.model.backbone, c.model.pretrained, c.model.input_size) for c in configs] == [
        ("mobilenet_v2", "imagenet", 128), ("mobilenet_v2", "imagenet", 160),
        ("efficientnet_lite0", "imagenet", 128), ("efficientnet_lite0", "imagenet", 160),
        ("dlib_age_resnet", "dlib-age", 64), ("dlib_age_resnet", "dlib-age", 96)]
    # The rest of multi.yaml's model section stays, and all four sources train.
    assert {c.model.head_hidden for c in configs} == {256}
    assert [s.name or s.format for s in configs[0].data.sources] == ["utkface", "aaf", "kfad",
                                                                     "appa"]


def test_a_users_tune_yaml_naming_a_shipped_config_finds_it_from_any_folder(tmp_path,
                                                                            monkeypatch):
    """``train_config: configs/train.yaml`` from a folder without it (an installed wheel): the
    config faceage ships; a name faceage does not ship stays an error naming it."""
    monkeypatch.chdir(tmp_path)
    mine = write_yaml(tmp_path / "mine.yaml", {"train_config": "configs/train.yaml",
                                               "space": {"train.batch_size": [8, 16]}})
    plan = plan_search(load_tune_settings(mine), tmp_path)
    shipped = load_config(str(REPO / "configs" / "train.yaml"))
    assert plan.base.model == shipped.model and plan.base.schedule == shipped.schedule
    typo = write_yaml(tmp_path / "typo.yaml", {"train_config": "configs/trian.yaml",
                                               "space": {"train.batch_size": [8, 16]}})
    with pytest.raises(UserError, match="trian.yaml"):
        plan_search(load_tune_settings(typo), tmp_path)


def test_relative_storage_in_a_ray_job_gets_a_clear_message(tiny_utkface, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}}))
    monkeypatch.chdir(tmp_path)
    settings = tiny_tune(tiny_utkface, Path("runs"), tmp_path / "cache")
    with pytest.raises(UserError, match=r"storage_path 'runs' is relative"):
        run_tune(load_tune_settings(write_yaml(tmp_path / "tune.yaml", settings)))


@pytest.mark.slow
@pytest.mark.ray
def test_placement_group_of_a_dead_actor_is_found_as_orphaned(ray_local):
    """A stopped trial's Train controller dies holding its workers' placement group."""
    import ray

    from faceage.compat import orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def reserve(self):
            # Memory, not CPUs: earlier tests' Train runs on this shared instance may still hold
            # the CPUs (Ray Train's own cleaner needs the dashboard, which ray_local leaves out).
            pg = ray.util.placement_group([{"memory": 1 << 20}])
            ray.get(pg.ready(), timeout=120)
            return pg

    earlier = {pg.id.hex() for pg in orphaned_placement_groups()}  # left by earlier tests
    by_driver = ray.util.placement_group([{"memory": 1 << 20}])  # as Tune's trial groups are
    ray.get(by_driver.ready(), timeout=300)
    alive, doomed = Creator.remote(), Creator.remote()
    kept = ray.get(alive.reserve.remote(), timeout=300)
    orphan = ray.get(doomed.reserve.remote(), timeout=300).id.hex()
    ray.kill(doomed)
    deadline = time.monotonic() + 60
    while not (found := {pg.id.hex() for pg in orphaned_placement_groups()} - earlier):
        assert time.monotonic() < deadline, "the dead actor's placement group was not found"
        time.sleep(0.5)
    assert found == {orphan}
    for pg in [*orphaned_placement_groups(), kept, by_driver]:
        ray.util.remove_placement_group(pg)
    ray.kill(alive)


def test_space_sets_uncertainty_and_source_weights(tiny_utkface, tmp_path):
    """``uncertainty`` and ``weight.<source>`` reach the trial's training config."""
    from faceage.training.tune.plan import trial_config

    settings = tiny_tune(tiny_utkface, tmp_path / "runs", tmp_path / "cache")
    settings["base"]["data"] = {"sources": [
        {"format": "utkface", "path": str(tiny_utkface)},
        {"format": "utkface", "path": str(tiny_utkface), "name": "more"}],
        "limit": None, "cache_dir": str(tmp_path / "cache")}
    settings["space"] = {"uncertainty": {"grid": ["none", "laplace"]},
                         "weight.more": {"grid": [1, 3]}}
    plan = plan_search(load_tune_settings(write_yaml(tmp_path / "tune.yaml", settings)))
    assert plan.trial_count == 4
    cfg = trial_config(plan.base, {"uncertainty": "none", "weight.more": 3}, plan.schedules,
                       str(tmp_path), "t")
    assert cfg.model.uncertainty == "none"
    assert [s.weight for s in cfg.data.sources] == [1.0, 3.0]
    with pytest.raises(UserError, match=r"no data source named 'less' \(sources: utkface, more\)"):
        trial_config(plan.base, {"weight.less": 2}, plan.schedules, str(tmp_path), "t")
    with pytest.raises(UserError, match="greater than 0"):
        trial_config(plan.base, {"weight.more": 0}, plan.schedules, str(tmp_path), "t")


def test_space_sets_any_training_setting_by_its_dotted_key(tiny_utkface, tmp_path):
    """Band balance and augmentation (any ``--set`` key of a training run) can be searched."""
    from faceage.training.tune.plan import trial_config

    settings = tiny_tune(tiny_utkface, tmp_path / "runs", tmp_path / "cache")
    settings["space"] = {"data.balance.by": {"grid": ["none", "source_band"]},
                         "data.balance.strength": {"uniform": [0.3, 0.9]},
                         "train.augment.jpeg": [0.0, 0.3]}
    plan = plan_search(load_tune_settings(write_yaml(tmp_path / "tune.yaml", settings)))
    assert plan.trial_count == 2 * settings["search"].get("num_samples", 1)
    cfg = trial_config(plan.base, {"data.balance.by": "source_band", "data.balance.strength": 0.7,
                                   "train.augment.jpeg": 0.3}, plan.schedules, str(tmp_path), "t")
    assert cfg.data.balance.by == "source_band" and cfg.data.balance.strength == 0.7
    assert cfg.train.augment.jpeg == 0.3


@pytest.mark.parametrize("command", ["train", "tune"])
def test_set_takes_several_items_after_one_flag_or_one_per_flag(command):
    """``faceage train``, ``faceage tune`` and ``python -m faceage.serving.local`` share the one
    ``--set`` (faceage.config.add_set_argument)."""
    import argparse

    from faceage.arguments import add_set_argument
    from faceage.cli import build_parser

    parser = build_parser(command)
    assert parser.parse_args([command, "--set", "a=1", "b=2"]).overrides == ["a=1", "b=2"]
    assert parser.parse_args([command, "--set", "a=1", "--set", "b=2", "c=3"]).overrides == [
        "a=1", "b=2", "c=3"]
    assert parser.parse_args([command]).overrides == []
    serve_like = argparse.ArgumentParser()
    add_set_argument(serve_like)
    assert serve_like.parse_args(["--set", "x=1", "--set", "y=2"]).overrides == ["x=1", "y=2"]
    assert serve_like.parse_args([]).overrides == []  # the default list is not shared


def test_a_set_item_is_a_dotted_key_and_a_yaml_value():
    from faceage.errors import UserError
    from faceage.yaml_settings import apply_overrides, parse_override

    assert parse_override("train.lr = 0.001") == (["train", "lr"], 0.001)
    assert parse_override("a=[1, b]") == (["a"], [1, "b"])
    assert parse_override("a=: x") == (["a"], ": x")  # not YAML: the text as it is
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_override("a..b=1")
    raw = {"data": {"limit": 5}, "name": "x"}
    assert apply_overrides(raw, ["data.limit=null", "model.input_size=64"]) == {
        "data": {"limit": None}, "name": "x", "model": {"input_size": 64}}
    with pytest.raises(UserError, match="'name' is not a section"):
        apply_overrides(raw, ["name.first=1"])
