"""Schedules as data: orders, warm-up with replication, sync points, the step grid."""

from __future__ import annotations

import itertools

import pytest

from planner.schedules import (
    PER_STAGE_SCHEDULES,
    Op,
    Schedule,
    format_ops,
    in_flight,
    parse_ops,
    replica_order,
    stage_order,
    step_grid,
    sync_points,
    sync_unit,
    warmup_forwards,
)


def test_orders_print_and_parse_back() -> None:
    ops = stage_order(Schedule.ONE_F_ONE_B, num_stages=4, stage=1, microbatches=6)
    assert format_ops(ops) == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5"
    assert parse_ops(format_ops(ops)) == ops
    with pytest.raises(ValueError, match="F<n>"):
        parse_ops("F0 X1")


@pytest.mark.parametrize("schedule", list(PER_STAGE_SCHEDULES))
@pytest.mark.parametrize(("stages", "microbatches"), [(1, 1), (3, 2), (4, 8)])
def test_every_stage_runs_each_microbatch_forward_then_backward(
    schedule: Schedule, stages: int, microbatches: int
) -> None:
    for s in range(stages):
        ops = stage_order(schedule, num_stages=stages, stage=s, microbatches=microbatches)
        assert sorted(ops, key=lambda o: (o.microbatch, o.kind == "B")) == [
            Op(k, m) for m in range(microbatches) for k in ("F", "B")
        ]  # type: ignore[arg-type]
        assert all(ops.index(Op("F", m)) < ops.index(Op("B", m)) for m in range(microbatches))


def test_unreplicated_warmup_is_unchanged_by_passing_replicas() -> None:
    for schedule, stages, m in itertools.product(list(PER_STAGE_SCHEDULES), (1, 2, 5), (1, 3, 8)):
        for s in range(stages):
            ones = (1,) * stages
            assert warmup_forwards(schedule, stages, s, m, replicas=ones) == warmup_forwards(
                schedule, stages, s, m
            )
            assert in_flight(
                schedule, num_stages=stages, stage=s, microbatches=m, replicas=ones
            ) == in_flight(schedule, num_stages=stages, stage=s, microbatches=m)


def test_replicated_stages_warm_up_one_microbatch_per_device_downstream() -> None:
    # PipeDream §3.3: the input stage admits ceil(workers / replicas) per replica: 3-1 -> 2 each
    assert warmup_forwards(Schedule.PIPEDREAM, 2, 0, 64, replicas=(3, 1)) == 3
    assert (
        format_ops(
            replica_order(Schedule.PIPEDREAM, replicas=(3, 1), stage=0, replica=0, microbatches=9)
        )
        == "F0 F3 B0 F6 B3 B6"
    )
    assert (
        in_flight(Schedule.PIPEDREAM, num_stages=2, stage=0, microbatches=64, replicas=(3, 1)) == 2
    )
    assert (
        in_flight(Schedule.ONE_F_ONE_B, num_stages=2, stage=0, microbatches=2, replicas=(3, 1)) == 1
    )
    assert in_flight(Schedule.GPIPE, num_stages=2, stage=0, microbatches=6, replicas=(3, 1)) == 2
    with pytest.raises(ValueError, match="should name 2 stages"):
        warmup_forwards(Schedule.PIPEDREAM, 2, 0, 4, replicas=(1,))


def test_sync_points_cut_every_replica_at_one_place_of_the_stage_order() -> None:
    replicas, stage, m, n = (3, 1), 0, 6, 4
    order = stage_order(
        Schedule.PIPEDREAM, num_stages=2, stage=0, microbatches=m * n, replicas=replicas
    )
    cuts = [i + 1 for i, op in enumerate(order) if op.kind == "B" and (op.microbatch + 1) % 3 == 0]
    for r in range(3):
        points = sync_points(
            Schedule.PIPEDREAM,
            replicas=replicas,
            stage=stage,
            replica=r,
            microbatches=m,
            minibatches=n,
        )
        mine = [sum(1 for op in order[:cut] if op.microbatch % 3 == r) for cut in cuts]
        assert list(points) == mine
    flushed = sync_points(
        Schedule.GPIPE, replicas=replicas, stage=0, replica=1, microbatches=m, minibatches=3
    )
    assert flushed == (4, 8, 12)


def test_sync_unit() -> None:
    assert sync_unit(Schedule.PIPEDREAM, replicas=2, microbatches=4) == 2  # a round of replicas
    assert sync_unit(Schedule.PIPEDREAM, replicas=3, microbatches=1) == 3
    assert sync_unit(Schedule.ONE_F_ONE_B, replicas=3, microbatches=2) == 2  # a minibatch


def test_step_grid_shows_the_bubble() -> None:
    grid = step_grid(Schedule.GPIPE, replicas=(1, 1, 1), microbatches=2).splitlines()
    assert grid[0].split() == ["step", "s0", "s1", "s2"]
    assert len(grid) == 1 + 2 * (2 + 3 - 1)  # (M + S - 1) forward and backward steps
    assert grid[1].split() == ["0", "F0"]
    assert "s0r1" in step_grid(Schedule.PIPEDREAM, replicas=(2, 1), microbatches=4)
