"""UnfreezeSchedule: which groups train, at what LR, and what frozen groups look like (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from faceage.config import ScheduleConfig, StageConfig
from faceage.errors import UserError
from faceage.models.network import build_model
from faceage.training.loop import build_optimizer
from faceage.training.schedule import UnfreezeSchedule, resolve_groups

STEPS = 10
STAGES = [
    StageConfig(name="head", train=0, epochs=1, lr=1e-3),
    StageConfig(name="top", train=2, epochs=2, lr=5e-4),
    StageConfig(name="all", train="all", epochs=2, lr=2e-4),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mobilenet_v2", "none", head_hidden=16, dropout=0.0)


def schedule_for(model, **kw) -> UnfreezeSchedule:
    cfg = ScheduleConfig(stages=STAGES, **{"warmup": 0.0, "decay": "constant", **kw})
    return UnfreezeSchedule(cfg, model.group_names(), STEPS)


def group_params(model) -> dict[str, set[int]]:
    return {name: {id(p) for p in m.parameters()} for name, m in model.layer_groups()}


def test_stages_train_the_right_groups(model):
    sched = schedule_for(model)
    names = model.group_names()
    assert names[0] == "stem" and names[-1] == "head"
    expected = [("head",), ("block5", "block6", "head"), tuple(names)]
    assert [s.groups for s in sched.stages] == expected
    assert [(s.first_epoch, s.last_epoch) for s in sched.stages] == [(0, 0), (1, 2), (3, 4)]
    assert [sched.stage_at(e).name for e in range(5)] == ["head", "top", "top", "all", "all"]
    with pytest.raises(IndexError):
        sched.stage_at(5)

    owners = group_params(model)
    for stage in sched.stages:
        sched.apply(model, stage)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == set().union(*(owners[g] for g in stage.groups))
        pgroups = sched.param_groups(model, stage)
        # Each layer group comes as a decaying and a non-decaying half, in model order.
        assert list(dict.fromkeys(g["name"] for g in pgroups)) == list(stage.groups)
        assert sum(len(g["params"]) for g in pgroups) == len(trainable)


def test_lr_per_group_drops_with_depth_and_stage(model):
    sched = schedule_for(model, layer_lr_decay=0.5)
    assert sched.lrs(0, 0) == {"head": pytest.approx(1e-3)}
    top = sched.lrs(1, 3)
    assert top == {"block5": pytest.approx(1.25e-4), "block6": pytest.approx(2.5e-4),
                   "head": pytest.approx(5e-4)}
    everything = sched.lrs(3, 0)
    names = model.group_names()
    for distance, name in enumerate(reversed(names)):
        assert everything[name] == pytest.approx(2e-4 * 0.5**distance)
    # An optimizer follows the schedule: one LR per named group.
    stage = sched.stage_at(1)
    opt = torch.optim.AdamW(sched.param_groups(model, stage), lr=stage.lr)
    applied = sched.set_lrs(opt, 1, 3)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == applied == top


def test_warmup_then_cosine(model):
    sched = schedule_for(model, warmup=0.2, decay="cosine", min_lr_ratio=0.1)
    # Stage "top" has 2 epochs x 10 steps: 4 warmup steps, then cosine down to 10%.
    factors = [sched.lr_factor(1 + t // STEPS, t % STEPS) for t in range(2 * STEPS)]
    assert all(b > a for a, b in zip(factors[:4], factors[1:5], strict=True))
    assert factors[0] < 0.4 and factors[4] == pytest.approx(1.0)
    assert all(b < a for a, b in zip(factors[4:-1], factors[5:], strict=True))
    assert factors[-1] == pytest.approx(0.1, abs=0.02)
    # Every stage warms up again from its own first step.
    assert sched.lr_factor(3, 0) == pytest.approx(factors[0])
    assert sched.lrs(1, 0)["head"] == pytest.approx(5e-4 * factors[0])


def test_constant_decay(model):
    sched = schedule_for(model, decay="constant")
    assert {sched.lr_factor(e, s) for e in range(5) for s in range(STEPS)} == {1.0}


def test_plateau_decay_and_its_state(model):
    sched = schedule_for(model, decay="plateau", plateau_factor=0.5, plateau_patience=1)
    sched.end_epoch(1, 10.0)  # best so far
    assert sched.lr_factor(2, 0) == 1.0
    sched.end_epoch(1, 10.5)  # one bad epoch: within patience
    assert sched.lr_factor(2, 0) == 1.0
    sched.end_epoch(2, 10.2)  # two bad epochs: halve
    assert sched.lr_factor(2, 0) == 0.5
    saved = sched.state_dict()
    restored = schedule_for(model, decay="plateau", plateau_factor=0.5, plateau_patience=1)
    restored.load_state_dict(saved)
    assert restored.lr_factor(2, 5) == 0.5 and restored.state_dict() == saved
    # A new stage starts again at its full LR.
    sched.end_epoch(3, 12.0)
    assert sched.lr_factor(3, 0) == 1.0 and sched.lr_factor(4, 0) == 1.0


def test_frozen_batchnorm_stays_in_eval_mode(model):
    sched = schedule_for(model)
    stage = sched.stage_at(1)
    model.train()
    sched.apply(model, stage)
    for name, module in model.layer_groups():
        modes = {m.training for m in module.modules() if isinstance(m, nn.BatchNorm2d)}
        if name == "head":
            continue
        assert modes == ({True} if name in stage.groups else {False}), name
    frozen = dict(model.layer_groups())["stem"]
    bn = next(m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(bn.running_mean, before)


def test_frozen_groups_get_no_optimizer_state(model):
    sched = schedule_for(model)
    stage = sched.stage_at(1)
    opt = build_optimizer(model, sched, stage, weight_decay=1e-2)
    model.train()
    sched.apply(model, stage)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(torch.randn(4, 3, 32, 32)).mean()
    loss.backward()
    opt.step()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in opt.state} == trainable
    for n, p in model.named_parameters():
        moved = not torch.equal(p, snapshot[n])
        # Weight decay moves every trained weight; frozen ones do not move at all.
        assert moved == (id(p) in trainable), n


def test_no_weight_decay_on_biases_and_norm_weights(model):
    sched = schedule_for(model, layer_lr_decay=0.5)
    stage = sched.stage_at(3)  # everything trains
    opt = build_optimizer(model, sched, stage, weight_decay=0.05)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay_of) == sum(1 for _ in model.parameters())  # each parameter exactly once
    kinds = {"conv": 0, "linear": 0, "norm": 0, "bias": 0}
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            kinds["conv" if isinstance(module, nn.Conv2d) else "linear"] += 1
            assert decay_of[id(module.weight)] == 0.05
        elif isinstance(module, nn.modules.batchnorm._BatchNorm | nn.LayerNorm):
            kinds["norm"] += 1
            assert decay_of[id(module.weight)] == 0.0
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            kinds["bias"] += 1
            assert decay_of[id(bias)] == 0.0
    assert all(kinds.values()), kinds
    # The LRs per layer group are the schedule's, whichever half a parameter is in.
    applied = sched.set_lrs(opt, 3, 0)
    assert applied == sched.lrs(3, 0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(applied[g["name"]])
    assert {f"lr_{g['name']}" for g in opt.param_groups} == {f"lr_{n}" for n in stage.groups}


def test_optimizer_state_of_checkpoints_before_the_split_still_loads(model):
    sched = schedule_for(model)
    stage = sched.stage_at(1)
    sched.apply(model, stage)
    # As checkpoints written before the decay / no-decay split hold it: one group per layer group.
    old_groups = [{"params": [p for p in m.parameters() if p.requires_grad], "name": n,
                   "lr": stage.lr} for n, m in model.layer_groups() if n in stage.groups]
    old = torch.optim.AdamW(old_groups, lr=stage.lr, weight_decay=1e-2)
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    old.step()
    saved = old.state_dict()
    new = build_optimizer(model, sched, stage, weight_decay=1e-2)
    with pytest.raises(ValueError):
        new.load_state_dict(saved)
    new.load_state_dict(sched.split_old_state(model, stage, saved))
    for p in (p for g in old_groups for p in g["params"]):
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
    assert {g["weight_decay"] for g in new.param_groups} == {1e-2, 0.0}
    # A state in today's layout is left alone.
    current = new.state_dict()
    assert sched.split_old_state(model, stage, current) is current


@pytest.mark.parametrize("spec, message", [
    (8, "has 7 groups to unfreeze"),
    (-1, "has 7 groups to unfreeze"),
    (["block9"], "unknown groups"),
    ([], "name at least one group"),
])
def test_bad_stage_groups_are_user_errors(model, spec, message):
    with pytest.raises(UserError, match=message):
        resolve_groups(spec, model.group_names())


def test_named_groups_keep_model_order(model):
    assert resolve_groups(["head", "stem"], model.group_names()) == ("stem", "head")
    assert resolve_groups(7, model.group_names()) == tuple(model.group_names())
    assert math.isclose(sum(s.epochs for s in schedule_for(model).stages), 5)
