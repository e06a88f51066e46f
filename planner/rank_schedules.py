"""Every rank's operations when a rank runs several stages (chunks) or splits its backward.

:func:`rank_orders` gives, for one minibatch, each rank's list of :class:`~planner.schedules.Op`
naming its (virtual) stage: torch.distributed.pipelining's own orders for ``interleaved-1f1b``,
``zb-h1`` and ``zbv`` (checked equal in the tests), and the per-stage lists of
:mod:`planner.schedules` for the others. :func:`stage_ranks` places the stages, and
:func:`check_schedule` enforces torch's constraints as :class:`~planner.errors.PlanError`.
The simulator, the Gantt chart and :mod:`planner.schedule_export` all walk these lists.

Example:
    >>> from planner.schedules import format_ops
    >>> for ops in rank_orders(Schedule.INTERLEAVED_1F1B, ranks=2, microbatches=2, chunks=2):
    ...     print(format_ops(ops))
    0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1
    1F0 1F1 3F0 3B0 3F1 3B1 1B0 1B1
    >>> print(rank_grid(Schedule.INTERLEAVED_1F1B, ranks=2, microbatches=2, chunks=2))
    step  r0   r1
       0  0F0
       1  0F1  1F0
       2  2F0  1F1
       3  2F1  3F0
       4       3B0
       5  2B0  3F1
       6       3B1
       7  2B1  1B0
       8  0B0  1B1
       9  0B1
"""

from __future__ import annotations

import itertools

from planner.errors import PlanError
from planner.schedules import (
    PER_STAGE_SCHEDULES,
    Op,
    Schedule,
    stage_order,
)

__all__ = [
    "check_schedule",
    "rank_grid",
    "rank_in_flight",
    "rank_orders",
    "stage_ranks",
]


def check_schedule(schedule: Schedule, *, ranks: int, microbatches: int, chunks: int = 1) -> None:
    """Torch's constraints on a schedule's shape, as typed errors with the fix.

    ``interleaved-1f1b`` needs at least 2 chunks per rank, ``zbv`` exactly 2, the others 1;
    ``interleaved-1f1b`` and ``zb-h1`` need ``M`` to be a multiple of their number of rounds
    ``max(1, M // p)`` (torch.distributed.pipelining checks the same).

    Example:
        >>> check_schedule(Schedule.INTERLEAVED_1F1B, ranks=4, microbatches=10, chunks=2)
        >>> check_schedule(Schedule.INTERLEAVED_1F1B, ranks=4, microbatches=9, chunks=2)
        Traceback (most recent call last):
        ...
        planner.errors.PlanError: schedule interleaved-1f1b on 4 ranks needs the microbatches (9) to be a multiple of its 2 rounds (max(1, M // 4), as torch requires); use 8 or 10 microbatches
    """
    if ranks < 1:
        raise PlanError(f"a pipeline needs at least one rank, got {ranks}")
    if microbatches < 1:
        raise PlanError(f"need at least one microbatch, got {microbatches}")
    if schedule is Schedule.ZBV and chunks != 2:
        raise PlanError(
            f"schedule zbv runs exactly 2 chunks per rank (stages r and 2p-1-r), got {chunks}; "
            "use 2 chunks"
        )
    if schedule is Schedule.INTERLEAVED_1F1B and chunks < 2:
        raise PlanError(
            f"schedule interleaved-1f1b needs at least 2 chunks per rank, got {chunks}; "
            "with one chunk use 1f1b"
        )
    if schedule not in (Schedule.INTERLEAVED_1F1B, Schedule.ZBV) and chunks != 1:
        raise PlanError(
            f"schedule {schedule} runs one stage per rank, got {chunks} chunks; "
            "use interleaved-1f1b or zbv for several"
        )
    if schedule in (Schedule.INTERLEAVED_1F1B, Schedule.ZB_H1):
        rounds = _rounds(ranks, microbatches)
        if microbatches % rounds:
            below = next(m for m in range(microbatches, 0, -1) if m % _rounds(ranks, m) == 0)
            above = next(m for m in itertools.count(microbatches) if m % _rounds(ranks, m) == 0)
            raise PlanError(
                f"schedule {schedule} on {ranks} ranks needs the microbatches ({microbatches}) "
                f"to be a multiple of its {rounds} rounds (max(1, M // {ranks}), as torch "
                f"requires); use {below} or {above} microbatches"
            )


