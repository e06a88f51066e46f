"""Pipeline schedules as data: the order of forward and backward operations on every device.

One source of truth for the simulator and the runtime: both walk the lists this module returns,
so they cannot drift apart. An operation is ``F3`` (forward of microbatch 3) or ``B3``.

Replicas of a stage take microbatches round-robin: microbatch ``m`` of a stage with ``R``
replicas runs on replica ``m % R``. A replica runs its stage's order restricted to its own
microbatches. That is deadlock-free: any valid timing of the unreplicated schedule is a valid
timing of every replica's restriction, since each replica keeps the stage's relative order.
Given the replication, a stage's 1F1B warm-up counts devices rather than stages (one microbatch
per device downstream), so that every replica keeps enough microbatches in flight;
:func:`sync_points` says where replicas all-reduce.

Example:
    >>> format_ops(stage_order(Schedule.ONE_F_ONE_B, num_stages=3, stage=0, microbatches=4))
    'F0 F1 F2 B0 F3 B1 B2 B3'
    >>> format_ops(stage_order(Schedule.GPIPE, num_stages=2, stage=1, microbatches=2))
    'F0 F1 B0 B1'
    >>> format_ops(replica_order(Schedule.ONE_F_ONE_B, replicas=(2, 1), stage=0, replica=1, microbatches=4))
    'F1 F3 B1 B3'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from planner.errors import PlanError

__all__ = [
    "PER_STAGE_SCHEDULES",
    "RANK_SCHEDULES",
    "Op",
    "OptimizerKind",
    "Schedule",
    "format_ops",
    "in_flight",
    "parse_ops",
    "replica_of",
    "replica_order",
    "splits_backward",
    "stage_order",
    "step_grid",
    "sync_points",
    "sync_unit",
    "warmup_forwards",
]


class Schedule(StrEnum):
    """How microbatches flow through the stages.

    PIPEDREAM: asynchronous 1F1B with weight stashing, no flush (PipeDream, SOSP'19).
    ONE_F_ONE_B: 1F1B with a flush per minibatch (PipeDream-Flush / DAPPLE), synchronous.
    GPIPE: all forwards, then all backwards, then the flush (GPipe).
    INTERLEAVED_1F1B: 1F1B over ``v`` chunks (virtual stages) per rank, stage ``s`` on rank
        ``s % p`` (Narayanan et al., SC'21; torch's ``ScheduleInterleaved1F1B``).
    ZB_H1: 1F1B with backward split into B (input gradient) and W (weight gradient), W deferred
        into the cool-down (Qi et al., ICLR'24; torch's ``ScheduleInterleavedZeroBubble``, one
        chunk per rank).
    ZBV: zero bubble on two chunks per rank in V order, rank ``r`` running stages ``r`` and
        ``2p - 1 - r`` (torch's ``ScheduleZBVZeroBubble``).

    The first three are *per-stage* schedules (:data:`PER_STAGE_SCHEDULES`): every stage has its
    own devices and may be replicated; the DP and the ILP plan them. The last three are *rank*
    schedules (:data:`RANK_SCHEDULES`): one pipeline whose ranks may hold several stages, ordered
    by :mod:`planner.rank_schedules` and planned by :mod:`planner.optimize.chunked`.
    """

    PIPEDREAM = "pipedream"
    ONE_F_ONE_B = "1f1b"
    GPIPE = "gpipe"
    INTERLEAVED_1F1B = "interleaved-1f1b"
    ZB_H1 = "zb-h1"
    ZBV = "zbv"


#: Schedules where every stage has its own devices (and replicas): the DP and the ILP plan them.
PER_STAGE_SCHEDULES: tuple[Schedule, ...] = (
    Schedule.PIPEDREAM,
    Schedule.ONE_F_ONE_B,
    Schedule.GPIPE,
)

#: Schedules whose per-rank lists come from :mod:`planner.rank_schedules` (chunks, split backward).
RANK_SCHEDULES: tuple[Schedule, ...] = (Schedule.INTERLEAVED_1F1B, Schedule.ZB_H1, Schedule.ZBV)


def splits_backward(schedule: Schedule) -> bool:
    """Whether backward runs as input-gradient (B) and weight-gradient (W) operations."""
    return schedule in (Schedule.ZB_H1, Schedule.ZBV)


class OptimizerKind(StrEnum):
    """The training optimizer, which sets the state kept per parameter (memory)."""

    SGD = "sgd"  # no state
    MOMENTUM = "momentum"  # one buffer per parameter
    ADAM = "adam"  # two buffers per parameter


@dataclass(frozen=True)
class Op:
    """One operation of a device: the forward (``"F"``), backward (``"B"``) or, in schedules
    that split the backward, weight gradient (``"W"``; ``"B"`` is then the input gradient) of a
    microbatch. ``stage`` names the (virtual) stage in the per-rank lists of
    :func:`rank_orders`, printed first as torch does (``"1F0"``); None in per-stage lists."""

    kind: Literal["F", "B", "W"]
    microbatch: int
    stage: int | None = None

    def __str__(self) -> str:
        prefix = "" if self.stage is None else str(self.stage)
        return f"{prefix}{self.kind}{self.microbatch}"


def warmup_forwards(
    schedule: Schedule,
    num_stages: int,
    stage: int,
    microbatches: int,
    *,
    replicas: Sequence[int] | None = None,
) -> int:
    """Forwards a stage runs before its first backward.

    1F1B (with or without flush): one microbatch per device downstream (PipeDream SOSP'19 §3.3:
    the input stage admits ceil(workers / input-stage replicas) microbatches per replica), at most
    ``M``: ``S - s - 1`` for a straight pipeline; with ``replicas`` given, the devices of the
    stages after ``s`` plus the other replicas of ``s``, so that each replica keeps enough
    microbatches in flight to hide the pipeline's latency. GPipe: all ``M``.

    Example:
        >>> warmup_forwards(Schedule.PIPEDREAM, 2, 0, 8), warmup_forwards(Schedule.PIPEDREAM, 2, 0, 8, replicas=(3, 1))
        (1, 3)
    """
    _check(num_stages, stage, microbatches)
    _one_stage_per_device(schedule)
    if replicas is not None and len(replicas) != num_stages:
        raise ValueError(f"replicas {list(replicas)} should name {num_stages} stages")
    if schedule is Schedule.GPIPE:
        return microbatches
    downstream = num_stages - stage if replicas is None else sum(replicas[stage:])
    return min(downstream - 1, microbatches)


def stage_order(
    schedule: Schedule,
    *,
    num_stages: int,
    stage: int,
    microbatches: int,
    replicas: Sequence[int] | None = None,
) -> tuple[Op, ...]:
    """The operations of ``stage`` for ``microbatches`` microbatches, in order.

    For ``1f1b`` and ``gpipe`` call it once per minibatch (the flush ends each); for
    ``pipedream`` pass every microbatch of the run, since nothing flushes. ``replicas`` (per
    stage) deepens the warm-up of replicated pipelines; see :func:`warmup_forwards`.
    """
    warmup = warmup_forwards(schedule, num_stages, stage, microbatches, replicas=replicas)
    ops: list[Op] = [Op("F", m) for m in range(warmup)]
    for m in range(microbatches - warmup):  # steady state: one forward, one backward
        ops.append(Op("F", warmup + m))
        ops.append(Op("B", m))
    ops.extend(Op("B", m) for m in range(microbatches - warmup, microbatches))
    return tuple(ops)


def replica_of(microbatch: int, replicas: int) -> int:
    """The replica that runs ``microbatch`` on a stage with ``replicas`` replicas (round-robin)."""
    return microbatch % replicas


def replica_order(
    schedule: Schedule,
    *,
    replicas: Sequence[int],
    stage: int,
    replica: int,
    microbatches: int,
) -> tuple[Op, ...]:
    """The operations of one replica: its stage's order restricted to its microbatches.

    Args:
        replicas: Replicas of every stage, in pipeline order (its length is the stage count).
        stage: The stage.
        replica: Which replica of ``stage`` (0-based).
        microbatches: Microbatches per minibatch (``1f1b``, ``gpipe``) or per run (``pipedream``).
    """
    count = replicas[stage]
    if not 0 <= replica < count:
        raise ValueError(f"stage {stage} has {count} replicas; replica {replica} does not exist")
    order = stage_order(
        schedule,
        num_stages=len(replicas),
        stage=stage,
        microbatches=microbatches,
        replicas=replicas,
    )
    return tuple(op for op in order if replica_of(op.microbatch, count) == replica)


def in_flight(
    schedule: Schedule,
    *,
    num_stages: int,
    stage: int,
    microbatches: int,
    replicas: Sequence[int] | None = None,
) -> int:
    """Most microbatches whose activations one device of ``stage`` holds at once.

    Unreplicated (``replicas`` None): ``S - s`` for 1F1B-style schedules (warm-up forwards plus
    the steady-state one), ``M`` for GPipe; never more than ``M`` for the synchronous schedules.
    With ``replicas``: the most any replica of the stage holds, counted on its operation list.

    Example:
        >>> in_flight(Schedule.PIPEDREAM, num_stages=2, stage=0, microbatches=64, replicas=(3, 1))
        2
    """
    _one_stage_per_device(schedule)
    if replicas is None:
        if schedule is Schedule.GPIPE:
            return microbatches
        depth = num_stages - stage
        return depth if schedule is Schedule.PIPEDREAM else min(depth, microbatches)
    if len(replicas) != num_stages:
        raise ValueError(f"replicas {list(replicas)} should name {num_stages} stages")
    if schedule is Schedule.PIPEDREAM:  # the steady state repeats; two rounds of it suffice
        microbatches = 2 * replicas[stage] * (sum(replicas[stage:]) + 1)
    most = 0
    for replica in range(replicas[stage]):
        held = 0
        for op in replica_order(
            schedule, replicas=replicas, stage=stage, replica=replica, microbatches=microbatches
        ):
            held += 1 if op.kind == "F" else -1
            most = max(most, held)
    return most


def sync_points(
    schedule: Schedule,
    *,
    replicas: Sequence[int],
    stage: int,
    replica: int,
    microbatches: int,
    minibatches: int,
) -> tuple[int, ...]:
    """Where a replica all-reduces its gradients: after how many of its operations.

    The operations are the replica's list for the whole run: for ``1f1b``/``gpipe`` its
    :func:`replica_order` for one minibatch repeated ``minibatches`` times (microbatch ``j`` of
    minibatch ``k`` is ``k * M + j``), and it all-reduces at the end of every minibatch. For
    ``pipedream``, :func:`replica_order` of all ``M x minibatches`` microbatches, and the ``R``
    replicas all-reduce once per round of ``R`` consecutive microbatches, one on each replica
    (PipeDream's data parallelism with weight stashing; the gradients of a last, partial round
    are not applied).

    The point is the same place of the stage's order for every replica: right after the
    backward of the round's last microbatch, so a replica whose own backward came earlier first
    runs the forwards the stage's order puts before that place. Cutting every replica at one place
    of the stage's order keeps the all-reduce, a barrier among the replicas, deadlock-free: a run
    of the unreplicated stage's order is a run of the replicas with their barriers. (Reducing
    right after each replica's own backward instead is slower: simulating 300 random balanced
    replicated pipelines, the median time per microbatch was 1.31x the slowest stage's, against
    1.18x here.)

    Example:
        >>> ops = replica_order(Schedule.PIPEDREAM, replicas=(2, 1), stage=0, replica=0, microbatches=8)
        >>> format_ops(ops), sync_points(Schedule.PIPEDREAM, replicas=(2, 1), stage=0, replica=0,
        ...                              microbatches=4, minibatches=2)
        ('F0 F2 B0 F4 B2 F6 B4 B6', (3, 5, 7, 8))
        >>> sync_points(Schedule.ONE_F_ONE_B, replicas=(2, 1), stage=0, replica=0, microbatches=4, minibatches=2)
        (4, 8)
    """
    count = replicas[stage]
    if not 0 <= replica < count:
        raise ValueError(f"stage {stage} has {count} replicas; replica {replica} does not exist")
    if minibatches < 1:
        raise ValueError(f"need at least one minibatch, got {minibatches}")
    if schedule is not Schedule.PIPEDREAM:
        per = len(
            replica_order(
                schedule, replicas=replicas, stage=stage, replica=replica, microbatches=microbatches
            )
        )
        return tuple(per * (k + 1) for k in range(minibatches))
    total = microbatches * minibatches
    order = stage_order(
        schedule, num_stages=len(replicas), stage=stage, microbatches=total, replicas=replicas
    )
    points: list[int] = []
    mine = 0
    for op in order:
        if replica_of(op.microbatch, count) == replica:
            mine += 1
        if op.kind == "B" and (op.microbatch + 1) % count == 0:
            points.append(mine)
    return tuple(points)


def sync_unit(schedule: Schedule, *, replicas: int, microbatches: int) -> int:
    """Microbatches between two all-reduces of a stage with ``replicas`` replicas.

    ``M`` for the flushed schedules; ``R`` for ``pipedream`` (see :func:`sync_points`).

    Example:
        >>> sync_unit(Schedule.PIPEDREAM, replicas=3, microbatches=4), sync_unit(Schedule.GPIPE, replicas=3, microbatches=4)
        (3, 4)
    """
    return replicas if schedule is Schedule.PIPEDREAM else microbatches


def step_grid(schedule: Schedule, *, replicas: Sequence[int], microbatches: int) -> str:
    """The schedule as a step x device table, every operation one time step long.

    Rows are steps, columns devices (``s0``, or ``s1r0`` for replica 0 of stage 1); an operation
    starts at the first step when its device is free and its input is ready (the forward of the
    previous stage, or the backward of the next). Empty cells are the bubble. For checking a
    schedule by eye without starting processes; the simulator gives real times.

    Example:
        >>> print(step_grid(Schedule.ONE_F_ONE_B, replicas=(1, 1), microbatches=3))
        step  s0   s1
           0  F0
           1  F1   F0
           2       B0
           3  B0   F1
           4  F2   B1
           5  B1   F2
           6       B2
           7  B2
    """
    num = len(replicas)
    lists = [
        [
            replica_order(
                schedule, replicas=replicas, stage=s, replica=r, microbatches=microbatches
            )
            for r in range(replicas[s])
        ]
        for s in range(num)
    ]
    done: dict[tuple[str, int, int], int] = {}  # (kind, stage, microbatch) -> step it ended
    cells: dict[tuple[int, int, int], str] = {}
    ptr = [[0] * replicas[s] for s in range(num)]
    free = [[0] * replicas[s] for s in range(num)]
    progress = True
    while progress:
        progress = False
        for s in range(num):
            for r in range(replicas[s]):
                while ptr[s][r] < len(lists[s][r]):
                    op = lists[s][r][ptr[s][r]]
                    if op.kind == "F":
                        need = done.get(("F", s - 1, op.microbatch)) if s > 0 else 0
                    else:
                        need = (
                            done.get(("B", s + 1, op.microbatch))
                            if s < num - 1
                            else done.get(("F", s, op.microbatch))
                        )
                    if need is None:
                        break
                    step = max(free[s][r], need)
                    cells[(step, s, r)] = str(op)
                    done[(op.kind, s, op.microbatch)] = step + 1
                    free[s][r] = step + 1
                    ptr[s][r] += 1
                    progress = True
    names = [
        f"s{s}" if replicas[s] == 1 else f"s{s}r{r}" for s in range(num) for r in range(replicas[s])
    ]
    width = max(3, *(len(n) for n in names))
    steps = max(step for step, _, _ in cells) + 1
    lines = ["step  " + "  ".join(n.ljust(width) for n in names)]
    for step in range(steps):
        row = [
            cells.get((step, s, r), "").ljust(width) for s in range(num) for r in range(replicas[s])
        ]
        lines.append(f"{step:>4}  " + "  ".join(row))
    return "\n".join(line.rstrip() for line in lines)


def format_ops(ops: Iterable[Op]) -> str:
    """``"F0 F1 B0 ..."``; :func:`parse_ops` reads it back."""
    return " ".join(str(op) for op in ops)


_OP = re.compile(r"(\d*)([FBW])(\d+)")


def parse_ops(text: str) -> tuple[Op, ...]:
    """Read ``"F0 F1 B0"`` (or ``"0F0 1F0 1B0 1W0"`` with stages) back into operations."""
    ops = []
    for token in text.split():
        match = _OP.fullmatch(token)
        if match is None:
            raise ValueError(
                f"cannot read operation {token!r}; expected F<n> or B<n> (or <stage>F<n>, B, W)"
            )
        stage = int(match.group(1)) if match.group(1) else None
        ops.append(Op(match.group(2), int(match.group(3)), stage))  # type: ignore[arg-type]
    return tuple(ops)


def _one_stage_per_device(schedule: Schedule) -> None:
    if schedule not in PER_STAGE_SCHEDULES:
        raise PlanError(
            f"schedule {schedule} has per-rank orders, not per-stage ones; use "
            "planner.rank_schedules.rank_orders()"
        )


def _check(num_stages: int, stage: int, microbatches: int) -> None:
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not one of {num_stages} stages")
    if microbatches < 1:
        raise ValueError(f"need at least one microbatch, got {microbatches}")
