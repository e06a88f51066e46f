"""Schedules for torch.distributed.pipelining: the schedule class, the stage-to-rank layout, and
every rank's action list as torch's schedule CSV.

torch names an action ``<stage><kind><microbatch>``: ``2F0`` is the forward of microbatch 0 on
stage 2, ``B`` a whole backward, ``I`` the input-gradient part of a split one and ``W`` its
weight-gradient part. Its compute-only CSV has one row per rank, the rank's actions in order;
``_PipelineScheduleRuntime._load_csv`` reads it (checking every microbatch runs forward, then
backward, on one rank per stage) and adds the sends and receives. The lists are
:func:`planner.rank_schedules.rank_orders`, so the simulator, the Gantt chart and this file show the
same schedule.

Example:
    >>> from planner.schedules import Schedule
    >>> print(schedule_csv(Schedule.ZB_H1, ranks=2, microbatches=2), end="")
    0F0,0F1,0I0,0W0,0I1,0W1
    1F0,1I0,1F1,1I1,1W0,1W1
    >>> print(torch_schedule(Schedule.ZBV, ranks=2, microbatches=4, chunks=2).describe())
    torch.distributed.pipelining.ScheduleZBVZeroBubble: 2 ranks x 2 stages (style v), 4 microbatches
    stage -> rank: 0->0 1->1 2->1 3->0
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Literal

from planner._io import atomic_write_text
from planner.errors import PlanError
from planner.rank_schedules import check_schedule, rank_orders, stage_ranks
from planner.schedules import Schedule, splits_backward

__all__ = [
    "TORCH_SCHEDULE_CLASSES",
    "TorchSchedule",
    "schedule_actions",
    "schedule_csv",
    "torch_schedule",
    "write_schedule_csv",
]

TORCH_SCHEDULE_CLASSES: dict[Schedule, str] = {
    Schedule.ONE_F_ONE_B: "Schedule1F1B",
    Schedule.GPIPE: "ScheduleGPipe",
    Schedule.INTERLEAVED_1F1B: "ScheduleInterleaved1F1B",
    Schedule.ZB_H1: "ScheduleInterleavedZeroBubble",
    Schedule.ZBV: "ScheduleZBVZeroBubble",
}
"""The torch.distributed.pipelining class running each schedule (``pipedream`` has none)."""


@dataclass(frozen=True, kw_only=True)
class TorchSchedule:
    """How to run a schedule with torch.distributed.pipelining.

    Attributes:
        class_name: The schedule class in ``torch.distributed.pipelining``.
        ranks: Pipeline ranks (``pp_group_size``).
        chunks: Stages per rank (``len(stages)`` given to the class on each rank).
        microbatches: ``n_microbatches``.
        style: ``generate_stage_to_rank_mapping``'s style: ``"loop"`` or ``"v"``.
        stage_to_rank: The rank of every stage index.
    """

    class_name: str
    ranks: int
    chunks: int
    microbatches: int
    style: Literal["loop", "v"]
    stage_to_rank: tuple[int, ...]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stage indices ``rank`` builds ``PipelineStage`` s for, in order."""
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    def describe(self) -> str:
        layout = " ".join(f"{s}->{r}" for s, r in enumerate(self.stage_to_rank))
        return (
            f"torch.distributed.pipelining.{self.class_name}: {self.ranks} ranks x {self.chunks} "
            f"stages (style {self.style}), {self.microbatches} microbatches\n"
            f"stage -> rank: {layout}"
        )


def torch_schedule(
    schedule: Schedule, *, ranks: int, microbatches: int, chunks: int = 1
) -> TorchSchedule:
    """torch's class and layout for ``schedule`` on ``ranks`` ranks.

    Raises:
        PlanError: ``pipedream`` (torch has no asynchronous schedule with weight stashing), a
            shape torch refuses (:func:`planner.rank_schedules.check_schedule`), or ``1f1b``
            with fewer microbatches than ranks (``Schedule1F1B`` refuses them).
    """
    if schedule is Schedule.PIPEDREAM:
        raise PlanError(
            "schedule pipedream (asynchronous, weight stashing) has no torch.distributed."
            "pipelining class; plan with --schedule 1f1b to run it with torch"
        )
    check_schedule(schedule, ranks=ranks, microbatches=microbatches, chunks=chunks)
    if schedule is Schedule.ONE_F_ONE_B and microbatches < ranks:
        raise PlanError(
            f"torch's Schedule1F1B needs at least as many microbatches as stages ({ranks}), got "
            f"{microbatches}; use {ranks} microbatches, or run the schedule CSV "
            "(write_schedule_csv) with _PipelineScheduleRuntime, which has no such limit"
        )
    return TorchSchedule(
        class_name=TORCH_SCHEDULE_CLASSES[schedule],
        ranks=ranks,
        chunks=chunks,
        microbatches=microbatches,
        style="v" if schedule is Schedule.ZBV else "loop",
        stage_to_rank=stage_ranks(schedule, ranks=ranks, chunks=chunks),
    )


def schedule_actions(
    schedule: Schedule, *, ranks: int, microbatches: int, chunks: int = 1
) -> tuple[tuple[str, ...], ...]:
    """Every rank's actions in torch's notation (``0F0``, ``1I0``, ``1W0``, ``3B2``).

    Raises:
        PlanError: ``pipedream``, or a shape :func:`planner.rank_schedules.check_schedule`
            refuses (``1f1b`` with fewer microbatches than ranks is fine here:
            ``_PipelineScheduleRuntime`` runs it, only ``Schedule1F1B`` refuses).
    """
    if schedule is Schedule.PIPEDREAM:
        torch_schedule(schedule, ranks=ranks, microbatches=microbatches)  # raises: no such class
    backward = "I" if splits_backward(schedule) else "B"
    return tuple(
        tuple(f"{op.stage}{backward if op.kind == 'B' else op.kind}{op.microbatch}" for op in ops)
        for ops in rank_orders(schedule, ranks=ranks, microbatches=microbatches, chunks=chunks)
    )


def schedule_csv(schedule: Schedule, *, ranks: int, microbatches: int, chunks: int = 1) -> str:
    """torch's compute-only schedule CSV: one row per rank, as its ``_dump_csv`` writes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in schedule_actions(schedule, ranks=ranks, microbatches=microbatches, chunks=chunks):
        writer.writerow(row)
    return buffer.getvalue()


def write_schedule_csv(
    path: str | os.PathLike[str],
    schedule: Schedule,
    *,
    ranks: int,
    microbatches: int,
    chunks: int = 1,
) -> None:
    """Write :func:`schedule_csv` to ``path`` atomically; load it on every rank with
    ``_PipelineScheduleRuntime(stages, n_microbatches, ...)._load_csv(path)``.

    Example:
        >>> write_schedule_csv("zbv.csv", Schedule.ZBV, ranks=4, microbatches=8,
        ...                    chunks=2)                                  # doctest: +SKIP
    """
    text = schedule_csv(schedule, ranks=ranks, microbatches=microbatches, chunks=chunks)
    atomic_write_text(path, text)
