"""Choosing the schedule, and predicting with the simulator.

Two things the optimizer's formulas cannot do alone:

* **Predict what a plan will measure.** The per-stage objective ``(M + S - 1) x slowest stage +
  largest all-reduce`` is exact for equal stages without transfers on the critical path; with
  unequal stages or slow links the simulator (which walks the same per-rank lists the runtime
  runs) says more. :func:`with_simulated_prediction` puts the simulated minibatch time in the
  plan (the formula's stays beside it as ``cost_model_minibatch_s``), and :func:`choose_plan`
  ranks the candidates it compares (microbatch counts, schedules) by that simulated time.
* **Plan the rank schedules** (``interleaved-1f1b``, ``zb-h1``, ``zbv``): their cuts come from
  :mod:`planner.optimize.chunked`, their choice among shapes from the simulator.

``--schedule auto`` (:attr:`~planner.planning.PlanOptions.auto_schedule`) plans ``1f1b`` (the DP,
with replication) and every rank schedule shape, and keeps the fastest simulated plan that fits;
``pipedream`` is left out (asynchronous: it trains with stale weights, not the same math) and
``gpipe`` too (1F1B's time with more memory). The plan lists what it compared, fastest first.

Example:
    >>> plan = choose_plan(profile, "p.json", topology, PlanOptions(auto_schedule=True))  # doctest: +SKIP
    >>> [(c.schedule, c.minibatch_s) for c in plan.schedules_compared]                   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from planner import __version__
from planner.errors import InfeasibleError
from planner.optimize.chunked import RankCandidate, plan_rank_schedule
from planner.plan import (
    BaselineScore,
    Plan,
    PlanStage,
    Prediction,
    ProfileRef,
    ScheduleScore,
    file_sha256,
)
from planner.profile.format import Profile
from planner.schedules import RANK_SCHEDULES, Schedule
from planner.topology import Topology

__all__ = [
    "SIMULATION_EVENT_LIMIT",
    "choose_plan",
    "rank_plan",
    "simulated_minibatch_s",
    "with_prediction",
    "with_simulated_prediction",
]

#: Operations the prediction simulates at most; larger plans keep the formula's time (and say so).
SIMULATION_EVENT_LIMIT = 400_000


def simulated_minibatch_s(plan: Plan, profile: Profile) -> float | None:
    """The simulator's minibatch time for ``plan``, or None when simulating it would take more
    than :data:`SIMULATION_EVENT_LIMIT` operations."""
    from planner.simulate import default_minibatches, simulate

    devices = plan.num_ranks
    runs = default_minibatches(plan.schedule, devices=devices, microbatches=plan.microbatches)
    ops = 3 if plan.schedule in (Schedule.ZB_H1, Schedule.ZBV) else 2
    events = runs * plan.microbatches * ops * len(plan.stages) * 3  # compute, send, receive
    if events > SIMULATION_EVENT_LIMIT:
        return None
    return simulate(plan, profile).minibatch_s


def with_simulated_prediction(plan: Plan, profile: Profile) -> Plan:
    """``plan`` predicting the simulator's minibatch time (the formula's kept beside it); plans
    too large to simulate keep the formula's and their note says so."""
    simulated = simulated_minibatch_s(plan, profile)
    if simulated is None:
        note = "prediction from the cost model's formula (too large to simulate here)"
        return dataclasses.replace(plan, note="; ".join(x for x in (plan.note, note) if x))
    return with_prediction(plan, simulated)


def with_prediction(plan: Plan, simulated_s: float) -> Plan:
    """``plan`` predicting ``simulated_s`` per minibatch, the formula's time kept beside it."""
    p = plan.predicted
    formula = p.cost_model_minibatch_s if p.cost_model_minibatch_s is not None else p.minibatch_s
    return dataclasses.replace(
        plan,
        predicted=dataclasses.replace(
            p,
            minibatch_s=simulated_s,
            samples_per_s=plan.minibatch_size / simulated_s,
            cost_model_minibatch_s=formula,
        ),
    )


