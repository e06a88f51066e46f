"""Planning the rank schedules (``interleaved-1f1b``, ``zb-h1``, ``zbv``): cuts and their choice.

Under these schedules one pipeline of ``p`` ranks runs ``K = p v`` stages (chunks), stage ``s``
on rank ``layout[s]`` (:func:`planner.rank_schedules.stage_ranks`), without replication. Two
questions: where to cut (this module's exact program and its refinement), and which shape
``(schedule, p, v, M)`` to run (:func:`plan_rank_schedule`, which ranks shapes by simulating
them: what the simulator predicts is what the plan promises).

The cut. A chunk's cost is ``max(C, L_in, L_out)`` per microbatch, as a stage's in the planner
cost model (:mod:`planner.optimize.cost`): compute ``C`` (forward and backward, B and W together)
and its links at the level between the ranks of consecutive chunks (free inside a rank, the turn
of ``zbv``'s V). :func:`min_max_cut` minimises the slowest chunk exactly over the state space's
chains of ``K`` downsets (a chain DP with ``K`` fixed: ``V_s[k] = min_j max(cost_s(k, j),
V_{s+1}[j])``), checked equal to brute force in the tests. The slowest chunk is what bounds
every schedule's steady state, but a rank runs ``v`` chunks, so what the schedules really pay is
the busiest rank: :func:`balance_ranks` moves boundaries one state at a time while the ranks'
largest load (then the slowest chunk) drops. That refinement is a local search, so it is only
kept when the simulator says it is faster.

Example:
    >>> from planner.optimize.synthetic import chain_profile                    # doctest: +SKIP
    >>> plan = plan_rank_schedule(profile, topology, schedule=Schedule.ZBV,      # doctest: +SKIP
    ...                           microbatch_counts=[8], minibatch_size=32)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from planner.errors import InfeasibleError, PlanError
from planner.optimize.cost import CostModel, SolverOptions, link_s
from planner.optimize.states import StateSpace, build_states
from planner.optimize.tables import DownsetTables
from planner.profile.format import Profile
from planner.rank_schedules import check_schedule, stage_ranks
from planner.schedules import RANK_SCHEDULES, OptimizerKind, Schedule
from planner.topology import Topology

__all__ = [
    "CHUNK_CHOICES",
    "RankCandidate",
    "balance_ranks",
    "chunk_costs",
    "min_max_cut",
    "plan_rank_schedule",
    "shapes",
]

#: Chunks per rank tried for each rank schedule (torch: interleaved needs 2 or more, zbv 2).
CHUNK_CHOICES: dict[Schedule, tuple[int, ...]] = {
    Schedule.INTERLEAVED_1F1B: (2, 4),
    Schedule.ZB_H1: (1,),
    Schedule.ZBV: (2,),
}


@dataclass(frozen=True, kw_only=True)
class RankCandidate:
    """One simulated plan of a rank schedule.

    Attributes:
        schedule: The schedule.
        ranks: Pipeline ranks ``p`` (ranks ``0..p-1`` of the topology).
        chunks: Stages per rank ``v``.
        microbatches: ``M``.
        microbatch_size: Samples per microbatch.
        stages: Layer indices (into the profile given) of the ``p v`` stages, in pipeline order.
        stage_ranks: The rank of each stage.
        cut: ``"min-max"`` (the slowest chunk minimal, exact), ``"ranks"`` (then the ranks
            balanced), ``"order"`` (ranks balanced in the profile's order) or ``"even"`` (equal
            layer counts, torch's default).
        slowest_chunk_s: The slowest chunk's ``max(C, L_in, L_out)``, seconds.
        minibatch_s: Simulated time per minibatch, seconds.
        peak_bytes: Simulated peak memory of each rank, bytes.
        fits: Every rank's peak within the device memory.
    """

    schedule: Schedule
    ranks: int
    chunks: int
    microbatches: int
    microbatch_size: int
    stages: tuple[tuple[int, ...], ...]
    stage_ranks: tuple[int, ...]
    cut: str
    slowest_chunk_s: float
    minibatch_s: float
    peak_bytes: tuple[float, ...]
    fits: bool


def chunk_costs(
    tables: DownsetTables, topology: Topology, layout: Sequence[int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Compute between any two states, ``C[k, j] = compute(D_j) - compute(D_k)``, and for each
    boundary ``b`` (after chunk ``b``) the link's seconds per microbatch for every state's cut."""
    compute = tables.compute_s[None, :] - tables.compute_s[:, None]
    links = [_link(topology, layout, b, tables.cut_bytes) for b in range(len(layout))]
    return compute, links


def _cost(
    compute: np.ndarray, links: list[np.ndarray], s: int, start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Chunk ``s``'s ``max(C, L_in, L_out)`` from state(s) ``start`` to state(s) ``end``."""
    link_in = links[s - 1][start] if s > 0 else 0.0
    return np.maximum(np.maximum(compute[start, end], link_in), links[s][end])


def _link(topology: Topology, layout: Sequence[int], boundary: int, cut: np.ndarray) -> np.ndarray:
    """Seconds the link after chunk ``boundary`` is busy per microbatch, for each state's cut."""
    if boundary < 0 or boundary >= len(layout) - 1:
        return np.zeros(len(cut))
    a, b = layout[boundary], layout[boundary + 1]
    if a == b:  # two chunks of one rank: no transfer
        return np.zeros(len(cut))
    level = topology.levels[topology.span_level((a, b))]
    return np.array([link_s(x, level.bandwidth_bytes_per_s, level.latency_s) for x in cut])


def min_max_cut(
    tables: DownsetTables, space: StateSpace, topology: Topology, layout: Sequence[int]
) -> tuple[list[int], float]:
    """The chain of ``len(layout) + 1`` states (from the empty set to every layer) whose slowest
    chunk is smallest, and that chunk's cost; exact over ``space``.

    Raises:
        PlanError: The space has no chain that long (fewer layers than chunks).
    """
    count = len(layout)
    n = len(space)
    last = n - 1
    allowed = space.includes
    compute, links = chunk_costs(tables, topology, layout)
    rows, cols = np.arange(n)[:, None], np.arange(n)[None, :]
    value = np.full(n, np.inf)
    value[last] = 0.0
    choice = np.zeros((count, n), dtype=np.int64)
    for s in range(count - 1, -1, -1):
        cost = _cost(compute, links, s, rows, cols)
        total = np.where(allowed, np.maximum(cost, value[None, :]), np.inf)
        choice[s] = np.argmin(total, axis=1)
        value = total[np.arange(n), choice[s]]
    if not np.isfinite(value[0]):
        raise PlanError(f"the model's layers cannot fill {count} stages; use fewer ranks or chunks")
    path = [0]
    for s in range(count):
        path.append(int(choice[s, path[-1]]))
    assert path[-1] == last
    return path, float(value[0])


def _chain_costs(compute: np.ndarray, links: list[np.ndarray], path: Sequence[int]) -> np.ndarray:
    """Each chunk's cost along a chain of states."""
    p = np.asarray(path)
    return np.array([float(_cost(compute, links, s, p[s], p[s + 1])) for s in range(len(p) - 1)])


def balance_ranks(
    tables: DownsetTables,
    space: StateSpace,
    topology: Topology,
    layout: Sequence[int],
    path: Sequence[int],
    *,
    sweeps: int = 20,
) -> list[int]:
    """``path`` with boundaries moved one state at a time while ``(busiest rank's load, slowest
    chunk)`` decreases lexicographically; a rank's load is the sum of its chunks' costs. Moving
    the state between chunks ``b - 1`` and ``b`` changes those two chunks only (a link's cost
    depends on the state it leaves)."""
    path = list(path)
    ranks = np.asarray(layout)
    num = len(layout)
    compute, links = chunk_costs(tables, topology, layout)
    costs = _chain_costs(compute, links, path)
    loads = np.bincount(ranks, costs, minlength=int(ranks.max()) + 1)
    best = (float(loads.max()), float(costs.max()))
    for _ in range(sweeps):
        improved = False
        for b in range(1, num):
            lo, hi = path[b - 1], path[b + 1]
            options = np.flatnonzero(space.includes[lo] & space.includes[:, hi])
            if len(options) <= 1:
                continue
            before = _cost(compute, links, b - 1, np.full(len(options), lo), options)
            after = _cost(compute, links, b, options, np.full(len(options), hi))
            ra, rb = layout[b - 1], layout[b]
            trial_loads = np.repeat(loads[None, :], len(options), axis=0)
            trial_loads[:, ra] += before - costs[b - 1]
            trial_loads[:, rb] += after - costs[b]
            others = np.delete(costs, [b - 1, b]).max(initial=0.0)
            slowest = np.maximum(np.maximum(before, after), others)
            worst = trial_loads.max(axis=1)
            i = int(np.lexsort((slowest, worst))[0])
            value = (float(worst[i]), float(slowest[i]))
            if value < best and not np.allclose(value, best, rtol=1e-12, atol=0.0):
                path[b] = int(options[i])
                costs[b - 1], costs[b] = before[i], after[i]
                loads = trial_loads[i].copy()
                best, improved = value, True
        if not improved:
            break
    return path


def _cuts(
    profile: Profile,
    tables: DownsetTables,
    space: StateSpace,
    topology: Topology,
    layout: Sequence[int],
) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The cuts the simulator chooses among, as layer index lists: the exact min-max cut, its
    rank-balanced refinement, and in the profile's own (topological) order the cut balancing
    the ranks' compute lexicographically and torch's default of equal layer counts per stage.
    The last two are often better on chains: the min-max cut is indifferent to every stage but
    the slowest."""
    from planner.simulate_costs import rank_balanced_starts

    path, _ = min_max_cut(tables, space, topology, layout)
    paths = {"min-max": path}
    if len(set(layout)) < len(layout):
        paths["ranks"] = balance_ranks(tables, space, topology, layout, path)
    out: list[tuple[str, list[tuple[int, ...]]]] = []
    for name, chain in paths.items():
        stages = [tuple(space.stage(chain[s], chain[s + 1]).tolist()) for s in range(len(layout))]
        if all(stages != other for _, other in out):
            out.append((name, stages))
    count, num = len(profile.layers), len(layout)
    work = [layer.compute_ms for layer in profile.layers]
    orders = {
        "order": rank_balanced_starts(work, layout) if num > 1 else [],
        "even": [round(i * count / num) for i in range(1, num)],
    }
    for name, starts in orders.items():
        bounds = [0, *starts, count]
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            continue
        stages = [tuple(range(bounds[s], bounds[s + 1])) for s in range(num)]
        if all(stages != other for _, other in out):
            out.append((name, stages))
    return out


def _slowest(
    scaled: Profile,
    topology: Topology,
    layout: Sequence[int],
    stages: Sequence[tuple[int, ...]],
    optimizer: OptimizerKind,
) -> float:
    """The slowest chunk's ``max(C, L_in, L_out)`` of a cut given as layer lists."""
    masks = np.zeros((len(stages) + 1, len(scaled.layers)), dtype=bool)
    for s, stage in enumerate(stages):
        masks[s + 1] = masks[s]
        masks[s + 1, list(stage)] = True
    cost = CostModel(scaled, topology, SolverOptions(optimizer=optimizer))
    tables = DownsetTables.from_masks(cost, masks)
    compute, links = chunk_costs(tables, topology, layout)
    return float(_chain_costs(compute, links, list(range(len(stages) + 1))).max())


def shapes(
    schedules: Iterable[Schedule], devices: int, layers: int
) -> list[tuple[Schedule, int, int]]:
    """``(schedule, ranks p, chunks v)`` to try, most ranks first: every device, then halves of
    it (at least 2 ranks), and with more devices than the layers can fill the most that they
    can (``layers // v`` ranks), each with the chunk counts of :data:`CHUNK_CHOICES`.

    Example:
        >>> [p for _, p, _ in shapes([Schedule.ZB_H1], devices=16, layers=10)]
        [10, 8, 4, 2]
    """
    out = []
    for schedule in schedules:
        if schedule not in RANK_SCHEDULES:
            raise PlanError(f"schedule {schedule} is not a rank schedule")
        halves = []
        p = devices
        while p >= 2:
            halves.append(p)
            p //= 2
        for v in CHUNK_CHOICES[schedule]:
            most = min(devices, layers // v)  # torch's even split fills this many
            ranks = {r for r in halves if r * v <= layers} | ({most} if most >= 2 else set())
            out += [(schedule, r, v) for r in sorted(ranks, reverse=True)]
    return out


def plan_rank_schedule(
    profile: Profile,
    topology: Topology,
    *,
    schedules: Sequence[Schedule],
    minibatch_size: int,
    microbatch_counts: Sequence[int],
    optimizer: OptimizerKind = OptimizerKind.SGD,
    memory_constraint: bool = True,
    beat_s: float = math.inf,
    memory_bytes: float | None = None,
) -> list[RankCandidate]:
    """The best simulated plan of every shape tried, fastest first; shapes whose lower bound
    (``M`` times the perfect balance of the work over ``p`` ranks) cannot beat the best found
    (or ``beat_s``) are skipped.

    Args:
        profile: The planning profile at its own batch size (rescaled per microbatch here).
        topology: The devices; a pipeline of ``p`` ranks takes ranks ``0..p-1``.
        schedules: Rank schedules to try.
        minibatch_size: Samples per optimizer step.
        microbatch_counts: ``M`` values to try (each must divide the minibatch).
        optimizer: Training optimizer (its state counts towards memory).
        memory_constraint: Refuse shapes whose simulated peak exceeds the device memory.
        beat_s: A minibatch time found elsewhere (e.g. the best ``1f1b`` plan): shapes that cannot
            beat it are not simulated.
        memory_bytes: Device memory to plan for instead of the topology's.

    Raises:
        InfeasibleError: No shape fits (with ``memory_constraint``), or none could be formed.
    """
    from planner.simulate import simulate_stages
    from planner.simulate_costs import layer_stages

    limit = topology.memory_bytes if memory_bytes is None else memory_bytes
    space = build_states(profile, "auto")
    work = profile.total_compute_ms / 1e3 / profile.batch_size  # seconds per sample
    trials: list[tuple[float, Schedule, int, int, int]] = []
    shape_errors: list[str] = []  # torch's constraints, for the refusal when no shape is left
    tried = shapes(schedules, topology.num_devices, len(profile.layers))
    if not tried:
        raise InfeasibleError(
            f"{', '.join(map(str, schedules))} need at least 2 ranks and as many layers as stages "
            f"(2 per rank for zbv and interleaved-1f1b); {len(profile.layers)} layers on "
            f"{topology.num_devices} device(s) give none; use --schedule 1f1b"
        )
    for schedule, p, v in tried:
        for m in microbatch_counts:
            try:
                check_schedule(schedule, ranks=p, microbatches=m, chunks=v)
            except PlanError as exc:
                shape_errors.append(str(exc))
                continue
            trials.append((work * minibatch_size / p, schedule, p, v, m))
    trials.sort(key=lambda t: t[0])
    cuts: dict[tuple[int, tuple[int, ...]], list[tuple[str, list[tuple[int, ...]]]]] = {}
    tables_at: dict[int, DownsetTables] = {}
    best_of: dict[tuple[Schedule, int], RankCandidate] = {}
    fastest = beat_s
    refused: list[tuple[float, str]] = []  # (peak bytes, shape)
    for bound, schedule, p, v, m in trials:
        if bound >= fastest:
            break
        size = minibatch_size // m
        if size not in tables_at:
            cost = CostModel(profile.rescale(size), topology, SolverOptions(optimizer=optimizer))
            tables_at[size] = DownsetTables.from_masks(cost, space.masks)
        tables = tables_at[size]
        layout = tuple(stage_ranks(schedule, ranks=p, chunks=v))
        key = (size, layout)
        if key not in cuts:
            cuts[key] = _cuts(profile, tables, space, topology, layout)
        scaled = profile.rescale(size)
        for cut, layers in cuts[key]:
            slowest = _slowest(scaled, topology, layout, layers, optimizer)
            stages = layer_stages(
                scaled,
                layers,
                [(r,) for r in layout],
                schedule=schedule,
                topology=topology,
                optimizer=optimizer,
            )
            run = simulate_stages(
                stages,
                schedule=schedule,
                microbatches=m,
                topology=topology,
                microbatch_size=size,
                chunks=v,
            )
            peaks = tuple(d.peak_memory_bytes for d in run.devices)
            fits = max(peaks) <= limit
            found = RankCandidate(
                schedule=schedule,
                ranks=p,
                chunks=v,
                microbatches=m,
                microbatch_size=size,
                stages=tuple(layers),
                stage_ranks=layout,
                cut=cut,
                slowest_chunk_s=slowest,
                minibatch_s=run.minibatch_s,
                peak_bytes=peaks,
                fits=fits,
            )
            if memory_constraint and not fits:
                refused.append((max(peaks), f"{schedule} x{v} on {p} ranks, M={m}"))
                continue
            shape = (schedule, v)
            if shape not in best_of or found.minibatch_s < best_of[shape].minibatch_s:
                best_of[shape] = found
            fastest = min(fastest, found.minibatch_s)
    out = sorted(best_of.values(), key=lambda c: c.minibatch_s)
    if not out and not math.isfinite(beat_s):
        if refused:
            peak, smallest = min(refused)
            raise InfeasibleError(
                f"no shape of {', '.join(map(str, schedules))} fits in "
                f"{limit / 2**30:.2f} GiB per device (smallest peak: {smallest}: "
                f"{peak / 2**30:.2f} GiB); "
                "use more devices, --memory-gb, or --schedule 1f1b with --recompute"
            )
        why = f" ({shape_errors[0]})" if shape_errors and not trials else ""
        raise InfeasibleError(
            f"no shape of {', '.join(map(str, schedules))} can run: "
            f"{len(profile.layers)} layers on {topology.num_devices} devices with microbatches "
            f"{list(microbatch_counts)}{why}; use other --microbatches or --schedule 1f1b"
        )
    return out
