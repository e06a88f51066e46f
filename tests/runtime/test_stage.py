"""Cutting models into stages: boundaries, relays, stage modules, checks against the plan."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from runtime_helpers import make_plan
from torch import nn

from planner.errors import PlanError
from planner.models import load_model
from planner.profile.capture import capture
from planner.runtime.comm import BoundaryMeta, TensorMeta
from planner.runtime.data import microbatch
from planner.runtime.stage import (
    build_stage_module,
    capture_for_plan,
    cut_graph,
    propagate,
    shared_parameters,
)


class _InputAtTheEnd(nn.Module):
    """Reads its input again in the last layer, so the input must be relayed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.fc1(x))) + x


def _run_stages(captured, cut, inputs):
    """Run every stage module in turn, passing values through flatten/unflatten as the runtime."""
    values = propagate(captured, inputs)
    metas = [BoundaryMeta.from_values(names, values) for names in cut.boundaries]
    current = list(inputs)
    for s in range(cut.num_stages):
        out = build_stage_module(captured, cut, s)(*current)
        if s == cut.num_stages - 1:
            return out
        received = [
            t.detach().clone().requires_grad_(m.requires_grad)
            for t, m in zip(metas[s].flatten(out), metas[s].tensors, strict=True)
        ]
        current = metas[s].unflatten(received)
    raise AssertionError("unreachable")


def test_skip_connection_is_relayed_through_intermediate_stages() -> None:
    captured = capture(load_model("runtime_models:cnn", batch_size=1).module)
    cut = cut_graph(captured, _split(captured, ["relu_1", "block1_conv2"]))
    # "relu" is the residual block's input: made in stage 0, read by "add" in stage 2
    assert cut.boundaries == (("relu", "block1_conv1"), ("relu", "relu_1"))
    assert cut.stage_inputs(1) == ("relu", "block1_conv1")
    assert cut.stage_outputs(2) == ()


def test_model_input_read_late_is_relayed() -> None:
    captured = capture(_InputAtTheEnd())
    cut = cut_graph(captured, _split(captured, ["fc2", "fc3"]))
    assert cut.inputs == ("x",)
    assert cut.boundaries == (("x", "fc1"), ("x", "fc2"))
    x = torch.randn(3, 4)
    torch.testing.assert_close(_run_stages(captured, cut, [x]), captured.module(x))


@pytest.mark.parametrize(
    ("model", "cuts"),
    [
        ("runtime_models:cnn", ["relu_1", "block1_conv2", "view"]),  # relay and an int (size) cut
        ("gpt2-tiny", ["getitem", "blocks_1_ln1"]),  # a tuple (unbind) crosses the cut
        ("runtime_models:gpt_tied", ["add", "ln_f"]),
    ],
)
def test_stage_modules_compose_to_the_model(model: str, cuts: list[str]) -> None:
    spec = load_model(model, batch_size=2)
    captured = capture(spec.module)
    cut = cut_graph(captured, _split(captured, cuts))
    inputs, _ = spec.make_batch(2, 0)
    torch.testing.assert_close(_run_stages(captured, cut, list(inputs)), captured.module(*inputs))


def test_shape_values_cross_as_constants() -> None:
    captured = capture(load_model("runtime_models:cnn", batch_size=1).module)
    cut = cut_graph(captured, _split(captured, ["view"]))
    assert cut.boundaries == (("adaptive_avg_pool2d", "size"),)
    values = propagate(captured, [torch.zeros(2, 3, 8, 8)])
    meta = BoundaryMeta.from_values(cut.boundaries[0], values)
    assert meta.leaves[1] == (2,)  # x.size(0) for a microbatch of 2: baked in, not sent
    assert meta.tensors == (
        TensorMeta(shape=(2, 8, 1, 1), dtype=torch.float32, requires_grad=True),
    )


def test_relayed_model_input_carries_no_gradient() -> None:
    captured = capture(_InputAtTheEnd())
    cut = cut_graph(captured, _split(captured, ["fc2"]))
    meta = BoundaryMeta.from_values(cut.boundaries[0], propagate(captured, [torch.zeros(2, 4)]))
    assert [t.requires_grad for t in meta.tensors] == [False, True]
    assert meta.grad_indices == (1,)