def rank_plan(
    candidate: RankCandidate,
    profile: Profile,
    planned: Profile,
    profile_path: str | os.PathLike[str],
    topology: Topology,
    *,
    minibatch_size: int,
    optimizer: str,
    data_parallel_s: float | None,
    baselines: tuple[BaselineScore, ...] = (),
    note: str = "",
) -> Plan:
    """The plan of a simulated rank-schedule candidate (layer indices into ``planned``).

    Each stage's memory is its rank's simulated peak (a rank holds all its chunks).
    """
    from planner.optimize.chunked import chunk_costs
    from planner.optimize.cost import CostModel, SolverOptions
    from planner.optimize.tables import DownsetTables
    from planner.planning import stage_names
    from planner.schedules import OptimizerKind

    size = candidate.microbatch_size
    scaled = planned.rescale(size)
    names = stage_names(candidate.stages, profile, planned)
    cost = CostModel(scaled, topology, SolverOptions(optimizer=OptimizerKind(optimizer)))
    masks = _chain_masks(candidate, len(scaled.layers))
    tables = DownsetTables.from_masks(cost, masks)
    compute, links = chunk_costs(tables, topology, candidate.stage_ranks)
    stages = []
    for s, layers in enumerate(names):
        c = float(compute[s, s + 1])
        link_in = float(links[s - 1][s]) if s > 0 else 0.0
        link_out = float(links[s][s + 1])
        stages.append(
            PlanStage(
                layers=tuple(layers),
                replicas=1,
                ranks=(candidate.stage_ranks[s],),
                compute_s=c,
                comm_s=link_in + link_out,
                allreduce_s=0.0,
                time_s=max(c, link_in, link_out),
                memory_bytes=candidate.peak_bytes[candidate.stage_ranks[s]],
            )
        )
    path = Path(profile_path)
    m = candidate.microbatches
    return Plan(
        profile=ProfileRef(
            path=str(path.resolve()),
            sha256=file_sha256(path),
            model=profile.model,
            batch_size=profile.batch_size,
            graph_hash=profile.graph_hash,
            input_shape=profile.input_shape,
            dtype=profile.dtype,
            leaf_modules=profile.leaf_modules,
        ),
        topology=topology,
        schedule=candidate.schedule,
        optimizer=OptimizerKind(optimizer),
        minibatch_size=minibatch_size,
        microbatch_size=size,
        microbatches=m,
        chunks=candidate.chunks,
        stages=tuple(stages),
        predicted=Prediction(
            bottleneck_s=max(st.time_s for st in stages),
            minibatch_s=candidate.minibatch_s,
            samples_per_s=minibatch_size / candidate.minibatch_s,
            single_device_s=m * scaled.total_compute_ms / 1e3,
            data_parallel_s=data_parallel_s,
        ),
        solver="dp",
        optimal=False,
        gap=None,
        note=note or f"cut: {_CUTS[candidate.cut]}; the cut and shape the simulator found fastest",
        baselines=baselines,
        planner_version=__version__,
    )


_CUTS = {
    "min-max": "the slowest chunk as fast as it can be (exact over the state space)",
    "ranks": "the slowest chunk minimal (exact), then the ranks' loads balanced",
    "order": "the ranks' loads balanced along the profile's order",
    "even": "equal layer counts per stage (torch's default split)",
}


def _chain_masks(candidate: RankCandidate, layers: int):  # -> np.ndarray
    """The chain of downsets ``D_0 = {} ⊂ D_1 ⊂ ... ⊂ D_K`` (row ``s``: stages before ``s``)."""
    import numpy as np

    masks = np.zeros((len(candidate.stages) + 1, layers), dtype=bool)
    for s, stage in enumerate(candidate.stages):
        masks[s + 1] = masks[s]
        masks[s + 1, list(stage)] = True
    return masks


