"""From a profile and a topology to a :class:`~planner.plan.Plan`: sizes, solver, baselines.

One options object drives the CLI and the library alike.

Example:
    >>> from planner.planning import PlanOptions, make_plan, shipped_profile
    >>> from planner.profile import Profile
    >>> from planner.topology import Topology
    >>> path = shipped_profile("resnet50")                                    # doctest: +SKIP
    >>> plan = make_plan(Profile.load(path), path, Topology.from_args(gpus=8), PlanOptions())  # doctest: +SKIP
    >>> print(plan.describe())                                                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from planner import __version__
from planner.errors import PlannerError
from planner.optimize.result import Partition
from planner.plan import BaselineScore, Plan, PlanStage, Prediction, ProfileRef, file_sha256
from planner.profile.format import Profile
from planner.schedules import RANK_SCHEDULES, OptimizerKind, Schedule
from planner.topology import Topology

__all__ = [
    "MAX_MICROBATCH_CANDIDATES",
    "PlanOptions",
    "draw_plan",
    "make_plan",
    "plan_from_partition",
    "planner_memory_note",
    "shipped_profile",
    "solve",
]

_PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What to plan for, besides the profile and the topology.

    Attributes:
        schedule: Pipeline schedule; ``1f1b`` by default (synchronous, what the runtime runs).
        minibatch_size: Samples per optimizer step. None: the profile's batch size times the
            device count for ``1f1b``/``gpipe`` (so data parallelism keeps the profiled batch per
            device), the profile's batch size for ``pipedream`` (PipeDream updates per microbatch).
        microbatches: Microbatches per minibatch. None: ``1f1b``/``gpipe`` try the divisors of the
            minibatch whose microbatch lies within a quarter and four times the profiled batch
            (at most :data:`MAX_MICROBATCH_CANDIDATES`, closest first) and keep the fastest plan,
            so an awkward batch size never silently leaves devices idle; ``pipedream`` takes the
            divisor whose microbatch is closest to the profiled batch.
        auto_microbatches: Also search for ``pipedream`` (the synchronous schedules always do).
        allow_fewer_devices: The plan may leave devices idle. None: yes for the planner cost
            model, no for ``pipedream`` (PipeDream's optimizer uses every device).
        optimizer: Training optimizer (its state counts towards memory).
        solver: ``dp`` (dynamic program) or ``ilp`` (exact MILP, with ``time_limit_s``).
        straight: One device per stage, no replication.
        recompute: Recompute activations in backward instead of storing them.
        cost_model: ``planner`` or ``pipedream`` (PipeDream's optimizer's assumptions).
        memory_constraint: Refuse partitions that do not fit device memory.
        time_limit_s: Time limit of the ILP solver.
        auto_schedule: Choose the schedule too: ``1f1b`` and every rank schedule
            (``interleaved-1f1b``, ``zb-h1``, ``zbv``), the fastest simulated plan that fits
            (:func:`planner.schedule_search.choose_plan`); ``schedule`` is then ignored.
    """

    schedule: Schedule = Schedule.ONE_F_ONE_B
    minibatch_size: int | None = None
    microbatches: int | None = None
    auto_microbatches: bool = False
    allow_fewer_devices: bool | None = None
    optimizer: OptimizerKind = OptimizerKind.SGD
    solver: Literal["dp", "ilp"] = "dp"
    straight: bool = False
    recompute: bool = False
    cost_model: Literal["planner", "pipedream"] = "planner"
    memory_constraint: bool = True
    time_limit_s: float = 60.0
    auto_schedule: bool = False


def shipped_profile(model: str) -> Path | None:
    """The profile shipped for ``model`` (``profiles/<model>.json``), if there is one.

    ``$PLANNER_PROFILES`` names another folder to look in first.
    """
    folders = [Path(p) for p in os.environ.get("PLANNER_PROFILES", "").split(os.pathsep) if p]
    for folder in [*folders, _PROFILES_DIR]:
        candidate = folder / f"{model}.json"
        if candidate.is_file():
            return candidate
    return None


#: Microbatch counts the default search tries at most (each is one solver run).
MAX_MICROBATCH_CANDIDATES = 6


