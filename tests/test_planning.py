"""From a profile and a topology to a Plan: sizes, PipeDream's dropped nodes, options."""

from __future__ import annotations

import pytest
from conftest import pipedream_graph

from planner.errors import PlannerError
from planner.planning import (
    MAX_MICROBATCH_CANDIDATES,
    PlanOptions,
    _sizes,
    make_plan,
    shipped_profile,
)
from planner.profile import LayerProfile, Profile
from planner.profile.pipedream import read_graph_txt
from planner.schedules import Schedule
from planner.topology import Topology


def _chain(batch: int = 32, n: int = 6) -> Profile:
    layers = tuple(
        LayerProfile(
            name=f"l{i}",
            op="Linear",
            forward_ms=1.0 + i,
            backward_ms=2.0,
            output_bytes=(4096,),
            parameter_bytes=1 << 20,
            inputs=() if i == 0 else (i - 1,),
        )
        for i in range(n)
    )
    return Profile(model="chain", batch_size=batch, layers=layers)


@pytest.mark.parametrize(
    ("options", "devices", "expected"),
    [
        # 1f1b: profile batch per device; the counts whose microbatch is within 1/4..4x the
        # profiled batch are searched (8 microbatches of 32, 4 of 64, 16 of 16, ...)
        (PlanOptions(), 8, (256, [2, 4, 8, 16, 32])),
        (PlanOptions(schedule=Schedule.GPIPE, minibatch_size=64), 8, (64, [1, 2, 4, 8])),
        (PlanOptions(schedule=Schedule.PIPEDREAM), 8, (32, [1])),
        (PlanOptions(minibatch_size=96, microbatches=3), 4, (96, [3])),
    ],
)
def test_sizes(options, devices, expected):
    assert _sizes(_chain(), Topology.from_args(gpus=devices), options) == expected


def test_sizes_pick_the_divisor_closest_to_the_profiled_batch():
    minibatch, counts = _sizes(
        _chain(),
        Topology.from_args(gpus=4),
        PlanOptions(schedule=Schedule.PIPEDREAM, minibatch_size=100),
    )
    assert minibatch == 100 and counts == [4]  # 25 per microbatch: the divisor nearest 32
    assert 100 % counts[0] == 0


def test_sizes_are_bounded_and_never_loop_over_the_minibatch():
    # 10^12 samples: divisors by factorisation, at most a few counts near the profiled batch
    minibatch, counts = _sizes(
        _chain(), Topology.from_args(gpus=8), PlanOptions(minibatch_size=10**12)
    )
    assert minibatch == 10**12
    assert 1 <= len(counts) <= MAX_MICROBATCH_CANDIDATES
    assert all(8 <= minibatch // m <= 128 and minibatch % m == 0 for m in counts)
    _, prime = _sizes(_chain(), Topology.from_args(gpus=8), PlanOptions(minibatch_size=1009))
    assert prime == [1]  # no divisor near 32: the closest alone (one microbatch of 1009)


def test_an_awkward_batch_size_does_not_leave_devices_idle():
    """The issue's case: resnet50, 8 devices, --batch-size 30 planned 1 stage on 1 device (30 = 1
    microbatch of 30); the default search finds the pipeline (3 microbatches of 10)."""
    path = shipped_profile("resnet50")
    assert path is not None
    plan = make_plan(
        Profile.load(path), path, Topology.from_args(gpus=8), PlanOptions(minibatch_size=30)
    )
    assert plan.microbatches > 1
    assert sum(stage.replicas for stage in plan.stages) > 1


def test_auto_microbatches_stay_near_the_profiled_batch():
    _, counts = _sizes(
        _chain(),
        Topology.from_args(gpus=4),
        PlanOptions(minibatch_size=256, auto_microbatches=True),
    )
    assert counts == [2, 4, 8, 16, 32]  # microbatches 128 .. 8, i.e. 4x .. 1/4 of 32


def test_microbatches_must_divide_the_minibatch():
    with pytest.raises(PlannerError, match="does not split into 3"):
        _sizes(_chain(), Topology.from_args(gpus=4), PlanOptions(minibatch_size=32, microbatches=3))


def test_make_plan_round_trips_and_checks(tmp_path):
    profile = _chain()
    path = tmp_path / "chain.json"
    profile.save(path)
    plan = make_plan(profile, path, Topology.from_args(gpus=2), PlanOptions(straight=True))
    plan.check_profile(profile)
    assert plan.microbatch_size * plan.microbatches == plan.minibatch_size == 64
    assert [b.name for b in plan.baselines] == [
        "data-parallel",
        "gpipe-balanced",
        "uniform",
        "parameters",
    ]
    assert plan.predicted.samples_per_s == pytest.approx(64 / plan.predicted.minibatch_s)


def test_pipedream_input_nodes_join_the_first_stage(tmp_path):
    profile = read_graph_txt(pipedream_graph("vgg16"))
    path = tmp_path / "vgg16.json"
    profile.save(path)
    plan = make_plan(
        profile,
        path,
        Topology.from_args(gpus=4, bandwidth_gbps=10),
        PlanOptions(schedule=Schedule.PIPEDREAM, cost_model="pipedream"),
    )
    plan.check_profile(profile)  # every layer, Input included, in exactly one stage
    assert "node1" in plan.stages[0].layers  # PipeDream's Input source: dropped for solving


def test_shipped_profiles_are_found():
    assert shipped_profile("resnet50") is not None
    assert shipped_profile("no-such-model") is None
