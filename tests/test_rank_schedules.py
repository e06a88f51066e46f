"""Per-rank schedules: interleaved 1F1B, ZB-H1 and ZBV equal torch's orders; torch's
constraints as typed errors; activations in flight; the step grid."""

from __future__ import annotations

import itertools

import pytest

from planner.errors import PlanError
from planner.rank_schedules import (
    check_schedule,
    rank_grid,
    rank_in_flight,
    rank_orders,
    stage_ranks,
)
from planner.schedules import (
    Op,
    Schedule,
    format_ops,
    in_flight,
    parse_ops,
    splits_backward,
    stage_order,
)

SIMULATED = [
    (Schedule.INTERLEAVED_1F1B, 2),
    (Schedule.INTERLEAVED_1F1B, 3),
    (Schedule.ZB_H1, 1),
    (Schedule.ZBV, 2),
]
_TORCH_CLASSES = {
    Schedule.INTERLEAVED_1F1B: "ScheduleInterleaved1F1B",
    Schedule.ZB_H1: "ScheduleInterleavedZeroBubble",
    Schedule.ZBV: "ScheduleZBVZeroBubble",
}


def _torch_orders(schedule: Schedule, ranks: int, m: int, chunks: int) -> list[list[str]]:
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
def test_rank_orders_equal_torchs(schedule: Schedule, chunks: int) -> None:
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
def test_rank_orders_run_every_operation_once_in_order(schedule: Schedule, chunks: int) -> None:
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
        rank_orders(Schedule.INTERLEAVED_1F1B, ranks=4, microbatches=9, chunks=2)
    with pytest.raises(PlanError, match="multiple of its 3 rounds"):
        check_schedule(Schedule.ZB_H1, ranks=4, microbatches=13)
    with pytest.raises(PlanError, match="exactly 2 chunks"):
        check_schedule(Schedule.ZBV, ranks=4, microbatches=8, chunks=3)
    with pytest.raises(PlanError, match="at least 2 chunks"):
        check_schedule(Schedule.INTERLEAVED_1F1B, ranks=4, microbatches=8)
    with pytest.raises(PlanError, match="one stage per rank"):
        check_schedule(Schedule.ONE_F_ONE_B, ranks=4, microbatches=8, chunks=2)
    with pytest.raises(PlanError, match="rank_orders"):
        stage_order(Schedule.ZBV, num_stages=2, stage=0, microbatches=2)  # type: ignore[arg-type]
    check_schedule(Schedule.INTERLEAVED_1F1B, ranks=4, microbatches=3, chunks=2)


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
        held = rank_in_flight(Schedule.INTERLEAVED_1F1B, ranks=p, microbatches=4 * p, chunks=v)
        assert held[0] / v == pytest.approx(p * (1 + (p - 1) / (p * v)))
    # ZB-H1 and ZBV keep 1F1B's activation memory (B frees, W only needs the weights' inputs)
    assert rank_in_flight(Schedule.ZB_H1, ranks=4, microbatches=8) == (4, 3, 2, 1)
    # ZBV: every rank holds 2p half-stage chunks, p microbatches' worth: 1F1B's first-stage peak
    for p in (2, 4, 6):
        held = rank_in_flight(Schedule.ZBV, ranks=p, microbatches=4 * p, chunks=2)
        assert held == (2 * p,) * p


def test_rank_grid_shows_the_bubble_and_split_backward() -> None:
    grid = rank_grid(Schedule.ZB_H1, ranks=3, microbatches=3).splitlines()
    assert grid[0].split() == ["step", "r0", "r1", "r2"]
    # unit F = B = W: 3 M steps of work plus ZB-H1's (p - 1)(F + B - W) = 2 steps of bubble
    assert len(grid) - 1 == 3 * 3 + 2
    one = rank_grid(Schedule.ONE_F_ONE_B, ranks=3, microbatches=3).splitlines()
    assert len(one) - 1 == 2 * (3 + 3 - 1)  # (M + p - 1) forward and backward steps
    assert "W" not in "".join(one)