def test_tied_embedding_is_shared_between_first_and_last_stage() -> None:
    captured = capture(load_model("runtime_models:gpt_tied", batch_size=1).module)
    cut = cut_graph(captured, _split(captured, ["add_1", "blocks_1_ln1"]))
    (shared,) = shared_parameters(captured, cut)
    assert shared.stages == (0, 2)
    assert shared.names == ("tok_emb.weight", "lm_head.weight")
    assert shared.name_in(2) == "lm_head.weight"


def test_untied_model_shares_nothing() -> None:
    captured = capture(load_model("gpt2-tiny", batch_size=1).module)
    assert shared_parameters(captured, cut_graph(captured, _split(captured, ["ln_f"]))) == ()


def test_stage_module_holds_only_its_own_parameters() -> None:
    captured = capture(load_model("runtime_models:cnn", batch_size=1).module)
    cut = cut_graph(captured, _split(captured, ["block1_conv2"]))
    names = {n for n, _ in build_stage_module(captured, cut, 1).named_parameters()}
    assert names == {
        "block1.conv2.weight",
        "block1.conv2.bias",
        "block2.conv1.weight",
        "block2.conv1.bias",
        "block2.conv2.weight",
        "block2.conv2.bias",
        "fc.weight",
        "fc.bias",
    }


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([["_0", "_1"], ["_2", "_9"]], "lacks"),
        ([["_0", "_1"], ["_2", "_3", "_4"]], "in no stage"),
        ([["_0", "_1", "_2"], ["_2", "_3", "_4", "_5", "_6"]], "stage 0 and stage 1"),
        ([["_0", "_2", "_3", "_4", "_5", "_6"], ["_1"]], "later stage"),
    ],
)
def test_bad_assignments_are_refused(stages: list[list[str]], message: str) -> None:
    captured = capture(load_model("runtime_models:mlp", batch_size=1).module)
    with pytest.raises(PlanError, match=message):
        cut_graph(captured, stages)


def test_plan_for_another_model_is_refused() -> None:
    plan = make_plan("runtime_models:mlp", cuts=["_3"], replicas=[1, 1])
    other = dataclasses.replace(plan.profile, graph_hash="0123456789abcdef")
    with pytest.raises(PlanError, match="graph hash"):
        capture_for_plan(
            dataclasses.replace(plan, profile=other),
            load_model("runtime_models:mlp", batch_size=2).module,
        )
    no_hash = dataclasses.replace(plan, profile=dataclasses.replace(plan.profile, graph_hash=None))
    with pytest.raises(PlanError, match="lacks"):  # without a hash, the layer names decide
        capture_for_plan(no_hash, load_model("runtime_models:cnn", batch_size=2).module)


def test_microbatch_is_a_slice_of_the_minibatch() -> None:
    spec = load_model("runtime_models:mlp", batch_size=8)
    batch = spec.make_batch(8, 3)
    inputs, targets = microbatch(batch, 2, size=2)
    torch.testing.assert_close(inputs[0], batch[0][0][4:6])
    torch.testing.assert_close(targets, batch[1][4:6])


def _split(captured, cuts: list[str]) -> list[list[str]]:
    names = [layer.name for layer in captured.layers]
    starts = [0, *(names.index(c) for c in cuts), len(names)]
    return [names[a:b] for a, b in itertools.pairwise(starts)]


def test_release_other_stages_keeps_the_stage_and_frees_the_rest() -> None:
    import torch

    from planner.runtime.stage import release_other_stages

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    captured = capture(net)
    cut = cut_graph(captured, [["_0", "_1"], ["_2", "_3"]])
    stage = build_stage_module(captured, cut, 1)
    x = torch.randn(3, 8)
    before = stage(x).detach()
    released = release_other_stages(net, stage)
    # Linear(4, 8) weights and bias, BatchNorm's weight, bias, two statistics and its counter
    assert released == (4 * 8 + 8) * 4 + 4 * 8 * 4 + 8
    assert net[0].weight.numel() == 0 and net[1].running_mean.numel() == 0
    torch.testing.assert_close(stage(x), before)
    assert release_other_stages(net, None) == (8 * 2 + 2) * 4  # an idle rank keeps nothing