def _sizes(profile: Profile, topology: Topology, options: PlanOptions) -> tuple[int, list[int]]:
    """The minibatch size and the microbatch counts to try (the best one wins)."""
    from planner.optimize import divisors

    b = profile.batch_size
    if options.schedule is Schedule.PIPEDREAM:
        minibatch = options.minibatch_size or b * (options.microbatches or 1)
    else:
        minibatch = options.minibatch_size or b * topology.num_devices
    if options.microbatches is not None:
        counts = [options.microbatches]
        if minibatch % counts[0]:
            raise PlannerError(
                f"--batch-size {minibatch} does not split into {counts[0]} equal microbatches; "
                f"use a multiple of {counts[0]} or other --microbatches"
            )
        return minibatch, counts
    # Divisors of the minibatch by factorisation (never a loop over the minibatch), ordered by
    # how far their microbatch lies from the measured batch size.
    counts = sorted(divisors(minibatch), key=lambda m: (abs(math.log(minibatch / m / b)), m))
    if options.schedule is Schedule.PIPEDREAM and not options.auto_microbatches:
        return minibatch, counts[:1]  # PipeDream updates per microbatch: plan at the measured size
    # Search the counts whose microbatch is within 1/4..4x the profiled batch (linear rescaling is
    # a fair estimate near the measured size only), the closest first, at most a few; else the
    # closest one alone.
    near = [m for m in counts if b / 4 <= minibatch / m <= b * 4]
    return minibatch, sorted(near[:MAX_MICROBATCH_CANDIDATES] or counts[:1])