def _rounds(ranks: int, microbatches: int) -> int:
    return max(1, microbatches // ranks)


def stage_ranks(schedule: Schedule, *, ranks: int, chunks: int = 1) -> tuple[int, ...]:
    """The rank of every (virtual) stage: ``s % p`` (loop order), V order for ``zbv``.

    Example:
        >>> stage_ranks(Schedule.INTERLEAVED_1F1B, ranks=2, chunks=2), stage_ranks(Schedule.ZBV, ranks=2, chunks=2)
        ((0, 1, 0, 1), (0, 1, 1, 0))
    """
    if schedule is Schedule.ZBV:
        return tuple(range(ranks)) + tuple(reversed(range(ranks)))
    return tuple(s % ranks for s in range(ranks * chunks))


def rank_orders(
    schedule: Schedule, *, ranks: int, microbatches: int, chunks: int = 1
) -> tuple[tuple[Op, ...], ...]:
    """Every rank's operations for one minibatch, each naming its (virtual) stage.

    The orders are torch.distributed.pipelining's for the same schedule (its
    ``_calculate_single_rank_operations``, without the no-op padding): ``interleaved-1f1b``
    warms up ``(v - 1) k + 2 (p - 1 - r)`` forwards on rank ``r`` (``k = M / rounds``
    microbatches per round) and then alternates, depth first over the chunks; ``zb-h1`` warms up
    ``p - 1 - r`` and runs rank ``r``'s first ``r`` weight gradients late, in the cool-down;
    ``zbv`` follows torch's V schedule. For ``pipedream``, ``1f1b`` and ``gpipe`` it is
    :func:`stage_order` of each rank's one stage.

    Example:
        >>> from planner.schedules import format_ops
        >>> print("\\n".join(format_ops(ops) for ops in rank_orders(Schedule.ZB_H1, ranks=2, microbatches=3)))
        0F0 0F1 0B0 0W0 0F2 0B1 0W1 0B2 0W2
        1F0 1B0 1F1 1B1 1W0 1F2 1B2 1W1 1W2

    Raises:
        PlanError: The shape breaks one of :func:`check_schedule`'s constraints.
    """
    check_schedule(schedule, ranks=ranks, microbatches=microbatches, chunks=chunks)
    if schedule is Schedule.ZBV:
        return tuple(_zbv(r, ranks, microbatches) for r in range(ranks))
    if schedule in (Schedule.INTERLEAVED_1F1B, Schedule.ZB_H1):
        split = schedule is Schedule.ZB_H1
        return tuple(_looped(r, ranks, microbatches, chunks, split) for r in range(ranks))
    assert schedule in PER_STAGE_SCHEDULES
    return tuple(
        tuple(
            Op(op.kind, op.microbatch, r)
            for op in stage_order(schedule, num_stages=ranks, stage=r, microbatches=microbatches)
        )
        for r in range(ranks)
    )


def _looped(rank: int, p: int, m: int, v: int, split: bool) -> tuple[Op, ...]:
    """Interleaved 1F1B (``split`` False) or ZB-H1 (one chunk, ``split`` True) on ``rank``."""
    per_round = m // _rounds(p, m)
    total = m * v  # operations of each kind on this rank: M per chunk
    # torch: the last rank warms up (v - 1) rounds; each hop upstream adds 2 (1 when split)
    warmup = min((v - 1) * per_round + (1 if split else 2) * (p - 1 - rank), total)
    count = {kind: [0] * v for kind in "FBW"}
    ops: list[Op] = []

    def emit(kind: str, chunk: int) -> None:
        ops.append(Op(kind, count[kind][chunk], chunk * p + rank))  # type: ignore[arg-type]
        count[kind][chunk] += 1

    def back(j: int) -> int:  # the chunk of the j-th backward: depth first from the last
        return v - 1 - (j // per_round) % v

    for j in range(warmup):
        emit("F", (j // per_round) % v)
    for j in range(total):
        if warmup + j < total:
            emit("F", ((warmup + j) // per_round) % v)
        emit("B", back(j))
        if split and j >= rank:  # rank r keeps r weight gradients for the cool-down
            emit("W", back(j - rank))
    if split:
        for j in range(max(total - rank, 0), total):
            emit("W", back(j))
    return tuple(ops)


def _zbv(rank: int, p: int, m: int) -> tuple[Op, ...]:
    """ZBV on ``rank``: chunk 0 is stage ``r``, chunk 1 stage ``2p - 1 - r`` (torch's order)."""
    n = max(2 * p - 1, m)  # torch builds the full pipeline and drops microbatches >= M
    stages = (rank, 2 * p - 1 - rank)
    count = {kind: [0, 0] for kind in "FBW"}
    ops: list[Op] = []

    def emit(*pairs: tuple[str, int]) -> None:
        for kind, chunk in pairs:
            ops.append(Op(kind, count[kind][chunk], stages[chunk]))  # type: ignore[arg-type]
            count[kind][chunk] += 1

    f = count["F"]
    for _ in range(2 * (p - rank) - 1):
        emit(("F", 0))
    for _ in range(rank):
        emit(("F", 1), ("F", 0))
    for _ in range(p - rank):
        emit(("F", 1), ("B", 1), ("W", 1))
    while f[1] < f[0] or f[0] < n:
        if f[0] < n:
            emit(("F", 0))
        emit(("B", 0), ("W", 0), ("F", 1), ("B", 1), ("W", 1))
    for _ in range(rank):
        emit(("B", 0), ("B", 1))
    for _ in range(p - rank):
        emit(("B", 0), ("W", 0))
    b, w = count["B"], count["W"]
    emit(*[("W", 1)] * (b[1] - w[1]), *[("W", 0)] * (b[0] - w[0]))
    return tuple(op for op in ops if op.microbatch < m)


def rank_in_flight(
    schedule: Schedule, *, ranks: int, microbatches: int, chunks: int = 1
) -> tuple[int, ...]:
    """Most chunk-microbatches whose activations each rank holds at once (forward to its B).

    Divide by ``chunks`` for microbatches' worth of a rank's layers: 1F1B's stage ``s`` holds
    ``min(M, p - s)``; interleaved rank 0 ``p + (p - 1) / v`` (= ``p (1 + (p - 1) / (p v))``).

    Example:
        >>> rank_in_flight(Schedule.INTERLEAVED_1F1B, ranks=4, microbatches=8, chunks=2)
        (11, 9, 7, 5)
    """
    out = []
    for ops in rank_orders(schedule, ranks=ranks, microbatches=microbatches, chunks=chunks):
        held = most = 0
        for op in ops:
            held += {"F": 1, "B": -1, "W": 0}[op.kind]
            most = max(most, held)
        out.append(most)
    return tuple(out)


def rank_grid(schedule: Schedule, *, ranks: int, microbatches: int, chunks: int = 1) -> str:
    """The per-rank lists as a step x rank table, every operation one step long.

    An operation starts at the first step its rank is free and its input is ready (the forward
    of the stage before, the input gradient of the stage after; a W follows its own B); empty
    cells are the bubble. For checking a schedule by eye, as torch prints its own.

    Example:
        >>> print(rank_grid(Schedule.ZB_H1, ranks=2, microbatches=2))
        step  r0   r1
           0  0F0
           1  0F1  1F0
           2       1B0
           3  0B0  1F1
           4  0W0  1B1
           5  0B1  1W0
           6  0W1  1W1
    """
    lists = rank_orders(schedule, ranks=ranks, microbatches=microbatches, chunks=chunks)
    last = ranks * chunks - 1
    done: dict[tuple[str, int, int], int] = {}  # (kind, stage, microbatch) -> step it ended
    cells: dict[tuple[int, int], str] = {}
    ptr, free = [0] * ranks, [0] * ranks
    progress = True
    while progress:
        progress = False
        for r, ops in enumerate(lists):
            while ptr[r] < len(ops):
                op = ops[ptr[r]]
                s = op.stage or 0
                if op.kind == "F":
                    need = done.get(("F", s - 1, op.microbatch)) if s > 0 else 0
                elif op.kind == "B":
                    upstream = ("B", s + 1, op.microbatch) if s < last else ("F", s, op.microbatch)
                    need = done.get(upstream)
                else:
                    need = done.get(("B", s, op.microbatch))
                if need is None:
                    break
                step = max(free[r], need)
                cells[(step, r)] = str(op)
                done[(op.kind, s, op.microbatch)] = free[r] = step + 1
                ptr[r] += 1
                progress = True
    assert all(ptr[r] == len(ops) for r, ops in enumerate(lists)), "the orders deadlock"
    width = max(3, *(len(c) for c in cells.values()))
    lines = ["step  " + "  ".join(f"r{r}".ljust(width) for r in range(ranks))]
    for step in range(max(step for step, _ in cells) + 1):
        row = "  ".join(cells.get((step, r), "").ljust(width) for r in range(ranks))
        lines.append(f"{step:>4}  {row}")
    return "\n".join(line.rstrip() for line in lines)
