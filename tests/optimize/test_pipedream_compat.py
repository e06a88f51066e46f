"""PipeDream's own numbers on its own profiles, and the DAG-aware DP against one order.

Reference values: ``optimizer_graph_hierarchical.py`` (msr-fiddle/pipedream) with
``--use_memory_constraint`` and its default ``--memory_size`` of 16e9 bytes, every device used,
seconds per stage. "4x2" is ``-n 4 2 -b 25e9 10e9``: levels innermost first.
"""

from __future__ import annotations

import math

import pytest
from conftest import pipedream_graph

from planner.optimize import dp
from planner.optimize.cost import (
    PIPEDREAM_DEFAULT_MEMORY_BYTES,
    CostModel,
    CostModelKind,
    SolverOptions,
)
from planner.optimize.states import build_states
from planner.profile import Profile
from planner.profile.pipedream import pipedream_preprocess, read_graph_txt
from planner.topology import Level, Topology

BATCH = {"alexnet": 256, "resnet18": 256, "resnet50": 128, "vgg16": 128, "gnmt": 128}
REFERENCE = [
    # model, devices per level (innermost first), bandwidths, seconds per stage, replicas
    ("vgg16", (8,), (10e9,), 0.0899265, [7, 1]),
    ("resnet50", (8,), (10e9,), 0.055915, None),
    ("gnmt", (8,), (10e9,), 0.017125, None),
    ("alexnet", (4,), (10e9,), 0.022186, None),
    ("resnet18", (8,), (10e9,), 0.0332803, None),
    ("vgg16", (4, 2), (25e9, 10e9), 0.0927640, None),
]


def _profile(model: str):
    return pipedream_preprocess(
        read_graph_txt(pipedream_graph(model), model=model, batch_size=BATCH[model])
    )


def _pipedream_cost(model, devices, bandwidths, **options) -> CostModel:
    topo = Topology(
        levels=tuple(
            Level(devices=d, bandwidth_bytes_per_s=b)
            for d, b in zip(devices, bandwidths, strict=True)
        ),
        memory_bytes=PIPEDREAM_DEFAULT_MEMORY_BYTES,
    )
    opts = SolverOptions(cost_model=CostModelKind.PIPEDREAM, allow_fewer_devices=False, **options)
    return CostModel(_profile(model), topo, opts)


@pytest.mark.parametrize(("model", "devices", "bandwidths", "expected", "replicas"), REFERENCE)
def test_reproduces_pipedreams_optimizer(model, devices, bandwidths, expected, replicas):
    part = dp.solve(_pipedream_cost(model, devices, bandwidths))
    assert part.bottleneck_s == pytest.approx(expected, rel=5e-3)  # the tolerance
    assert part.bottleneck_s == pytest.approx(expected, rel=1e-5)  # what we actually get
    assert part.num_devices_used == math.prod(devices)  # PipeDream uses every device
    assert part.cost_model == "pipedream"
    if replicas is not None:
        assert [s.replicas for s in part.stages] == replicas
    layers = sorted(i for s in part.stages for i in s.layers)
    assert layers == list(range(len(_profile(model))))


def test_pipedreams_antichain_dag_on_resnet50():
    # PipeDream reports 240 states for ResNet-50 after dropping its input; we add the empty root
    assert len(build_states(_profile("resnet50"), "antichain")) == 241


def test_dag_states_beat_one_order_on_resnet50():
    cost = _pipedream_cost("resnet50", (8,), (10e9,))
    profile = cost.profile
    one_order = dp.solve(cost, states=build_states(profile, "profile")).bottleneck_s
    dag = dp.solve(cost, states=build_states(profile, "auto")).bottleneck_s
    assert one_order == pytest.approx(0.05658, rel=1e-4)  # the single-order number
    assert dag == pytest.approx(0.05592, rel=1e-4)
    assert dag < one_order


def test_dag_states_never_lose_under_the_planner_model():
    profile = _profile("resnet50")
    cost = CostModel(profile, Topology.from_args(gpus=8, bandwidth_gbps=10, memory_gb=32))
    one_order = dp.solve(cost, states=build_states(profile, "profile")).bottleneck_s
    dag = dp.solve(cost).bottleneck_s
    assert dag <= one_order * (1 + 1e-12)


def test_activation_compression_counts_transfers():
    plain = dp.solve(_pipedream_cost("alexnet", (4,), (10e9,))).bottleneck_s
    counted = dp.solve(
        _pipedream_cost("alexnet", (4,), (10e9,), activation_compression_ratio=1.0)
    ).bottleneck_s
    assert counted >= plain


@pytest.mark.slow
def test_pipedream_model_two_levels_on_resnet50():
    part = dp.solve(_pipedream_cost("resnet50", (4, 2), (25e9, 10e9)))
    flat = dp.solve(_pipedream_cost("resnet50", (8,), (10e9,)))
    assert part.num_devices_used == 8
    assert part.bottleneck_s <= flat.bottleneck_s * 1.2  # faster links inside the servers help


@pytest.mark.parametrize(("model", "devices", "bandwidths", "expected", "replicas"), REFERENCE)
def test_reproduces_pipedream_from_the_cli_without_a_memory_option(
    tmp_path, capsys, model, devices, bandwidths, expected, replicas
):
    """``plan --cost-model pipedream`` alone takes PipeDream's defaults (16e9 bytes, every device
    used), so its own numbers come out of the command line."""
    from planner.cli import main
    from planner.plan import Plan

    profile = tmp_path / f"{model}.json"
    graph = str(pipedream_graph(model))
    assert (
        main(["import-pipedream", graph, "-o", str(profile), "--batch-size", str(BATCH[model])])
        == 0
    )
    topology = ["--gpus", str(math.prod(devices)), "--bandwidth", f"{bandwidths[0] / 1e9:g}"]
    if len(devices) > 1:
        topology += ["--gpus-per-node", str(devices[0])]
        topology += ["--inter-node-bandwidth", f"{bandwidths[1] / 1e9:g}"]
    out = tmp_path / "plan.json"
    argv = ["--profile", str(profile), *topology, "--schedule", "pipedream"]
    assert main([*argv, "--cost-model", "pipedream", "-o", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.predicted.bottleneck_s == pytest.approx(expected, rel=1e-5)
    assert sum(s.replicas for s in plan.stages) == math.prod(devices)
    assert plan.topology.memory_bytes == PIPEDREAM_DEFAULT_MEMORY_BYTES
    if replicas is not None:
        assert [s.replicas for s in plan.stages] == replicas
    printed = capsys.readouterr().out
    assert "memory per stage under the planner's model" in printed
    # one level over a complete antichain space (every downset, e.g. VGG16's chain): PipeDream's
    # DP is exact there, so the plan is proven optimal; its hierarchy on two levels is not
    complete = len(build_states(Profile.load(profile), "antichain")) == len(
        build_states(Profile.load(profile), "all")
    )
    assert plan.optimal is ((len(devices) == 1 and complete) or plan.gap == 0.0)
