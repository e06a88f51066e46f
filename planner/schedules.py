"""Pipeline schedules as data: the order of forward and backward operations on every device.

One source of truth for the simulator and the runtime: both walk the lists this module returns,
so they cannot drift apart. An operation is ``F3`` (forward of microbatch 3) or ``B3``.

Replicas of a stage take microbatches round-robin: microbatch ``m`` of a stage with ``R``
replicas runs on replica ``m % R``. A replica runs its stage's order restricted to its own
microbatches. That is deadlock-free: any valid timing of the unreplicated schedule is a valid
timing of every replica's restriction, since each replica keeps the stage's relative order.

Example:
    >>> format_ops(stage_order(Schedule.ONE_F_ONE_B, num_stages=3, stage=0, microbatches=4))
    'F0 F1 F2 B0 F3 B1 B2 B3'
    >>> format_ops(stage_order(Schedule.GPIPE, num_stages=2, stage=1, microbatches=2))
    'F0 F1 B0 B1'
    >>> format_ops(replica_order(Schedule.ONE_F_ONE_B, replicas=(2, 1), stage=0, replica=1, microbatches=4))
    'F1 B1 F3 B3'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = [
    "Op",
    "OptimizerKind",
    "Schedule",
    "format_ops",
    "in_flight",
    "parse_ops",
    "replica_of",
    "replica_order",
    "stage_order",
    "warmup_forwards",
]


class Schedule(StrEnum):
    """How microbatches flow through the stages.

    PIPEDREAM: asynchronous 1F1B with weight stashing, no flush (PipeDream, SOSP'19).
    ONE_F_ONE_B: 1F1B with a flush per minibatch (PipeDream-Flush / DAPPLE), synchronous.
    GPIPE: all forwards, then all backwards, then the flush (GPipe).
    """

    PIPEDREAM = "pipedream"
    ONE_F_ONE_B = "1f1b"
    GPIPE = "gpipe"


class OptimizerKind(StrEnum):
    """The training optimizer, which sets the state kept per parameter (memory)."""

    SGD = "sgd"  # no state
    MOMENTUM = "momentum"  # one buffer per parameter
    ADAM = "adam"  # two buffers per parameter


@dataclass(frozen=True)
class Op:
    """One operation of a device: the forward (``"F"``) or backward (``"B"``) of a microbatch."""

    kind: Literal["F", "B"]
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def warmup_forwards(schedule: Schedule, num_stages: int, stage: int, microbatches: int) -> int:
    """Forwards a stage runs before its first backward.

    1F1B (with or without flush): ``S - s - 1`` (PipeDream SOSP'19 §3.3: the input stage admits
    one microbatch per downstream stage), at most ``M``. GPipe: all ``M``.
    """
    _check(num_stages, stage, microbatches)
    if schedule is Schedule.GPIPE:
        return microbatches
    return min(num_stages - stage - 1, microbatches)


def stage_order(schedule: Schedule, *, num_stages: int, stage: int, microbatches: int) -> tuple[Op, ...]:
    """The operations of an unreplicated ``stage`` for ``microbatches`` microbatches, in order.

    For ``1f1b`` and ``gpipe`` call it once per minibatch (the flush ends each); for
    ``pipedream`` pass every microbatch of the run, since nothing flushes.
    """
    warmup = warmup_forwards(schedule, num_stages, stage, microbatches)
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
    order = stage_order(schedule, num_stages=len(replicas), stage=stage, microbatches=microbatches)
    return tuple(op for op in order if replica_of(op.microbatch, count) == replica)


def in_flight(schedule: Schedule, *, num_stages: int, stage: int, microbatches: int) -> int:
    """Most microbatches whose activations a stage holds at once (unreplicated).

    ``S - s`` for 1F1B-style schedules (warm-up forwards plus the steady-state one), ``M`` for
    GPipe; never more than ``M`` for the synchronous schedules.
    """
    if schedule is Schedule.GPIPE:
        return microbatches
    depth = num_stages - stage
    return depth if schedule is Schedule.PIPEDREAM else min(depth, microbatches)


def format_ops(ops: Iterable[Op]) -> str:
    """``"F0 F1 B0 ..."``; :func:`parse_ops` reads it back."""
    return " ".join(str(op) for op in ops)


_OP = re.compile(r"([FB])(\d+)")


def parse_ops(text: str) -> tuple[Op, ...]:
    """Read ``"F0 F1 B0"`` back into operations."""
    ops = []
    for token in text.split():
        match = _OP.fullmatch(token)
        if match is None:
            raise ValueError(f"cannot read operation {token!r}; expected F<n> or B<n>")
        ops.append(Op(match.group(1), int(match.group(2))))  # type: ignore[arg-type]
    return tuple(ops)


def _check(num_stages: int, stage: int, microbatches: int) -> None:
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not one of {num_stages} stages")
    if microbatches < 1:
        raise ValueError(f"need at least one microbatch, got {microbatches}")
