"""Choosing stages and replicas: the cost model, the exact DP, the ILP, and the solvers' contract.

Every solver is ``solve(cost: CostModel) -> Partition`` (see :mod:`planner.optimize.cost`);
:func:`optimize` is the one entry point the CLI calls.

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> from planner.topology import Topology
    >>> layers = tuple(
    ...     LayerProfile(name=f"l{i}", op="", forward_ms=1.0, backward_ms=2.0, output_bytes=(1000,),
    ...                  parameter_bytes=10**8, inputs=(i - 1,) if i else ())
    ...     for i in range(8))
    >>> part = optimize(Profile(model="mlp", batch_size=8, layers=layers),
    ...                 Topology.from_args(gpus=4, bandwidth_gbps=10))
    >>> [len(s.layers) for s in part.stages], part.bottleneck_s
    ([2, 2, 2, 2], 0.006)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from planner.errors import InfeasibleError, PlanError
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
    schedule_objective,
)
from planner.optimize.result import Partition, StageAssignment
from planner.profile.format import Profile
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Topology

__all__ = [
    "CostModel",
    "CostModelKind",
    "DownsetTables",
    "Partition",
    "SolverOptions",
    "StageAssignment",
    "allreduce_s",
    "boundary_link_level",
    "contiguous_ranks",
    "divisors",
    "in_flight",
    "link_s",
    "optimize",
    "schedule_objective",
]


def optimize(
    profile: Profile,
    topology: Topology,
    *,
    schedule: Schedule | str = Schedule.PIPEDREAM,
    microbatches: int | None = None,
    minibatch_size: int | None = None,
    optimizer: OptimizerKind | str = OptimizerKind.SGD,
    solver: Literal["dp", "ilp"] = "dp",
    straight: bool = False,
    allow_fewer_devices: bool = True,
    memory_constraint: bool = True,
    recompute: bool = False,
    cost_model: Literal["planner", "pipedream"] | CostModelKind = "planner",
    state_space: Literal["auto", "orders", "profile", "antichain", "all"] = "auto",
    activation_compression_ratio: float | None = None,
    memory_bytes: float | None = None,
    time_limit_s: float | None = None,
) -> Partition:
    """The best partition of ``profile`` on ``topology``.

    Args:
        profile: Per-layer costs at the microbatch size (the CLI rescales); when the planner picks
            the microbatches itself it rescales this profile to each candidate size.
        topology: Devices, levels and memory.
        schedule: ``pipedream`` (steady state), ``1f1b`` or ``gpipe`` (minibatch time).
        microbatches: ``M``. None: ``pipedream`` takes ``minibatch_size / profile.batch_size``
            (1 without a minibatch size); ``1f1b``/``gpipe`` try the 8 divisors of the minibatch
            (``minibatch_size``, else the profile's batch) whose microbatch is closest to the
            profiled batch as ``M`` and keep the fastest.
        minibatch_size: Samples per optimizer step.
        optimizer: Training optimizer (its state counts towards memory).
        solver: ``dp`` (:mod:`planner.optimize.dp`) or ``ilp`` (:mod:`planner.optimize.ilp`).
        straight: One device per stage, no replication.
        allow_fewer_devices: The plan may leave devices idle.
        memory_constraint: Refuse plans that do not fit in device memory.
        recompute: Activation recomputation.
        cost_model: ``planner`` or ``pipedream`` (PipeDream's optimizer's assumptions; its default
            is every device used, so pass ``allow_fewer_devices=False`` to reproduce it exactly).
        state_space: Which downsets may bound stages (:mod:`planner.optimize.states`).
        activation_compression_ratio: PipeDream model only; count activation transfers.
        memory_bytes: Plan for this device memory instead of the topology's.
        time_limit_s: The ILP's time limit (its default when None); the DP ignores it. If CBC
            fails or finds nothing in time, the DP's plan (exact as well, unless it reached its
            work budget) is returned with a note.

    Raises:
        InfeasibleError: Nothing fits; the message says what would.
        PlanError: Inconsistent arguments (e.g. a minibatch that ``M`` microbatches cannot split).
    """
    schedule = Schedule(schedule)
    kind = CostModelKind(cost_model)
    if solver not in ("dp", "ilp"):
        raise PlanError(f"unknown solver {solver!r}; use 'dp' or 'ilp'")
    options = SolverOptions(
        schedule=schedule,
        optimizer=OptimizerKind(optimizer),
        straight=straight,
        allow_fewer_devices=allow_fewer_devices,
        memory_constraint=memory_constraint,
        recompute=recompute,
        cost_model=kind,
        activation_compression_ratio=activation_compression_ratio,
        memory_bytes=memory_bytes,
        state_space=state_space,
    )
    candidates = _candidates(profile, schedule, microbatches, minibatch_size)
    best: Partition | None = None
    error: InfeasibleError | None = None
    for m, size, prof in candidates:
        cost = CostModel(prof, topology, dataclasses.replace(options, microbatches=m))
        try:
            part = _solve(cost, solver, time_limit_s)
        except InfeasibleError as exc:
            error = error or exc  # the smallest microbatch is tried first: the best hint
            continue
        if size is not None:
            part = dataclasses.replace(part, microbatch_size=size)
        if best is None or part.objective_s < best.objective_s:
            best = part
    if best is None:
        assert error is not None
        raise error
    return best


def _solve(cost: CostModel, solver: str, time_limit_s: float | None = None) -> Partition:
    if solver == "ilp":
        from planner.optimize import dp, ilp

        try:  # the DP's answer as CBC's start: the ILP then never returns anything worse
            start: Partition | None = dp.solve(cost)
        except InfeasibleError:
            start = None
        try:
            if time_limit_s is None:
                return ilp.solve(cost, warm_start=start)
            return ilp.solve(cost, warm_start=start, time_limit_s=time_limit_s)
        except PlanError as exc:  # CBC crashed or found nothing in time: the DP is exact too
            if start is None:
                raise
            also = "also exact" if start.optimal else "not proven either"
            note = "; ".join(x for x in (f"{exc}; this is the DP's plan, {also}", start.note) if x)
            return dataclasses.replace(start, note=note)
    from planner.optimize import dp

    return dp.solve(cost)


def _candidates(
    profile: Profile, schedule: Schedule, microbatches: int | None, minibatch: int | None
) -> list[tuple[int, int | None, Profile]]:
    """``(M, microbatch size if chosen here, profile at that size)`` to try, smallest size first."""
    b = profile.batch_size
    if microbatches is not None:
        if microbatches < 1:
            raise PlanError(f"microbatches must be at least 1, got {microbatches}")
        if minibatch is not None and minibatch != microbatches * b:
            raise PlanError(
                f"a minibatch of {minibatch} is not {microbatches} microbatches of the profile's "
                f"{b} samples; pass --minibatch {microbatches * b} or rescale the profile"
            )
        return [(microbatches, None, profile)]
    if schedule is Schedule.PIPEDREAM:
        if minibatch is None:
            return [(1, None, profile)]
        if minibatch % b:
            raise PlanError(
                f"a minibatch of {minibatch} is not a whole number of the profile's {b}-sample "
                f"microbatches; use a multiple of {b}"
            )
        return [(minibatch // b, None, profile)]
    total = minibatch or b
    if total < 1:
        raise PlanError(f"minibatch size must be positive, got {total}")
    # microbatch sizes dividing the minibatch, the closest to the profiled batch first (at most 8:
    # rescaling is a fair estimate near the measured size only), then smallest size first
    sizes = sorted(divisors(total), key=lambda s: (abs(math.log(s / b)), s))[:8]
    return [(total // s, s, profile.rescale(s)) for s in sorted(sizes)]


def divisors(n: int) -> list[int]:
    """Every divisor of ``n``, ascending, by trial division up to its square root.

    Example:
        >>> divisors(30)
        [1, 2, 3, 5, 6, 10, 15, 30]
    """
    if n < 1:
        raise PlanError(f"need a positive whole number, got {n}")
    factors: dict[int, int] = {}
    rest, d = n, 2
    while d * d <= rest:  # factorise: divide out each prime, so the loop stops at sqrt(rest)
        while rest % d == 0:
            factors[d] = factors.get(d, 0) + 1
            rest //= d
        d += 1 if d == 2 else 2
    if rest > 1:
        factors[rest] = factors.get(rest, 0) + 1
    out = [1]
    for prime, power in factors.items():
        out = [x * prime**e for x in out for e in range(power + 1)]
    return sorted(out)
