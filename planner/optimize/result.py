"""What a solver returns: stages as sets of layer indices, replicas, ranks and predicted costs."""

from __future__ import annotations

from dataclasses import dataclass

from planner.schedules import Schedule

__all__ = ["Partition", "StageAssignment"]


@dataclass(frozen=True, kw_only=True)
class StageAssignment:
    """One pipeline stage as a solver chose it.

    Attributes:
        layers: Indices of the profile's layers in this stage, ascending. Stages in order form a
            topological order of the DAG: no layer reads from a later stage.
        replicas: Devices running copies of the stage (data parallel within the stage).
        ranks: The ranks of those devices, ``len(ranks) == replicas``.
        compute_s: Forward+backward time of one microbatch on one replica, seconds.
        comm_s: Time per microbatch on the links into and out of the stage (activations forward,
            gradients backward), seconds.
        allreduce_s: Gradient all-reduce among the replicas per synchronisation, seconds.
        time_s: The stage's effective steady-state time per microbatch as the objective sees it
            (e.g. ``compute_s / replicas`` plus unhidden all-reduce), seconds.
        memory_bytes: Predicted peak memory of one replica under the schedule, bytes.
    """

    layers: tuple[int, ...]
    replicas: int
    ranks: tuple[int, ...]
    compute_s: float
    comm_s: float
    allreduce_s: float
    time_s: float
    memory_bytes: float


@dataclass(frozen=True, kw_only=True)
class Partition:
    """A solver's answer.

    Attributes:
        stages: The stages in pipeline order.
        schedule: The schedule the objective was computed for.
        microbatches: Microbatches per minibatch (M).
        bottleneck_s: Steady-state time of the slowest stage per microbatch (PipeDream's
            "time per stage"), seconds.
        minibatch_s: Predicted time of one minibatch (M microbatches) under the schedule.
        objective_s: The value the solver minimised (bottleneck for ``pipedream``, minibatch time
            for ``1f1b``/``gpipe``).
        solver: Which solver produced it, e.g. ``"dp"``, ``"ilp"``, ``"baseline:data-parallel"``.
        optimal: Proven optimal for its state space (False e.g. when the ILP hit its time limit).
        cost_model: ``"planner"`` or ``"pipedream"``.
        fits: Every stage fits in device memory. Solvers only return plans that fit (when the
            memory constraint is on); a baseline that does not fit is still reported, with False.
        note: Why it does not fit, or another remark worth showing next to the plan.
        microbatch_size: Samples per microbatch the plan was computed for, when the planner chose
            it (:func:`planner.optimize.optimize` with ``microbatches=None``); else None.
        gap: Relative distance of ``objective_s`` above a lower bound over every partition
            (:func:`planner.optimize.bounds.certify`): 0.0 proven optimal; None when not
            certified (then ``optimal`` speaks only for the solver's own state space).
    """

    stages: tuple[StageAssignment, ...]
    schedule: Schedule
    microbatches: int
    bottleneck_s: float
    minibatch_s: float
    objective_s: float
    solver: str
    optimal: bool = True
    cost_model: str = "planner"
    fits: bool = True
    note: str = ""
    microbatch_size: int | None = None
    gap: float | None = None

    @property
    def num_devices_used(self) -> int:
        return sum(stage.replicas for stage in self.stages)
