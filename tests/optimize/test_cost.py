"""The cost model's formulas, checked against numbers worked out by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from planner.errors import PlanError
from planner.optimize.cost import (
    CostModel,
    CostModelKind,
    DownsetTables,
    SolverOptions,
    allreduce_s,
    boundary_link_level,
    contiguous_ranks,
    in_flight,
    link_s,
    replica_share,
    schedule_objective,
)
from planner.profile import LayerProfile, Profile
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Level, Topology


def _layer(name, fwd, out, params, inputs=(), saved=None):
    return LayerProfile(
        name=name,
        op="",
        forward_ms=fwd,
        backward_ms=2 * fwd,
        output_bytes=(out,),
        parameter_bytes=params,
        inputs=inputs,
        saved_bytes=saved,
    )


# a -> b -> c with a skip a -> c; times in ms, sizes in bytes
SKIP = Profile(
    model="skip",
    batch_size=1,
    layers=(
        _layer("a", 1.0, 100, 1000),
        _layer("b", 2.0, 200, 2000, (0,)),
        _layer("c", 3.0, 300, 3000, (0, 1)),
    ),
)
# one level of 4 devices, 1e5 bytes/s and 1 ms per message
FLAT = Topology(
    levels=(Level(devices=4, bandwidth_bytes_per_s=1e5, latency_s=1e-3),), memory_bytes=1e6
)


def _cost(**options) -> CostModel:
    return CostModel(SKIP, FLAT, SolverOptions(**options))


def test_link_and_allreduce_formulas():
    assert link_s(100, 1e5, 1e-3) == pytest.approx(2 * (1e-3 + 1e-3))
    assert link_s(0, 1e5, 1e-3) == 0.0
    # ring: 2 (m-1)/m of the bytes, 2 (m-1) latencies
    assert allreduce_s(3000, 2, 1e5, 1e-3) == pytest.approx(0.03 + 0.002)
    assert allreduce_s(3000, 4, 1e5) == pytest.approx(2 * 3 / 4 * 0.03)
    assert allreduce_s(3000, 1, 1e5, 1e-3) == 0.0


def test_in_flight_per_schedule():
    # PipeDream NOAM from this stage on: ceil(devices from here / replicas)
    assert in_flight(Schedule.PIPEDREAM, 3, 1, 1) == 3
    assert in_flight(Schedule.PIPEDREAM, 3, 2, 1) == 2
    # 1f1b: the same, at most the microbatches a replica sees
    assert in_flight(Schedule.ONE_F_ONE_B, 8, 1, 4) == 4
    assert in_flight(Schedule.ONE_F_ONE_B, 3, 1, 4) == 3
    # gpipe keeps every microbatch it processes
    assert in_flight(Schedule.GPIPE, 1, 2, 5) == 3


def test_cut_bytes_counts_skip_connections_once():
    cost = _cost()
    assert cost.cut_bytes([0]) == 100.0  # a's output, read by b and c, relayed once
    assert cost.cut_bytes([0, 1]) == 300.0  # a (for c) and b
    assert cost.cut_bytes([0, 1, 2]) == 0.0
    assert cost.cut_bytes(np.array([True, False, False])) == 100.0


def test_downset_tables_are_prefix_sums():
    cost = _cost()
    t = DownsetTables.prefixes(cost)
    assert t.cut_bytes.tolist() == [0.0, 100.0, 300.0, 0.0]
    assert t.compute_s[3] - t.compute_s[1] == pytest.approx(0.006 + 0.009)
    assert t.parameter_bytes[2] - t.parameter_bytes[0] == 3000
    assert t.saved_bytes[3] == 600


def test_straight_pipeline_by_hand():
    p = _cost().evaluate([[0], [1], [2]], [1, 1, 1])
    # stage times: max(compute, link in, link out); links 2 (1 ms + bytes / 1e5)
    assert [s.time_s for s in p.stages] == pytest.approx([0.004, 0.008, 0.009])
    assert [s.comm_s for s in p.stages] == pytest.approx([0.004, 0.012, 0.008])
    assert p.bottleneck_s == pytest.approx(0.009)
    assert p.objective_s == p.bottleneck_s
    # pipedream, sgd: weights x (versions = in flight S - s) + gradients + saved x in flight
    assert [s.memory_bytes for s in p.stages] == pytest.approx([4300, 6400, 6300])
    assert [s.ranks for s in p.stages] == [(0,), (1,), (2,)]


def test_replicated_stage_by_hand():
    p = _cost().evaluate([[0, 1], [2]], [2, 1])
    first = p.stages[0]
    assert first.allreduce_s == pytest.approx(0.032)  # 3000 bytes among 2 replicas
    # pipedream: each replica all-reduces after each of its microbatches, unhidden
    assert first.time_s == pytest.approx((0.009 + 0.032) / 2)
    assert p.bottleneck_s == pytest.approx(0.0205)
    # 2 of 3 devices from here, 2 replicas: ceil(3 / 2) = 2 in flight
    assert first.memory_bytes == pytest.approx(3000 * 2 + 3000 + 300 * 2)


def test_flush_schedules_by_hand():
    p = _cost(schedule=Schedule.ONE_F_ONE_B, microbatches=4).evaluate([[0, 1], [2]], [2, 1])
    # steady state without the all-reduce; (M + S - 1) slots, then the largest all-reduce
    assert [s.time_s for s in p.stages] == pytest.approx([0.0045, 0.009])
    assert p.minibatch_s == pytest.approx((4 + 2 - 1) * 0.009 + 0.032)
    assert p.objective_s == p.minibatch_s
    assert p.stages[0].memory_bytes == pytest.approx(3000 * 2 + 300 * 2)  # one weight version
    adam = _cost(schedule=Schedule.ONE_F_ONE_B, microbatches=4, optimizer=OptimizerKind.ADAM)
    assert adam.evaluate([[0, 1], [2]], [2, 1]).stages[0].memory_bytes == pytest.approx(12600)
    gpipe = _cost(schedule=Schedule.GPIPE, microbatches=4).evaluate([[0, 1], [2]], [2, 1])
    assert [s.memory_bytes for s in gpipe.stages] == pytest.approx(
        [3000 * 2 + 300 * 2, 3000 * 2 + 300 * 4]
    )


@pytest.mark.parametrize("schedule", [Schedule.ONE_F_ONE_B, Schedule.GPIPE])
def test_flushed_replicas_are_charged_their_busiest_replica(schedule):
    # round-robin: with M = 5 on 2 replicas one replica runs 3 microbatches, not 2.5
    p = _cost(schedule=schedule, microbatches=5).evaluate([[0, 1], [2]], [2, 1])
    assert p.stages[0].time_s == pytest.approx(0.009 * 3 / 5)
    assert p.minibatch_s == pytest.approx((5 + 2 - 1) * 0.009 + 0.032)
    # M = 4 on 3 replicas: 2 of 4 each on the busiest, as on 2 replicas
    three = _cost(schedule=schedule, microbatches=4).evaluate([[0, 1], [2]], [3, 1])
    assert three.stages[0].time_s == pytest.approx(0.009 * 2 / 4)


def test_replica_share():
    assert replica_share(Schedule.PIPEDREAM, 3, 8) == pytest.approx(1 / 3)  # steady state
    assert replica_share(Schedule.ONE_F_ONE_B, 3, 8) == pytest.approx(3 / 8)
    assert replica_share(Schedule.GPIPE, 4, 8) == pytest.approx(1 / 4)  # R divides M: M / R
    assert replica_share(Schedule.GPIPE, 16, 8) == pytest.approx(1 / 8)  # at least one each
    assert replica_share(Schedule.GPIPE, 1, 8) == 1.0


def test_recomputation_by_hand():
    p = _cost(recompute=True).evaluate([[0], [1], [2]], [1, 1, 1])
    # one more forward each; memory keeps the stage input per microbatch plus one's internals
    assert [s.compute_s for s in p.stages] == pytest.approx([0.004, 0.008, 0.012])
    assert p.stages[0].memory_bytes == pytest.approx(1000 * 3 + 1000 + 0 * 3 + 100)
    assert p.stages[2].memory_bytes == pytest.approx(3000 + 3000 + 300 * 1 + 300)


def test_saved_bytes_override_output_bytes():
    prof = dataclasses.replace(SKIP, layers=(_layer("a", 1.0, 100, 0, saved=7), *SKIP.layers[1:]))
    cost = CostModel(prof, FLAT)
    assert cost.saved_bytes.tolist() == [7, 200, 300]


def test_pipedream_cost_model_by_hand():
    cost = _cost(cost_model=CostModelKind.PIPEDREAM)
    p = cost.evaluate([[0, 1], [2]], [2, 1])
    # (compute + 4 (m-1) P / (B m)) / m, activations ignored; memory (acts + P) x ceil((N-n)/m)
    assert p.stages[0].time_s == pytest.approx((0.009 + 4 * 3000 / (1e5 * 2)) / 2)
    assert p.stages[1].time_s == pytest.approx(0.009)
    assert [s.memory_bytes for s in p.stages] == pytest.approx([3300, 0])


def test_link_levels_from_ranks():
    two = Topology.from_args(gpus=4, gpus_per_node=2)
    assert boundary_link_level(two, [0, 2], [1, 3]) == 0  # microbatches stay in their node
    assert boundary_link_level(two, [0, 1], [2]) == 1
    assert boundary_link_level(two, [0], [0]) == -1
    assert contiguous_ranks([1, 3]) == ((0,), (1, 2, 3))
    cost = CostModel(
        SKIP,
        dataclasses.replace(
            two,
            levels=(
                Level(devices=2, bandwidth_bytes_per_s=1e6),
                Level(devices=2, bandwidth_bytes_per_s=1e5),
            ),
        ),
    )
    inside = cost.evaluate([[0, 1], [2]], [1, 1], [[0], [1]])
    across = cost.evaluate([[0, 1], [2]], [1, 1], [[0], [2]])
    assert inside.stages[1].comm_s == pytest.approx(2 * 300 / 1e6)
    assert across.stages[1].comm_s == pytest.approx(2 * 300 / 1e5)


def test_schedule_objective():
    assert schedule_objective(Schedule.PIPEDREAM, 3, [1.0, 2.0], [9.0, 9.0]) == (2.0, 6.0, 2.0)
    assert schedule_objective(Schedule.GPIPE, 3, [1.0, 2.0], [0.5, 0.25]) == (2.0, 8.5, 8.5)


@pytest.mark.parametrize(
    ("stages", "replicas", "ranks", "message"),
    [
        ([[0], [2]], [1, 1], None, "exactly once"),
        ([[1], [0], [2]], [1, 1, 1], None, "topological"),
        ([[0, 1], [2]], [3, 2], None, "topology has 4"),
        ([[0, 1], [2]], [1, 1], [[0], [0]], "repeat a rank"),
        ([[0, 1], [2]], [1, 1], [[0], [1, 2]], "do not match"),
    ],
)
def test_evaluate_refuses_bad_partitions(stages, replicas, ranks, message):
    with pytest.raises(PlanError, match=message):
        _cost().evaluate(stages, replicas, ranks)


def test_straight_option_refuses_replicas():
    with pytest.raises(PlanError, match="straight"):
        _cost(straight=True).evaluate([[0, 1], [2]], [2, 1])


def test_options_are_validated():
    with pytest.raises(PlanError, match="microbatches"):
        SolverOptions(microbatches=0)
    with pytest.raises(PlanError, match="compression"):
        SolverOptions(activation_compression_ratio=0.0)
    with pytest.raises(PlanError, match="state space"):
        SolverOptions(state_space="everything")


def test_fits_follows_memory_and_the_switch():
    tight = CostModel(SKIP, dataclasses.replace(FLAT, memory_bytes=5000))
    p = tight.evaluate([[0], [1], [2]], [1, 1, 1])
    assert not tight.fits(p)
    loose = CostModel(SKIP, tight.topology, SolverOptions(memory_constraint=False))
    assert loose.fits(p)
