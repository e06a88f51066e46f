"""Schedules as data: orders, warm-up with replication, sync points, the step grid."""

from __future__ import annotations

import itertools

import pytest

from planner.errors import PlanError
from planner.schedules import (
    Op,
    Schedule,
    SimulatedSchedule,
    any_schedule,
    check_schedule,
    format_ops,
    in_flight,
    parse_ops,
    rank_in_flight,
    rank_orders,
    replica_order,
    splits_backward,
    stage_order,
    stage_ranks,
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


@pytest.mark.parametrize("schedule", list(Schedule))
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
    for schedule, stages, m in itertools.product(list(Schedule), (1, 2, 5), (1, 3, 8)):
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


# --- per-rank lists: interleaved 1F1B, ZB-H1, ZBV ------------------------------------------

SIMULATED = [
    (SimulatedSchedule.INTERLEAVED_1F1B, 2),
    (SimulatedSchedule.INTERLEAVED_1F1B, 3),
    (SimulatedSchedule.ZB_H1, 1),
    (SimulatedSchedule.ZBV, 2),
]
_TORCH_CLASSES = {
    SimulatedSchedule.INTERLEAVED_1F1B: "ScheduleInterleaved1F1B",
    SimulatedSchedule.ZB_H1: "ScheduleInterleavedZeroBubble",
    SimulatedSchedule.ZBV: "ScheduleZBVZeroBubble",
}


def _torch_orders(schedule: SimulatedSchedule, ranks: int, m: int, chunks: int) -> list[list[str]]:
    """torch's own per-rank compute actions (no-op padding dropped), built without processes."""
    from torch.distributed.pipelining import schedules as torch_schedules

    cls = getattr(torch_schedules, _TORCH_CLASSES[schedule])
    obj = object.__new__(cls)  # its __init__ needs real stages; the order needs only these
    obj.pp_group_size, obj.n_local_stages, obj._n_microbatches = ranks, chunks, m
    obj.number_of_rounds = max(1, m // ranks)
    obj.microbatches_per_round = m // obj.number_of_rounds
    obj.num_stages = obj._num_stages = ranks * chunks
    return [
        [str(a) for a in obj._calculate_single_rank_operations(r) if a is not None]
        for r in range(ranks)
    ]


@pytest.mark.parametrize(("schedule", "chunks"), SIMULATED, ids=str)
def test_rank_orders_equal_torchs(schedule: SimulatedSchedule, chunks: int) -> None:
    checked = 0
    for ranks, m in itertools.product(range(1, 6), range(1, 13)):
        try:
            check_schedule(schedule, ranks=ranks, microbatches=m, chunks=chunks)
        except PlanError:
            continue
        ours = rank_orders(schedule, ranks=ranks, microbatches=m, chunks=chunks)
        # torch calls the input-gradient backward of a split schedule "I"
        printed = [
            [str(op).replace("B", "I") if splits_backward(schedule) else str(op) for op in ops]
            for ops in ours
        ]
        assert printed == _torch_orders(schedule, ranks, m, chunks), (ranks, m)
        checked += 1
    assert checked >= 40


@pytest.mark.parametrize(("schedule", "chunks"), SIMULATED, ids=str)
def test_rank_orders_run_every_operation_once_in_order(
    schedule: SimulatedSchedule, chunks: int
) -> None:
    ranks, m = 4, 8
    layout = stage_ranks(schedule, ranks=ranks, chunks=chunks)
    assert sorted(layout) == sorted(list(range(ranks)) * chunks)
    kinds = ("F", "B", "W") if splits_backward(schedule) else ("F", "B")
    for r, ops in enumerate(rank_orders(schedule, ranks=ranks, microbatches=m, chunks=chunks)):
        assert parse_ops(format_ops(ops)) == ops
        mine = [s for s, owner in enumerate(layout) if owner == r]
        assert sorted((op.stage, op.microbatch, op.kind) for op in ops) == sorted(
            (s, g, k) for s in mine for g in range(m) for k in kinds
        )
        for s, g in itertools.product(mine, range(m)):
            at = [ops.index(Op(k, g, s)) for k in kinds]
            assert at == sorted(at)  # F before B before W


def test_constraints_are_typed_errors_with_the_fix() -> None:
    with pytest.raises(PlanError, match=r"multiple of its 2 rounds .* use 8 or 10 microbatches"):
        rank_orders(SimulatedSchedule.INTERLEAVED_1F1B, ranks=4, microbatches=9, chunks=2)
    with pytest.raises(PlanError, match="multiple of its 3 rounds"):
        check_schedule(SimulatedSchedule.ZB_H1, ranks=4, microbatches=13)
    with pytest.raises(PlanError, match="exactly 2 chunks"):
        check_schedule(SimulatedSchedule.ZBV, ranks=4, microbatches=8, chunks=3)
    with pytest.raises(PlanError, match="at least 2 chunks"):
        check_schedule(SimulatedSchedule.INTERLEAVED_1F1B, ranks=4, microbatches=8)
    with pytest.raises(PlanError, match="one stage per rank"):
        check_schedule(Schedule.ONE_F_ONE_B, ranks=4, microbatches=8, chunks=2)
    with pytest.raises(PlanError, match="rank_orders"):
        stage_order(SimulatedSchedule.ZBV, num_stages=2, stage=0, microbatches=2)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="unknown schedule 'zb-h2'; use one of pipedream"):
        any_schedule("zb-h2")
    assert any_schedule("zb-h1") is SimulatedSchedule.ZB_H1
    check_schedule(SimulatedSchedule.INTERLEAVED_1F1B, ranks=4, microbatches=3, chunks=2)


def test_in_flight_counts() -> None:
    # 1F1B: stage i holds min(M, p - i)
    for p, m in itertools.product((2, 4, 5), (1, 3, 8)):
        expected = tuple(min(m, p - i) for i in range(p))
        assert rank_in_flight(Schedule.ONE_F_ONE_B, ranks=p, microbatches=m) == expected
        assert expected == tuple(
            in_flight(Schedule.ONE_F_ONE_B, num_stages=p, stage=i, microbatches=m) for i in range(p)
        )
    # interleaved: rank 0 holds p (1 + (p - 1) / (p v)) microbatches' worth of its layers
    for p, v in itertools.product((2, 4, 8), (2, 3, 4)):
        held = rank_in_flight(
            SimulatedSchedule.INTERLEAVED_1F1B, ranks=p, microbatches=4 * p, chunks=v
        )
        assert held[0] / v == pytest.approx(p * (1 + (p - 1) / (p * v)))
    # ZB-H1 and ZBV keep 1F1B's activation memory (B frees, W only needs the weights' inputs)
    assert rank_in_flight(SimulatedSchedule.ZB_H1, ranks=4, microbatches=8) == (4, 3, 2, 1)
    # ZBV: every rank holds 2p half-stage chunks, p microbatches' worth: 1F1B's first-stage peak
    for p in (2, 4, 6):
        held = rank_in_flight(SimulatedSchedule.ZBV, ranks=p, microbatches=4 * p, chunks=2)
        assert held == (2 * p,) * p
