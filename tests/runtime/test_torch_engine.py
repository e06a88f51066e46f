"""Tests of planner.runtime.torch_engine: ``plan run --engine torch`` trains as ours does.

For the shipped models (small inputs), a user model and a Hugging Face model, torch's
``PipelineStage`` + schedules and our runtime give the same losses step by step and the same
final parameters on 2 gloo ranks (and both equal single-process training).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from runtime_helpers import assert_matches_reference, make_plan, reference, run_cases

from planner.runtime.config import Engine, RunConfig, RunError
from planner.runtime.torch_engine import check_expressible

CNN = "runtime_models:cnn"


def _small(plan, shape):
    """``plan`` with the model built at a smaller input (the graph does not depend on it)."""
    return dataclasses.replace(plan, profile=dataclasses.replace(plan.profile, input_shape=shape))


def _both_engines(plan, tmp_path, *, steps=2, lr=0.1, against_reference=True):
    """Train ``plan`` on both engines; same losses step by step and same final parameters."""
    model = plan.profile.model
    results = run_cases(
        {"ours": plan, "torch": plan},
        tmp_path,
        steps=steps,
        lr=lr,
        timeout_s=120.0,
        overrides={"torch": {"engine": Engine.TORCH}},
    )
    for engine in ("ours", "torch"):
        errors = {r: res["error"] for r, res in results[engine].items() if res["error"]}
        assert not errors, f"{engine}: ranks failed: {errors}"
    last = plan.stages[-1].ranks[0]
    ours = torch.tensor(results["ours"][last]["losses"])
    theirs = torch.tensor(results["torch"][last]["losses"])
    assert len(theirs) == steps
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)  # step by step
    for rank, result in results["torch"].items():
        for name, value in result["state"].items():
            torch.testing.assert_close(value, results["ours"][rank]["state"][name], msg=name)
    if against_reference:  # and both equal single-process training
        expected, losses = reference(model, plan, steps=steps, lr=lr)
        for engine in ("ours", "torch"):
            assert_matches_reference(model, results[engine], expected, losses)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "cuts", "shape", "schedule"),
    [
        ("resnet50", ["layer3_0_conv1"], (3, 32, 32), "1f1b"),
        ("vgg16", ["features_17"], (3, 32, 32), "gpipe"),
        ("gpt2-small", ["blocks_6_ln1"], (16,), "1f1b"),
        # cut right after scaled_dot_product_attention: on CPU its output is not contiguous
        ("gpt2-tiny", ["transpose"], (16,), "1f1b"),
    ],
)
def test_shipped_models_train_the_same_on_both_engines(model, cuts, shape, schedule, tmp_path):
    torch.set_num_threads(1)
    plan = make_plan(model, cuts=cuts, replicas=[1, 1], schedule=schedule, microbatches=2)
    # Deep nets with BatchNorm on tiny inputs amplify rounding over steps: the engines run the
    # same stage code, so they are compared with each other exactly; one step is still exact.
    _both_engines(_small(plan, shape), tmp_path, lr=0.01, against_reference=False)


@pytest.mark.distributed
def test_user_model_with_relayed_values_trains_the_same_on_both_engines(tmp_path):
    torch.set_num_threads(1)
    plan = make_plan(CNN, cuts=["relu_1", "block1_conv2"], replicas=[1, 1, 1], microbatches=3)
    _both_engines(plan, tmp_path)


@pytest.mark.distributed
def test_uniform_replication_runs_as_pipeline_copies(tmp_path):
    torch.set_num_threads(1)
    plan = make_plan(
        "gpt2-tiny", cuts=["blocks_1_ln1"], replicas=[2, 2], microbatches=4, microbatch_size=1
    )
    _both_engines(plan, tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(schedule="pipedream"), r"no pipedream schedule.*--engine ours"),
        (dict(replicas=[2, 1]), r"replicates stages 2-1; run it with --engine ours"),
        (dict(replicas=[2, 2], microbatches=3), r"3 microbatches do not split evenly over 2"),
        (dict(recompute=True), r"do not recompute activations"),
        (dict(microbatches=1), r"this plan has 1 for 2 stages.*--microbatches 2 or more"),
    ],
)
def test_plans_torch_cannot_express_get_one_line(kwargs, match):
    plan = make_plan(CNN, cuts=["block1_conv2"], **{"replicas": [1, 1], **kwargs})
    with pytest.raises(RunError, match=match) as info:
        check_expressible(plan, RunConfig(plan_path="p.json", engine=Engine.TORCH))
    assert "\n" not in str(info.value)


def test_tied_weights_and_checkpoints_are_refused():
    plan = make_plan(CNN, cuts=["block1_conv2"], replicas=[1, 1])
    config = RunConfig(plan_path="p.json", engine=Engine.TORCH)
    with pytest.raises(RunError, match=r"shared by several stages"):
        check_expressible(plan, config, shared=("tied",))
    with pytest.raises(RunError, match=r"checkpoints"):
        check_expressible(plan, dataclasses.replace(config, checkpoint_dir="ck"))


def test_engine_option_round_trips():
    config = RunConfig(plan_path="p.json", engine=Engine.TORCH)
    assert RunConfig.from_argv(config.to_argv()) == config
    assert RunConfig.from_argv(["p.json"]).engine is Engine.OURS


@pytest.mark.parametrize("copy", [False, True])
def test_stage_outputs_and_input_gradients_are_contiguous_for_torchs_sends(copy: bool) -> None:
    # gloo sends contiguous tensors only; torch's PipelineStage sends what the stage returns, and
    # upstream the input gradient as autograd gives it (a transpose's gradient is transposed)
    from planner.runtime.comm import BoundaryMeta
    from planner.runtime.torch_engine import _FlatStage

    class Transposing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (x.transpose(1, 2) * 2,)

    x = torch.randn(2, 3, 4, requires_grad=True)
    inputs = BoundaryMeta.from_values(["x"], {"x": x})
    outputs = BoundaryMeta.from_values(["y"], {"y": x.transpose(1, 2)})
    stage = _FlatStage(Transposing(), inputs, outputs, copy_outputs=copy)
    (out,) = stage(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, x.transpose(1, 2) * 2)
    (grad,) = torch.autograd.grad(out, x, torch.ones(2, 4, 3).transpose(1, 2).transpose(1, 2))
    assert grad.is_contiguous()
    torch.testing.assert_close(grad, torch.full_like(x, 2.0))
