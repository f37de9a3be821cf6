"""The pieces of a training run that need no Ray: one epoch, prediction, the driver's checks,
the end-of-run table and files (``faceage.training.loop``, ``faceage.training.checks``,
``faceage.training.export``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from faceage.config import AugmentConfig, ScheduleConfig, StageConfig, load_config
from faceage.data.augment import BatchAugment
from faceage.data.datasets import eval_transform
from faceage.errors import UserError
from faceage.training.checks import check_job_paths, check_resume_compatible, check_split_counts
from faceage.training.export import summary_table, write_summary
from faceage.training.loop import StepContext, build_optimizer, make_loss, predict, train_one_epoch


class Tiny(nn.Module):
    """Two layer groups, as ``AgeNet`` has them: a conv body and a linear head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 1)

    def layer_groups(self):
        return [("body", self.body), ("head", self.head)]

    def group_names(self):
        return ["body", "head"]

    def forward(self, x):
        return self.head(self.body(x)).squeeze(1)


def two_batches() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=g)
    ages = torch.tensor([10.0, 20, 30, 40, 50, 60])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, ages),
                                       batch_size=3)


def setup():
    from faceage.training.schedule import UnfreezeSchedule

    torch.manual_seed(0)
    model = Tiny()
    cfg = ScheduleConfig(stages=[StageConfig(name="head", train=0, epochs=1, lr=0.1),
                                 StageConfig(name="all", train="all", epochs=1, lr=0.1)])
    schedule = UnfreezeSchedule(cfg, model.group_names(), steps_per_epoch=2)
    ctx = StepContext(torch.device("cpu"), None, channels_last=False, scaler=None)
    return model, schedule, ctx