def solve(
    profile: Profile,
    topology: Topology,
    options: PlanOptions,
    *,
    minibatch_size: int,
    microbatches: int,
) -> Partition:
    """One solver run for a fixed microbatch count (the profile is rescaled to the microbatch)."""
    from planner.optimize import optimize
    from planner.optimize.bounds import certify_plan

    partition = optimize(
        profile.rescale(minibatch_size // microbatches),
        topology,
        schedule=options.schedule,
        microbatches=microbatches,
        optimizer=options.optimizer,
        solver=options.solver,
        straight=options.straight,
        allow_fewer_devices=(
            options.cost_model != "pipedream"
            if options.allow_fewer_devices is None
            else options.allow_fewer_devices
        ),
        memory_constraint=options.memory_constraint,
        recompute=options.recompute,
        cost_model=options.cost_model,
        time_limit_s=options.time_limit_s,
    )
    # the certificate: gap to a lower bound over every partition, optimal when proven (D)
    return certify_plan(
        partition,
        profile.rescale(minibatch_size // microbatches),
        topology,
        optimizer=options.optimizer,
        straight=options.straight,
        recompute=options.recompute,
        memory_constraint=options.memory_constraint,
    )


def make_plan(
    profile: Profile, profile_path: str | os.PathLike[str], topology: Topology, options: PlanOptions
) -> Plan:
    """Optimize ``profile`` for ``topology`` and wrap the result, with baselines, as a Plan.

    The prediction is the simulator's (:func:`planner.schedule_search.with_simulated_prediction`),
    and the microbatch count (and with ``auto_schedule`` the schedule) is the one it simulates
    fastest.
    """
    if options.auto_schedule or options.schedule in RANK_SCHEDULES:
        from planner.schedule_search import choose_plan

        return choose_plan(profile, profile_path, topology, options)
    return per_stage_plan(profile, profile_path, topology, options)


def per_stage_plan(
    profile: Profile, profile_path: str | os.PathLike[str], topology: Topology, options: PlanOptions
) -> Plan:
    """:func:`make_plan` for ``pipedream``, ``1f1b`` and ``gpipe``: the solver's best partition
    for each microbatch count, the one the simulator finds fastest kept."""
    from planner.errors import InfeasibleError
    from planner.optimize.baselines import all_baselines
    from planner.optimize.cost import CostModelKind
    from planner.schedule_search import simulated_minibatch_s

    minibatch, counts = _sizes(profile, topology, options)
    planned = planning_profile(profile)
    best: Partition | None = None
    best_s = math.inf
    simulated: float | None = None
    failure: InfeasibleError | None = None
    for count in counts:
        try:
            partition = solve(
                planned, topology, options, minibatch_size=minibatch, microbatches=count
            )
        except InfeasibleError as exc:
            failure = failure or exc
            continue
        draft = plan_from_partition(
            partition, profile, profile_path, topology, options, minibatch, planned=planned
        )
        time_s = simulated_minibatch_s(draft, profile)
        if best is None or (time_s if time_s is not None else partition.minibatch_s) < best_s:
            best, simulated = partition, time_s
            best_s = time_s if time_s is not None else partition.minibatch_s
    if best is None:
        assert failure is not None
        raise failure
    baselines = all_baselines(
        planned.rescale(minibatch // best.microbatches),
        topology,
        schedule=options.schedule,
        microbatches=best.microbatches,
        optimizer=options.optimizer,
        recompute=options.recompute,
        memory_constraint=options.memory_constraint,
        cost_model=CostModelKind(options.cost_model),
    )
    if simulated is None:
        plan = plan_from_partition(
            best, profile, profile_path, topology, options, minibatch, baselines, planned=planned
        )
        note = "prediction from the cost model's formula (too large to simulate here)"
        return dataclasses.replace(plan, note="; ".join(x for x in (plan.note, note) if x))
    # Baselines are plans too: each one's simulated time stands in the plan; under the
    # synchronous schedules one that simulates faster than the solver's plan replaces it (the
    # solver ranked by its formula; the simulator also charges transfers on the critical path).
    timed, beaten = {}, (best, simulated)
    for name, base in baselines.items():
        draft = plan_from_partition(
            base, profile, profile_path, topology, options, minibatch, planned=planned
        )
        time_s = simulated_minibatch_s(draft, profile)
        timed[name] = base if time_s is None else dataclasses.replace(base, minibatch_s=time_s)
        allowed = base.fits or not options.memory_constraint
        if options.straight and max(st.replicas for st in base.stages) > 1:
            allowed = False
        if (
            time_s is not None
            and allowed
            and options.schedule is not Schedule.PIPEDREAM
            and time_s < beaten[1] * (1 - 1e-9)
        ):
            beaten = (base, time_s)
    chosen, chosen_s = beaten
    if chosen is not best:
        chosen = dataclasses.replace(
            chosen,
            note=f"the solver's plan ({len(best.stages)} stages, {best.minibatch_s * 1e3:.1f} ms by "
            f"its formula) simulates {simulated * 1e3:.1f} ms per minibatch; this one "
            f"simulates {chosen_s * 1e3:.1f} ms",
        )
    plan = plan_from_partition(
        chosen, profile, profile_path, topology, options, minibatch, timed, planned=planned
    )
    from planner.schedule_search import with_prediction

    return with_prediction(plan, chosen_s)


def planning_profile(profile: Profile) -> Profile:
    """What the solvers see: PipeDream's ``Input`` sources (data loading, not compute) and unused
    ``__getitem__`` sinks are dropped as PipeDream's optimizer drops them; our own profiles as is."""
    if profile.source != "pipedream":
        return profile
    from planner.profile.pipedream import pipedream_preprocess

    return pipedream_preprocess(profile)


def stage_names(
    stage_layers: Sequence[Sequence[int]], profile: Profile, planned: Profile
) -> list[list[str]]:
    """Stage layer names in ``profile``'s order; layers the solver did not see (dropped by
    :func:`planning_profile`) join the stage of their first consumer, or else of their last input."""
    stage_of = {planned.layers[i].name: s for s, st in enumerate(stage_layers) for i in st}
    consumers = profile.consumers()
    for index, layer in enumerate(profile.layers):  # sinks: after their inputs
        if layer.name not in stage_of and layer.inputs and not consumers[index]:
            stage_of[layer.name] = max(
                stage_of.get(profile.layers[i].name, 0) for i in layer.inputs
            )
    for index in reversed(range(len(profile.layers))):  # sources and the rest: before consumers
        name = profile.layers[index].name
        if name not in stage_of:
            stage_of[name] = min(
                (stage_of.get(profile.layers[c].name, 0) for c in consumers[index]), default=0
            )
    stages: list[list[str]] = [[] for _ in stage_layers]
    for layer in profile.layers:
        stages[stage_of[layer.name]].append(layer.name)
    return stages


def plan_from_partition(
    partition: Partition,
    profile: Profile,
    profile_path: str | os.PathLike[str],
    topology: Topology,
    options: PlanOptions,
    minibatch_size: int,
    baselines: dict[str, Partition] | None = None,
    *,
    planned: Profile | None = None,
) -> Plan:
    """A Plan from a solver's Partition (layer indices, into ``planned``, become names)."""
    microbatch = minibatch_size // partition.microbatches
    at_micro = (planned or profile).rescale(microbatch)
    names = stage_names([st.layers for st in partition.stages], profile, planned or profile)
    scores = []
    data_parallel_s = None
    for name, base in (baselines or {}).items():
        fits = base.fits
        scores.append(
            BaselineScore(
                name=name,
                minibatch_s=base.minibatch_s,
                stages=len(base.stages),
                fits=fits,
                note=base.note,
            )
        )
        if name == "data-parallel" and fits:
            data_parallel_s = base.minibatch_s
    stages = tuple(
        PlanStage(
            layers=tuple(stage_names),
            replicas=stage.replicas,
            ranks=tuple(stage.ranks),
            compute_s=stage.compute_s,
            comm_s=stage.comm_s,
            allreduce_s=stage.allreduce_s,
            time_s=stage.time_s,
            # the stage's tensors and what its process holds before them (Topology.process_bytes)
            memory_bytes=stage.memory_bytes + topology.process_bytes,
        )
        for stage, stage_names in zip(partition.stages, names, strict=True)
    )
    path = Path(profile_path)
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
        schedule=partition.schedule,
        optimizer=options.optimizer,
        minibatch_size=minibatch_size,
        microbatch_size=microbatch,
        microbatches=partition.microbatches,
        stages=stages,
        predicted=Prediction(
            bottleneck_s=partition.bottleneck_s,
            minibatch_s=partition.minibatch_s,
            samples_per_s=minibatch_size / partition.minibatch_s,
            single_device_s=partition.microbatches * at_micro.total_compute_ms / 1e3,
            data_parallel_s=data_parallel_s,
        ),
        solver=partition.solver,
        optimal=partition.optimal,
        gap=partition.gap if partition.gap is not None and partition.gap < float("inf") else None,
        note=partition.note,
        cost_model=partition.cost_model,
        recompute=options.recompute,
        baselines=tuple(scores),
        planner_version=__version__,
    )


def planner_memory_note(plan: Plan, profile: Profile) -> str:
    """For a plan made under ``--cost-model pipedream``: each stage's memory under the planner's
    model (weights, gradients, optimizer state, stashed versions, activations in flight), with a
    warning when a stage does not fit; "" for other plans.

    PipeDream's formula counts nothing for its last stage, so its memory column can say 0 GiB for a
    stage that needs tens of GiB (``plan simulate`` counts like the planner's model).
    """
    from planner.errors import PlanError
    from planner.optimize.cost import CostModel, SolverOptions
    from planner.topology import GIB

    if plan.cost_model != "pipedream":
        return ""
    planned = planning_profile(profile).rescale(plan.microbatch_size)
    index = {layer.name: i for i, layer in enumerate(planned.layers)}
    stages = [[index[name] for name in st.layers if name in index] for st in plan.stages]
    options = SolverOptions(
        schedule=plan.schedule,
        microbatches=plan.microbatches,
        optimizer=plan.optimizer,
        recompute=plan.recompute,
        memory_constraint=False,
    )
    try:
        part = CostModel(planned, plan.topology, options).evaluate(
            stages, [st.replicas for st in plan.stages], [st.ranks for st in plan.stages]
        )
    except PlanError:
        return ""
    cap = plan.topology.memory_bytes
    values = ", ".join(f"{s}: {st.memory_bytes / GIB:.2f}" for s, st in enumerate(part.stages))
    line = f"memory per stage under the planner's model, GiB: {values}"
    over = [s for s, st in enumerate(part.stages) if st.memory_bytes > cap]
    if over:
        line += (
            f"\nwarning: under the planner's model stage(s) {', '.join(map(str, over))} do not fit "
            f"in {cap / GIB:.3g} GiB (PipeDream's formula undercounts); check with plan simulate, "
            "or plan with the default --cost-model planner"
        )
    return line


def draw_plan(plan: Plan, profile: Profile, path: str | os.PathLike[str]) -> None:
    """Simulate ``plan`` and draw its Gantt chart to ``path`` (PNG)."""
    from planner.simulate import simulate
    from planner.viz import draw_gantt

    draw_gantt(simulate(plan, profile), path)
