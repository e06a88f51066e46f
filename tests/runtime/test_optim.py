"""The run's optimizer settings: plan vs options, what differs from the plan, clipping math."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from runtime_helpers import make_plan

from planner.runtime.buffers import frozen_buffers
from planner.runtime.config import RunConfig, RunError
from planner.runtime.loops import optimizer_settings, training_notes
from planner.runtime.optim import GradientClipper, OptimizerSettings, TrainOptimizer

MLP = "runtime_models:mlp"


def _plan(**kw):  # type: ignore[no-untyped-def]
    return make_plan(MLP, cuts=["_3"], replicas=[1, 1], **kw)


@pytest.mark.parametrize(
    ("kind", "cls", "state"),
    [
        ("sgd", torch.optim.SGD, 0),
        ("momentum", torch.optim.SGD, 1),
        ("adam", torch.optim.Adam, 2),
        ("adamw", torch.optim.AdamW, 2),
    ],
)
def test_each_kind_builds_its_torch_optimizer(kind: str, cls: type, state: int) -> None:
    settings = OptimizerSettings.resolve(plan_kind="sgd", kind=kind, lr=0.5, weight_decay=0.1)
    opt = settings.build([torch.nn.Parameter(torch.ones(3))])
    assert type(opt) is cls
    assert opt.defaults["lr"] == 0.5 and opt.defaults["weight_decay"] == 0.1
    assert settings.state_factor == state
    if kind == "momentum":
        assert opt.defaults["momentum"] == 0.9
    if kind == "sgd":
        assert opt.defaults["momentum"] == 0.0
    assert settings.build([]) is None


def test_plan_settings_apply_unless_the_run_overrides() -> None:
    plan = _plan(optimizer="adam", weight_decay=0.01, clip_grad_norm=2.0)
    s = optimizer_settings(plan, RunConfig(plan_path="p.json", lr=0.001))
    assert (s.kind, s.weight_decay, s.clip_grad_norm) == (TrainOptimizer.ADAM, 0.01, 2.0)
    s = optimizer_settings(
        plan, RunConfig(plan_path="p.json", optimizer="adamw", weight_decay=0.0, clip_grad=1.0)
    )
    assert (s.kind, s.weight_decay, s.clip_grad_norm) == (TrainOptimizer.ADAMW, 0.0, 1.0)
    assert training_notes(plan, RunConfig(plan_path="p.json")) == []


def test_notes_say_how_memory_differs_from_the_plan() -> None:
    notes = training_notes(_plan(), RunConfig(plan_path="p.json", optimizer="adam"))
    assert len(notes) == 1
    assert "the plan assumed optimizer sgd; training with adam" in notes[0]
    assert "2x the parameters, the plan counted 0x" in notes[0]
    # sgd with momentum keeps one buffer: memory differs from a plain sgd plan
    (note,) = training_notes(_plan(), RunConfig(plan_path="p.json", momentum=0.9))
    assert "counted 0x" in note and "1x" in note
    # adamw has adam's memory: the kind differs, memory does not
    (note,) = training_notes(
        _plan(optimizer="adam"), RunConfig(plan_path="p.json", optimizer="adamw")
    )
    assert "memory" not in note
    notes = training_notes(_plan(weight_decay=0.1), RunConfig(plan_path="p.json", weight_decay=0.0))
    assert notes == ["the plan says weight decay 0.1; training with 0"]


def test_bad_combinations_are_one_line_errors() -> None:
    with pytest.raises(RunError, match="does not apply to adam"):
        optimizer_settings(_plan(optimizer="adam"), RunConfig(plan_path="p", momentum=0.9))
    with pytest.raises(RunError, match="global step"):
        optimizer_settings(_plan(schedule="pipedream"), RunConfig(plan_path="p", clip_grad=1.0))
    with pytest.raises(RunError, match="--optimizer 'lamb'"):
        RunConfig(plan_path="p", optimizer="lamb")
    with pytest.raises(RunError, match="--clip-grad"):
        RunConfig(plan_path="p", clip_grad=0.0)
    with pytest.raises(RunError, match="--weight-decay"):
        RunConfig(plan_path="p", weight_decay=-1.0)


def test_run_config_round_trips_the_optimizer_options() -> None:
    cfg = RunConfig(
        plan_path="p.json", optimizer="adamw", momentum=None, weight_decay=0.01, clip_grad=0.5
    )
    assert RunConfig.from_argv(cfg.to_argv()) == cfg
    cfg = dataclasses.replace(cfg, optimizer=None, momentum=0.5, clip_grad=None)
    assert RunConfig.from_argv(cfg.to_argv()) == cfg


def test_plan_round_trips_weight_decay_and_clipping() -> None:
    from planner.plan import Plan

    plan = _plan(optimizer="momentum", weight_decay=0.01, clip_grad_norm=1.5)
    assert Plan.from_json(plan.to_json()) == plan
    doc = plan.to_dict()
    del doc["weight_decay"], doc["clip_grad_norm"]  # a plan written before these fields
    old = Plan.from_dict(doc)
    assert (old.weight_decay, old.clip_grad_norm) == (0.0, None)


def test_clipper_on_one_process_equals_clip_grad_norm() -> None:
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b, strict=True):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(a, 0.7)
    clipper = GradientClipper(
        max_norm=0.7, counted=b, scaled=b, group=None, device=torch.device("cpu")
    )
    norm = clipper.clip()
    assert norm == pytest.approx(float(expected), rel=1e-6)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(q.grad, p.grad)
    # below the limit nothing changes
    before = [q.grad.clone() for q in b]
    GradientClipper(
        max_norm=100.0, counted=b, scaled=b, group=None, device=torch.device("cpu")
    ).clip()
    for q, g in zip(b, before, strict=True):
        torch.testing.assert_close(q.grad, g)


def test_recomputation_leaves_batchnorm_statistics_alone() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(8, 4)
    net(x)
    mean, var = net[1].running_mean.clone(), net[1].running_var.clone()
    with frozen_buffers(net):
        out = net(x)
    out.sum().backward()  # the statistics were not changed behind autograd's back
    torch.testing.assert_close(net[1].running_mean, mean)
    torch.testing.assert_close(net[1].running_var, var)
    assert int(net[1].num_batches_tracked) == 1 and net[1].momentum == 0.1


def test_weight_stash_keeps_weights_per_version_and_optimizer_state_once() -> None:
    """What the cost model counts under pipedream: P per weight version, optimizer state once."""
    from planner.runtime.pipedream import WeightStash

    net = torch.nn.Linear(3, 2)
    opt = OptimizerSettings(kind=TrainOptimizer.ADAM, lr=0.1).build(list(net.parameters()))
    assert opt is not None
    stash = WeightStash(net, limit=2)
    w0 = stash.forward_weights(0)
    torch.func.functional_call(net, w0, (torch.randn(4, 3),)).sum().backward()
    stash.backward_done(0)
    opt.step()
    stash.updated()
    stash.forward_weights(1)  # a new version after the update; version 0 was released
    stash.forward_weights(2)
    assert stash.versions == 1
    held = [t for version in stash._versions.values() for t in version.values()]
    assert sorted(t.numel() for t in held) == [2, 6]  # the weights, nothing else
    assert set(opt.state) == set(net.parameters())  # one Adam state, for the live weights
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in opt.state.values())