def test_train_one_epoch_steps_the_stage_groups_and_counts_images():
    model, schedule, ctx = setup()
    loader, augment = two_batches(), BatchAugment(16, AugmentConfig())
    body = [p.detach().clone() for p in model.body.parameters()]
    head = [p.detach().clone() for p in model.head.parameters()]
    opt = build_optimizer(model, schedule, schedule.stage_at(0), weight_decay=1e-2)
    stats = train_one_epoch(model, loader, opt, schedule, 0, make_loss("l1"), ctx, augment, None)
    assert stats["images"] == 6 and np.isfinite(stats["loss_sum"]) and stats["loss_sum"] > 0
    assert 0 <= stats["data_seconds"] <= stats["seconds"]
    assert all(torch.equal(a, b) for a, b in zip(body, model.body.parameters(), strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(head, model.head.parameters(), strict=True))

    opt = build_optimizer(model, schedule, schedule.stage_at(1), weight_decay=1e-2)
    stats = train_one_epoch(model, loader, opt, schedule, 1, make_loss("mse"), ctx, augment,
                            max_steps=1)
    assert stats["images"] == 3  # max_steps caps the epoch
    assert not torch.equal(body[0], model.body[0].weight)


def test_predict_keeps_order_and_averages_the_flip():
    model, _, ctx = setup()
    loader = two_batches()
    plain, scales = predict(model, loader, ctx, eval_transform(16), tta=False)
    assert scales is None  # a one-output model has no scale
    assert plain.shape == (6,) and plain.dtype == np.float32
    x = eval_transform(16)(next(iter(loader))[0])
    model.eval()
    with torch.no_grad():
        assert np.allclose(plain[:3], model(x).numpy(), atol=1e-5)
        flipped = model(torch.flip(x, dims=[3])).numpy()
    tta, _ = predict(model, loader, ctx, eval_transform(16), tta=True)
    assert np.allclose(tta[:3], (plain[:3] + flipped) / 2, atol=1e-5)


def tiny_regressor(uncertainty: str):
    from faceage.models.network import build_model

    torch.manual_seed(0)
    return build_model("mobilenet_v2", "none", head_hidden=8, dropout=0.0,
                       uncertainty=uncertainty)


def test_predict_returns_scales_of_a_laplace_head_and_averages_them_with_the_flip():
    model = tiny_regressor("laplace")
    ctx = StepContext(torch.device("cpu"), None, channels_last=False, scaler=None)
    loader = two_batches()
    ages, scales = predict(model, loader, ctx, eval_transform(32), tta=False)
    assert ages.shape == scales.shape == (6,) and (scales > 0).all()
    x = eval_transform(32)(next(iter(loader))[0])
    model.eval()
    with torch.no_grad():
        a, s = model.forward_with_scale(x)
        fa, fs = model.forward_with_scale(torch.flip(x, dims=[3]))
    assert np.allclose(ages[:3], a.numpy(), atol=1e-4)
    tta_ages, tta_scales = predict(model, loader, ctx, eval_transform(32), tta=True)
    assert np.allclose(tta_ages[:3], ((a + fa) / 2).numpy(), atol=1e-4)
    assert np.allclose(tta_scales[:3], ((s + fs) / 2).numpy(), atol=1e-4)


def test_predict_with_a_zoom_averages_the_closer_view_and_both_mirrors_as_inference_does(
        tmp_path):
    """``train.eval_zoom``: validation averages four views, as a model file with that
    ``tta_zoom`` predicts, so the interval is calibrated on the ages users get."""
    from faceage.inference.modelfile import load_model_file, save_model_file
    from faceage.inference.preprocess import closer_view, preprocessing_metadata
    from faceage.models.network import build_model

    torch.manual_seed(0)  # dlib's network: untrained, MobileNetV2 reads every face alike
    model = build_model("dlib_age_resnet", "none", head_hidden=8, dropout=0.0,
                        uncertainty="laplace")
    ctx = StepContext(torch.device("cpu"), None, channels_last=False, scaler=None)
    loader = two_batches()
    ages, scales = predict(model, loader, ctx, eval_transform(32), tta=True, zoom=0.75)
    images = next(iter(loader))[0]
    views = [eval_transform(32)(closer_view(images, z)) for z in (None, 0.75)]
    model.eval()
    with torch.no_grad():
        outs = [model.forward_with_scale(v) for x in views for v in (x, torch.flip(x, dims=[3]))]
    assert np.allclose(ages[:3], torch.stack([a for a, _ in outs]).mean(0).numpy(), atol=1e-4)
    assert np.allclose(scales[:3], torch.stack([s for _, s in outs]).mean(0).numpy(), atol=1e-4)
    flip_only, _ = predict(model, loader, ctx, eval_transform(32), tta=True)
    assert not np.allclose(ages, flip_only, atol=1e-3)
    assert np.array_equal(predict(model, loader, ctx, eval_transform(32), tta=False, zoom=0.75)[0],
                          predict(model, loader, ctx, eval_transform(32), tta=False)[0])

    path = save_model_file(model, tmp_path / "zoom.pt", {
        "preprocessing": preprocessing_metadata(32), "flip_average": True, "tta_zoom": 0.75})
    crops = [im.permute(1, 2, 0).numpy() for im in images]
    served_ages, served_scales = load_model_file(path).predict_with_scale(crops, tta=True)
    assert np.allclose(served_ages, ages[:3], atol=1e-4)
    assert np.allclose(served_scales, scales[:3], atol=1e-4)


def test_the_scale_term_leaves_every_age_gradient_as_plain_l1():
    """The Laplace term trains only the scale row: trunk, hidden layer and age row get exactly
    the gradient of the configured age loss alone."""
    from faceage.models.network import laplace_nll

    model = tiny_regressor("laplace").train()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([5.0, 25.0, 45.0, 80.0])

    def grads(with_scale: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)
        ages, log_scale = model(x, with_log_scale=True)
        loss = make_loss("l1")(ages, y)
        if with_scale:
            loss = loss + laplace_nll(ages, log_scale, y, model.age_std)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, both = grads(False), grads(True)
    last = model.head[-1]
    for name, g in plain.items():
        if name in ("head.3.weight", "head.3.bias"):
            assert torch.equal(g[:1], both[name][:1]), name  # the age row
            assert not g[1:].any() and both[name][1:].any()  # only the scale row learns
        else:
            assert torch.equal(g, both[name]), name
    assert last.weight.shape[0] == 2


def test_train_one_epoch_trains_the_scale_of_a_laplace_head():
    from faceage.training.schedule import UnfreezeSchedule

    model = tiny_regressor("laplace")
    cfg = ScheduleConfig(stages=[StageConfig(name="head", train=0, epochs=1, lr=0.1)])
    schedule = UnfreezeSchedule(cfg, model.group_names(), steps_per_epoch=2)
    ctx = StepContext(torch.device("cpu"), None, channels_last=False, scaler=None)
    before = model.head[-1].weight.detach().clone()
    opt = build_optimizer(model, schedule, schedule.stage_at(0), weight_decay=0.0)
    stats = train_one_epoch(model, two_batches(), opt, schedule, 0, make_loss("l1"), ctx,
                            BatchAugment(32, AugmentConfig()), None)
    assert stats["images"] == 6 and np.isfinite(stats["loss_sum"])
    after = model.head[-1].weight.detach()
    assert not torch.equal(before[1], after[1]) and not torch.equal(before[0], after[0])


def cfg_for(tmp_path: Path, *extra: str):
    return load_config(None, [f"data.path={tmp_path}", f"storage_path={tmp_path}", "name=run",
                              *extra])


def test_split_counts_name_the_setting_to_change(tmp_path):
    table = pd.DataFrame({"split": ["train"] * 10 + ["val"] * 2})
    check_split_counts(cfg_for(tmp_path, "train.batch_size=5", "scaling.num_workers=2"), table)
    with pytest.raises(UserError, match="10 training images are fewer than one step needs "
                                        r"\(train.batch_size 8 x 2 workers\)"):
        check_split_counts(cfg_for(tmp_path, "train.batch_size=8", "scaling.num_workers=2"),
                           table)
    with pytest.raises(UserError, match="no images fell into the validation split"):
        check_split_counts(cfg_for(tmp_path, "train.batch_size=2"), table[table.split == "train"])


def test_resume_check_reads_the_earlier_runs_model(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = cfg_for(tmp_path)
    assert check_resume_compatible(cfg, run_dir) is False  # no checkpoints: a new run
    (run_dir / "checkpoint_1").mkdir()
    (run_dir / "config.yaml").write_text("model: {backbone: mobilenet_v2, input_size: 128}\n")
    assert check_resume_compatible(cfg, run_dir) is True
    (run_dir / "config.yaml").write_text("model: {input_size: 96}\n")
    with pytest.raises(UserError, match="model.input_size=96, not 128: its checkpoints cannot"):
        check_resume_compatible(cfg, run_dir)


def test_job_paths_are_only_checked_inside_a_ray_job(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, "storage_path=runs")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    check_job_paths(cfg)  # a plain driver: relative paths are fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    with pytest.raises(UserError, match="storage_path 'runs' is relative"):
        check_job_paths(cfg)


def test_job_paths_name_each_missing_data_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    (tmp_path / "here").mkdir()
    one = load_config(None, [f"storage_path={tmp_path}", "data.path=faces"])
    with pytest.raises(UserError, match=r"data.path 'faces' not found: .*--set data.path=\$PWD"):
        check_job_paths(one)
    several = load_config(None, [f"storage_path={tmp_path}", "data.sources=[{format: utkface, "
                                 "path: here}, {format: aaf, path: gone}]"])
    with pytest.raises(UserError, match=r"data.sources\[1\].path 'gone' not found: .*absolute "
                                        "paths in the config file"):
        check_job_paths(several)


def epoch(i: int, mae: float) -> dict:
    return {"epoch": i, "stage": 0, "stage_name": "head", "train_loss": 9.5 - i,
            "val_mae": mae, "val_rmse": mae * 1.3, "val_cs5": 0.25, "images_per_s": 120.0}


def test_summary_table_marks_the_best_epoch():
    table = summary_table([epoch(0, 9.0), epoch(1, 7.25), epoch(2, 8.0)], best_epoch=1)
    lines = table.splitlines()
    assert len(lines) == 5 and lines[0].startswith("epoch  stage")
    assert lines[3].endswith(" *") and "7.25" in lines[3]
    assert sum(line.endswith("*") for line in lines) == 1
    assert lines[2].split()[:2] == ["1", "head"] and "25.0%" in lines[2]


def test_write_summary(tmp_path):
    cfg = cfg_for(tmp_path)
    latest = {"history": [epoch(0, 9.0), epoch(1, 7.0)], "resumes": [{"epoch": 1}],
              "data_summary": {"train": 2}}
    curves = write_summary(cfg, tmp_path, tmp_path / "model.pt", epoch(1, 7.0), latest, 12.5)
    assert curves.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best"]["val_mae"] == 7.0 and len(summary["history"]) == 2
    assert summary["resumes"] == [{"epoch": 1}] and summary["data"] == {"train": 2}
    assert summary["wall_seconds"] == 12.5 and summary["model"] == str(tmp_path / "model.pt")



def test_an_epoch_checkpoints_when_val_improves_at_the_end_and_every_n():
    """Checkpoints only where one is needed (issue 32): a better val MAE, the last epoch,
    every ``checkpoint_every`` epochs, or ``checkpoint_minutes`` after the last one."""
    from faceage.training.checkpoints import Progress, checkpoint_due

    def due(epoch, mae, best=5.0, last=0, since_s=0.0, total=10, every=3, minutes=10.0):
        progress = Progress(best_val=best, checkpoint_epoch=last, checkpoint_time=100.0)
        return checkpoint_due(progress, {"epoch": epoch, "val_mae": mae}, total, every, minutes,
                              100.0 + since_s)

    assert due(1, 4.9)  # better than the best so far
    assert not due(1, 5.0) and not due(2, 5.3)  # no better, 1-2 epochs after the last one
    assert due(3, 5.3)  # three epochs after the last one
    assert due(9, 6.0)  # the last epoch: export reads the run's history off it
    assert due(1, 5.3, since_s=600) and not due(1, 5.3, since_s=599)
    assert not due(1, float("nan"))  # no val MAE is no improvement
    assert due(0, 7.0, best=float("inf"), last=-1)  # the first epoch of a run


def test_the_last_stage_stops_once_val_mae_stops_falling():
    """``train.stop_patience``: N epochs of the last stage without a better val MAE end it;
    earlier stages' epochs and a stage's first epochs never do."""
    from faceage.training.checkpoints import stops_early

    def history(*maes, stage=2, earlier=(9.0, 8.0)):
        rows = [{"stage": i, "val_mae": m} for i, m in enumerate(earlier)]
        return rows + [{"stage": stage, "val_mae": m} for m in maes]

    assert not stops_early(history(6.0, 5.5, 5.6, 5.7), 2, None)  # off by default
    assert stops_early(history(6.0, 5.5, 5.6, 5.7), 2, 2)  # two epochs after the best
    assert not stops_early(history(6.0, 5.5, 5.6), 2, 2)
    assert not stops_early(history(6.0, 5.5, 5.6, 5.4), 2, 2)  # a new best resets it
    assert not stops_early(history(6.0, 6.1, stage=1), 2, 1)  # not yet in the last stage
    # The earlier stages' better val MAE does not count against the last stage.
    assert not stops_early(history(7.0, 6.9, earlier=(5.0, 4.0)), 2, 1)
    # Not before half the stage has run: the run of dlib64-balance075 (a 24-epoch last stage,
    # patience 4), whose val MAE rose while the LR was high, stopped at its 5th epoch.
    rising = history(5.28, 5.54, 5.37, 5.59, 5.60)
    assert stops_early(rising, 2, 4) and not stops_early(rising, 2, 4, settle=12)
    assert stops_early(history(5.28, *[5.5] * 11), 2, 4, settle=12)


def test_consistency_trains_both_views_and_penalises_their_difference():
    """``train.consistency``: two views of each image in one forward pass; the loss is both
    views' own loss plus the weight times their mean age difference."""
    from faceage.models.network import build_model
    from faceage.training.loop import StepContext, make_loss, step_loss

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", "none", head_hidden=8, dropout=0.0,
                        uncertainty="none").eval()
    ctx = StepContext(torch.device("cpu"), None, channels_last=False, scaler=None)
    views = torch.randn(6, 3, 32, 32)  # 3 images: first views, then second views
    ages = torch.tensor([20.0, 40.0, 60.0])
    loss_fn = make_loss("l1")
    with torch.no_grad():
        pred = model(views)
        loss, first = step_loss(model, views, ages, ages, loss_fn, ctx, consistency=0.5)
        plain, alone = step_loss(model, views[:3], ages, ages, loss_fn, ctx, consistency=0.0)
    assert torch.allclose(first, pred[:3]) and torch.allclose(alone, pred[:3])
    own = (pred - ages.repeat(2)).abs().mean()
    gap = (pred[:3] - pred[3:]).abs().mean()
    assert float(loss) == pytest.approx(float(own + 0.5 * gap), rel=1e-5)
    assert float(plain) == pytest.approx(float((pred[:3] - ages).abs().mean()), rel=1e-5)