def choose_plan(
    profile: Profile,
    profile_path: str | os.PathLike[str],
    topology: Topology,
    options,  # PlanOptions (planner.planning imports this module)
) -> Plan:
    """The plan for a rank schedule, or with ``options.auto_schedule`` the fastest of ``1f1b`` and
    every rank schedule; see the module docstring.

    Raises:
        InfeasibleError: Nothing fits; the message names what was tried.
    """
    from planner.optimize.baselines import all_baselines
    from planner.planning import _sizes, per_stage_plan, planning_profile

    planned = planning_profile(profile)
    per_stage: Plan | None = None
    failure: InfeasibleError | None = None
    if options.auto_schedule:
        schedules = RANK_SCHEDULES
        try:
            per_stage = per_stage_plan(
                profile,
                profile_path,
                topology,
                dataclasses.replace(options, schedule=Schedule.ONE_F_ONE_B, auto_schedule=False),
            )
        except InfeasibleError as exc:
            failure = exc
    else:
        schedules = (options.schedule,)
        if options.recompute:
            raise InfeasibleError(
                f"schedule {options.schedule} does not recompute activations (torch's schedules "
                "do not); drop --recompute or use --schedule 1f1b"
            )
    minibatch, counts = _sizes(
        profile, topology, dataclasses.replace(options, schedule=Schedule.ONE_F_ONE_B)
    )
    beat = per_stage.predicted.minibatch_s if per_stage is not None else math.inf
    try:
        found = plan_rank_schedule(
            planned,
            topology,
            schedules=schedules,
            minibatch_size=minibatch,
            microbatch_counts=counts,
            optimizer=options.optimizer,
            memory_constraint=options.memory_constraint,
            beat_s=beat,
        )
    except InfeasibleError as exc:
        if per_stage is None:
            if failure is None:  # one schedule asked for: its own refusal, values and fix
                raise
            raise InfeasibleError(f"{failure}; and {exc}") from None
        found = []
    compared = [
        ScheduleScore(
            schedule=str(c.schedule),
            chunks=c.chunks,
            microbatches=c.microbatches,
            ranks=c.ranks,
            minibatch_s=c.minibatch_s,
            fits=c.fits,
        )
        for c in found
    ]
    if per_stage is not None:
        compared.append(
            ScheduleScore(
                schedule=str(per_stage.schedule),
                chunks=1,
                microbatches=per_stage.microbatches,
                ranks=per_stage.num_ranks,
                minibatch_s=per_stage.predicted.minibatch_s,
            )
        )
    compared.sort(key=lambda c: c.minibatch_s)
    if per_stage is not None and (
        not found or per_stage.predicted.minibatch_s <= found[0].minibatch_s
    ):
        chosen: Plan = per_stage
    else:
        best = found[0]
        baselines = all_baselines(
            planned.rescale(best.microbatch_size),
            topology,
            schedule=Schedule.ONE_F_ONE_B,
            microbatches=best.microbatches,
            optimizer=options.optimizer,
            memory_constraint=options.memory_constraint,
        )
        scores = _simulated_baselines(
            baselines,
            profile,
            profile_path,
            topology,
            dataclasses.replace(options, schedule=Schedule.ONE_F_ONE_B, auto_schedule=False),
            minibatch,
            planned,
        )
        dp = next((b for b in scores if b.name == "data-parallel"), None)
        chosen = rank_plan(
            best,
            profile,
            planned,
            profile_path,
            topology,
            minibatch_size=minibatch,
            optimizer=str(options.optimizer),
            data_parallel_s=dp.minibatch_s if dp is not None and dp.fits else None,
            baselines=scores,
        )
    if not options.auto_schedule:
        return chosen
    why = _why(compared)
    return dataclasses.replace(
        chosen,
        schedules_compared=tuple(compared),
        note="; ".join(x for x in (chosen.note, why) if x),
    )


def _simulated_baselines(
    baselines,  # dict[str, Partition]
    profile: Profile,
    profile_path: str | os.PathLike[str],
    topology: Topology,
    options,  # PlanOptions
    minibatch: int,
    planned: Profile,
) -> tuple[BaselineScore, ...]:
    """The ``1f1b`` baselines of a rank-schedule plan, each timed by the simulator as the plan is
    (their formula's time where a baseline is too large to simulate)."""
    from planner.planning import plan_from_partition

    scores = []
    for name, base in baselines.items():
        draft = plan_from_partition(
            base, profile, profile_path, topology, options, minibatch, planned=planned
        )
        simulated = simulated_minibatch_s(draft, profile)
        scores.append(
            BaselineScore(
                name=name,
                minibatch_s=base.minibatch_s if simulated is None else simulated,
                stages=len(base.stages),
                fits=base.fits,
                note=base.note,
            )
        )
    return tuple(scores)


def _why(compared: list[ScheduleScore]) -> str:
    """The runner-up and its time, as the plan's note says it."""
    if len(compared) < 2:
        return "auto: no other schedule could run"
    first, second = compared[0], compared[1]

    def shape(c: ScheduleScore) -> str:
        return f"{c.schedule} x{c.chunks}" if c.chunks > 1 else c.schedule

    return (
        f"auto: {shape(first)} (M={first.microbatches}) simulates {first.minibatch_s * 1e3:.1f} ms "
        f"per minibatch, {second.minibatch_s / first.minibatch_s:.2f}x faster than the runner-up "
        f"{shape(second)} (M={second.microbatches}, {second.minibatch_s * 1e3:.1f} ms)"
    )
