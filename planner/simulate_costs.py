"""What the simulator is given: per-stage costs of a plan, or of a profile cut for a schedule.

:func:`plan_stages` turns a plan and its profile into :class:`~planner.simulate.SimStage` s;
:func:`virtual_stages` cuts a profile into ``p x v`` stages placed for any schedule (how today's
schedules, which plans cannot name yet, are simulated on real models); :func:`ring_allreduce_s`
prices a gradient all-reduce. Both count a layer's cost once, and a tensor on every boundary from
its stage to the last stage reading it (relayed through the stages between).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from planner.errors import PlanError
from planner.plan import Plan
from planner.profile.format import Profile
from planner.rank_schedules import stage_ranks
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Topology

if TYPE_CHECKING:  # planner.simulate imports this module
    from planner.simulate import SimStage, SimulationResult

__all__ = [
    "DEFAULT_CASES",
    "balanced_starts",
    "compare_schedules",
    "layer_stages",
    "plan_stages",
    "rank_balanced_starts",
    "ring_allreduce_s",
    "virtual_stages",
]

DEFAULT_CASES: tuple[tuple[Schedule, int], ...] = (
    (Schedule.GPIPE, 1),
    (Schedule.ONE_F_ONE_B, 1),
    (Schedule.INTERLEAVED_1F1B, 2),
    (Schedule.ZB_H1, 1),
    (Schedule.ZBV, 2),
)
"""The ``(schedule, chunks per rank)`` pairs :func:`compare_schedules` simulates by default."""

_STATE_COPIES = {OptimizerKind.SGD: 0, OptimizerKind.MOMENTUM: 1, OptimizerKind.ADAM: 2}


def plan_stages(plan: Plan, profile: Profile) -> list[SimStage]:
    """The per-microbatch costs of a plan's stages, from ``profile`` rescaled to the microbatch.

    Memory counted per device: weights, buffers, gradients and optimizer state (``static``);
    per microbatch in flight the bytes saved for backward (``saved_bytes``, or the layer outputs
    where the profile does not know); with recomputation only the stage's input per microbatch in
    flight, plus the saved bytes of one microbatch during its backward; for ``pipedream`` one
    stashed weight copy per in-flight microbatch beyond the first. Imported PipeDream profiles
    plan without their ``Input`` nodes (data loading) and unused ``__getitem__`` sinks, as the
    optimizer does; the simulator ignores them too. See :func:`layer_stages`.

    Example:
        >>> [s.ranks for s in plan_stages(plan, profile)]       # doctest: +SKIP
        [(0,), (1,)]
    """
    scaled = profile.rescale(plan.microbatch_size)
    return layer_stages(
        scaled,
        plan.stage_layer_indices(scaled),
        [stage.ranks for stage in plan.stages],
        schedule=plan.schedule,
        topology=plan.topology,
        optimizer=plan.optimizer,
        recompute=plan.recompute,
        ignored=_not_planned(profile),
    )


def layer_stages(
    scaled: Profile,
    stages: Sequence[Sequence[int]],
    ranks: Sequence[tuple[int, ...]],
    *,
    schedule: Schedule,
    topology: Topology | None,
    optimizer: OptimizerKind = OptimizerKind.SGD,
    recompute: bool = False,
    ignored: set[int] | frozenset[int] = frozenset(),
) -> list[SimStage]:
    """:class:`~planner.simulate.SimStage` s for stages given as layer indices of ``scaled`` (a
    profile at the microbatch size), stage ``s`` on ``ranks[s]``.

    A layer's cost counts once, in its stage; a tensor counts on every boundary from its stage to
    the last stage reading it (relayed through the stages between). Each stage's W
    (:attr:`SimStage.backward_weight_s`) is the sum of its layers'
    :meth:`~planner.profile.format.LayerProfile.split_backward_ms` weight parts, and what W keeps
    from the B is the inputs of its layers with weights. What a process holds before its stage
    (``topology.process_bytes``) counts once per rank, on the rank's first stage. ``ignored``
    layers (see :func:`plan_stages`) cost nothing.
    """
    from planner.simulate import SimStage

    num = len(stages)
    stage_of = np.empty(len(scaled.layers), dtype=np.int64)
    for s, indices in enumerate(stages):
        stage_of[list(indices)] = s
    boundary = _boundary_bytes(scaled, stage_of, num, set(ignored))
    copies = 2 + _STATE_COPIES[optimizer]  # weights, gradients, optimizer state
    process = topology.process_bytes if topology is not None else 0.0
    seen_ranks: set[int] = set()
    out = []
    for s, indices in enumerate(stages):
        mine = sorted(i for i in indices if i not in ignored)
        layers = [scaled.layers[i] for i in mine]
        fwd = sum(layer.forward_ms for layer in layers) / 1e3
        bwd = sum(layer.backward_ms for layer in layers) / 1e3
        params = sum(layer.parameter_bytes for layer in layers)
        saved = float(
            sum(x.activation_bytes if x.saved_bytes is None else x.saved_bytes for x in layers)
        )
        # a weight gradient needs its layer's inputs: kept from the B to the W
        held = sum(
            scaled.layers[j].activation_bytes
            for i in mine
            if scaled.layers[i].parameter_bytes > 0
            for j in scaled.layers[i].inputs
        )
        first_here = not seen_ranks.intersection(ranks[s])
        seen_ranks.update(ranks[s])
        inbound = float(boundary[s - 1]) if s > 0 else 0.0
        out.append(
            SimStage(
                forward_s=fwd,
                backward_s=bwd + (fwd if recompute else 0.0),
                backward_weight_s=min(sum(x.split_backward_ms()[1] for x in layers) / 1e3, bwd),
                ranks=tuple(ranks[s]),
                send_bytes=float(boundary[s]) if s < num - 1 else 0.0,
                allreduce_s=0.0
                if topology is None
                else ring_allreduce_s(topology, ranks[s], params),
                static_bytes=float(
                    copies * params
                    + sum(layer.buffer_bytes for layer in layers)
                    + (process if first_here else 0.0)
                ),
                activation_bytes=inbound if recompute else saved,
                backward_extra_bytes=saved if recompute else 0.0,
                weight_held_bytes=0.0 if recompute else min(float(held), saved),
                stash_bytes=float(params) if schedule is Schedule.PIPEDREAM else 0.0,
                update_s=0.0 if topology is None else topology.update_s(optimizer, params),
            )
        )
    return out


def _boundary_bytes(
    scaled: Profile, stage_of: np.ndarray, num: int, ignored: set[int]
) -> np.ndarray:
    """Bytes on the link from stage s to s + 1, for every s: a tensor from layer i is on every
    boundary from its stage up to the last stage reading it (relayed through the ones between).
    """
    cross = np.zeros(num + 1)
    for i, (layer, readers) in enumerate(zip(scaled.layers, scaled.consumers(), strict=True)):
        if i in ignored:
            continue
        last = max((stage_of[j] for j in readers), default=stage_of[i])
        if last > stage_of[i]:
            cross[stage_of[i]] += layer.activation_bytes
            cross[last] -= layer.activation_bytes
    return np.cumsum(cross)[:num]


def virtual_stages(
    profile: Profile,
    *,
    schedule: Schedule,
    ranks: int,
    chunks: int = 1,
    microbatch_size: int | None = None,
    starts: Sequence[int] | None = None,
    topology: Topology | None = None,
    optimizer: OptimizerKind = OptimizerKind.SGD,
) -> list[SimStage]:
    """The profile cut into ``ranks x chunks`` stages in its layer order, placed as ``schedule``
    lays them out (:func:`planner.rank_schedules.stage_ranks`), for :func:`simulate_stages`.

    This is how today's schedules, which plans cannot name yet, are simulated on a real model.
    Costs are counted as :func:`plan_stages` counts them (no recomputation), and each stage's W
    (:attr:`SimStage.backward_weight_s`) is the sum of its layers'
    :meth:`~planner.profile.format.LayerProfile.split_backward_ms` weight parts.

    Example:
        >>> stages = virtual_stages(profile, schedule=Schedule.ZBV, ranks=4, chunks=2)  # doctest: +SKIP
        >>> simulate_stages(stages, schedule=Schedule.ZBV, microbatches=8, chunks=2)  # doctest: +SKIP

    Args:
        profile: The profile; its layer order is a topological order, so any cut of it is a
            valid pipeline.
        schedule: The schedule (sets the placement).
        ranks: Pipeline ranks ``p``.
        chunks: Stages per rank ``v``.
        microbatch_size: Samples per microbatch; default the profile's batch size.
        starts: The first layer index of every stage after the first (``p v - 1`` increasing
            indices); default :func:`balanced_starts` of the layers' forward+backward times
            (the slowest stage as fast as it can be; with several chunks per rank
            :func:`rank_balanced_starts` may balance the ranks better).
        topology: The devices; ranks ``0..p-1`` are used.
        optimizer: The training optimizer (its state counts towards memory).

    Raises:
        PlanError: Bad ``starts``, or fewer layers than stages.
    """

    num = ranks * chunks
    scaled = profile.rescale(microbatch_size or profile.batch_size)
    ignored = _not_planned(profile)
    count = len(scaled.layers)
    if count < num:
        raise PlanError(f"{count} layers cannot fill {num} stages; use fewer ranks or chunks")
    layout = stage_ranks(schedule, ranks=ranks, chunks=chunks)
    if starts is None:
        work = [0.0 if i in ignored else x.compute_ms for i, x in enumerate(scaled.layers)]
        starts = balanced_starts(work, num)
    bounds = [0, *starts, count]
    if len(bounds) != num + 1 or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise PlanError(
            f"stage starts {list(starts)} must be {num - 1} increasing layer indices in 1..{count - 1}"
        )
    layers = [[i for i in range(bounds[s], bounds[s + 1])] for s in range(num)]
    return layer_stages(
        scaled,
        layers,
        [(layout[s],) for s in range(num)],
        schedule=schedule,
        topology=topology,
        optimizer=optimizer,
        ignored=ignored,
    )


def balanced_starts(costs: Sequence[float], parts: int) -> list[int]:
    """Where ``parts`` contiguous pieces of ``costs`` start (after the first) so that the largest
    piece is as small as it can be (to 1e-9 relative), every piece non-empty.

    A bisection on the cap: the greedy cut (close a piece just before it would exceed the cap)
    uses the fewest pieces for a cap, so the smallest cap it fits into ``parts`` pieces is the
    optimum; pieces left over split single layers off the end.

    Example:
        >>> balanced_starts([1, 1, 1, 6, 1, 1], 3)
        [3, 4]
    """
    count = len(costs)
    if not 1 <= parts <= count:
        raise PlanError(f"cannot cut {count} layers into {parts} non-empty stages")

    def cut(cap: float) -> list[int]:
        out, total = [], 0.0
        for i, c in enumerate(costs):
            if i and total + c > cap:
                out.append(i)
                total = 0.0
            total += c
        return out

    lo, hi = max(costs, default=0.0), float(sum(costs))
    while hi - lo > 1e-9 * max(hi, 1e-300):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if len(cut(mid)) < parts else (mid, hi)
    taken = set(cut(hi))
    for i in range(count - 1, 0, -1):  # too few pieces: split layers off the end
        if len(taken) >= parts - 1:
            break
        taken.add(i)
    return sorted(taken)


def rank_balanced_starts(costs: Sequence[float], layout: Sequence[int]) -> list[int]:
    """A cut of ``costs`` into ``len(layout)`` pieces, piece ``s`` on rank ``layout[s]``, that
    keeps the busiest rank's total low: from :func:`balanced_starts`, boundaries move one layer at
    a time while the ranks' totals (then the pieces), sorted from the largest, decrease
    lexicographically. A local search, not proven optimal; :func:`balanced_starts` is exact when
    every rank holds one piece.

    Example:
        >>> rank_balanced_starts([1, 1, 1, 1, 1, 1, 1, 1, 1, 8], [0, 1, 1, 0])  # V on 2 ranks
        [1, 5, 9]
    """
    count, num = len(costs), len(layout)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=float))])
    ranks = np.asarray(layout, dtype=np.int64)

    def score(starts: list[int]) -> tuple[float, ...]:
        bounds = np.asarray([0, *starts, count])
        pieces = prefix[bounds[1:]] - prefix[bounds[:-1]]
        loads = np.bincount(ranks, pieces)
        return (*np.sort(loads)[::-1], *np.sort(pieces)[::-1])

    starts = balanced_starts(costs, num)
    best = score(starts)
    improved = True
    while improved:
        improved = False
        for k in range(num - 1):
            for step in (-1, 1):
                moved = starts[k] + step
                low = starts[k - 1] if k else 0
                high = starts[k + 1] if k + 1 < num - 1 else count
                if not low < moved < high:
                    continue
                trial = [*starts[:k], moved, *starts[k + 1 :]]
                value = score(trial)
                if value < best and not np.allclose(value, best, rtol=1e-12, atol=0.0):
                    starts, best, improved = trial, value, True
    return starts


def _not_planned(profile: Profile) -> set[int]:
    """Layers of an imported PipeDream profile that its optimizer (and ours) ignores: ``Input``
    sources, whose time is data loading, and unused ``__getitem__`` sinks."""
    if profile.source != "pipedream":
        return set()
    from planner.profile.pipedream import pipedream_preprocess

    kept = {layer.name for layer in pipedream_preprocess(profile).layers}
    return {i for i, layer in enumerate(profile.layers) if layer.name not in kept}


def ring_allreduce_s(topology: Topology, ranks: Sequence[int], nbytes: float) -> float:
    """Ring all-reduce of ``nbytes`` among ``ranks``: 2(m-1)/m x bytes over the slowest level
    spanned, plus 2(m-1) message latencies; 0 for one rank."""
    m = len(ranks)
    if m < 2 or nbytes <= 0:
        return 0.0
    level = topology.levels[topology.span_level(ranks)]
    return (
        2 * (m - 1) / m * nbytes / level.ring_bandwidth_bytes_per_s
        + 2 * (m - 1) * level.ring_latency_s
    )


def compare_schedules(
    profile: Profile,
    *,
    ranks: int,
    microbatches: int,
    microbatch_size: int | None = None,
    topology: Topology | None = None,
    optimizer: OptimizerKind = OptimizerKind.SGD,
    cases: Sequence[tuple[Schedule, int]] = DEFAULT_CASES,
) -> tuple[pd.DataFrame, dict[str, SimulationResult]]:
    """Simulate one model under several schedules on ``ranks`` ranks, each on its own cut of the
    profile (:func:`virtual_stages`): a table, and every run for its Gantt chart.

    One chunk per rank: the min-max cut (:func:`balanced_starts`). Several: that cut and
    :func:`rank_balanced_starts`' are both simulated and the faster kept (``cut`` says which).

    Example:
        >>> table, runs = compare_schedules(profile, ranks=4, microbatches=8)     # doctest: +SKIP
        >>> draw_gantt(runs["zbv x2"], "zbv.png")                                # doctest: +SKIP

    Returns:
        One row per case (``schedule``, ``chunks``, ``cut`` (``"stages"``: the min-max cut of
        the stages; ``"ranks"``: the cut balancing the ranks), ``minibatch_ms``, ``samples_per_s``,
        ``bubble`` (mean idle share of the ranks), ``peak_memory_gib`` (the highest rank),
        ``fits`` (that peak within the topology's device memory; None without a topology),
        ``vs_1f1b`` (throughput over ``1f1b``'s, when it is a case) and ``note`` (why a shape
        was refused, e.g. torch's microbatch rule)), and the runs by label (``"zbv x2"``,
        ``"1f1b"``).
    """
    from planner.errors import PlannerError
    from planner.simulate import simulate_stages

    size = microbatch_size or profile.batch_size
    ignored = _not_planned(profile)
    work = [0.0 if i in ignored else x.compute_ms for i, x in enumerate(profile.layers)]
    rows, runs = [], {}
    for schedule, chunks in cases:
        label = f"{schedule} x{chunks}" if chunks > 1 else str(schedule)
        row: dict[str, object] = {"schedule": str(schedule), "chunks": chunks, "note": ""}
        run = None
        try:
            layout = stage_ranks(schedule, ranks=ranks, chunks=chunks)
            cuts = {"stages": balanced_starts(work, len(layout))}
            if chunks > 1:
                cuts["ranks"] = rank_balanced_starts(work, layout)
            for cut, starts in cuts.items():
                stages = virtual_stages(
                    profile,
                    schedule=schedule,
                    ranks=ranks,
                    chunks=chunks,
                    microbatch_size=size,
                    starts=starts,
                    topology=topology,
                    optimizer=optimizer,
                )
                trial = simulate_stages(
                    stages,
                    schedule=schedule,
                    microbatches=microbatches,
                    topology=topology,
                    microbatch_size=size,
                    chunks=chunks,
                )
                if run is None or trial.minibatch_s < run.minibatch_s:
                    run, row["cut"] = trial, cut
        except PlannerError as exc:
            row["note"] = str(exc)
            rows.append(row)
            continue
        assert run is not None
        runs[label] = run
        row |= {
            "minibatch_ms": run.minibatch_s * 1e3,
            "samples_per_s": run.samples_per_s,
            "bubble": float(np.mean([d.idle_fraction for d in run.devices])),
            "peak_memory_gib": max(d.peak_memory_bytes for d in run.devices) / 2**30,
            "fits": None
            if topology is None
            else max(d.peak_memory_bytes for d in run.devices) <= topology.memory_bytes,
        }
        rows.append(row)
    table = pd.DataFrame(
        rows,
        columns=[
            "schedule",
            "chunks",
            "cut",
            "minibatch_ms",
            "samples_per_s",
            "bubble",
            "peak_memory_gib",
            "fits",
            "vs_1f1b",
            "note",
        ],
    )
    if str(Schedule.ONE_F_ONE_B) in runs:
        table["vs_1f1b"] = table["samples_per_s"] / runs[str(Schedule.ONE_F_ONE_B)].samples_per_s
    return table, runs
