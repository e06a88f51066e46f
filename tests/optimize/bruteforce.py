"""The brute-force oracle: every partition and every replication, scored by the cost model.

A test helper shared by the DP, ILP and baseline tests. It enumerates every chain of downsets
``∅ ⊂ D_0 ⊂ ... ⊂ D_{S-1} = all layers`` of a state space (:mod:`planner.optimize.states`; each
step along ``includes``; stage ``s`` is ``D_s \\ D_{s-1}``),
and for each chain every replica vector the options allow (one each when ``straight``; summing to
the device count, or to at most it with ``allow_fewer_devices``), and optionally every placement
of the replicas on the devices, scores each with :meth:`CostModel.evaluate`, drops those that do
not fit in memory, and keeps the smallest objective. Nothing is pruned or clever, so it is slow and
obviously right.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from planner.optimize.cost import CostModel
from planner.optimize.result import Partition
from planner.optimize.states import StateSpace

__all__ = ["brute_force", "chains", "count_candidates", "placements", "replica_vectors"]


def chains(states: StateSpace, max_stages: int) -> Iterator[list[int]]:
    """Every path of states ``0 -> ... -> last`` along ``states.includes``, at most ``max_stages``
    steps; a path lists the states after the empty one."""
    last = len(states) - 1

    def extend(current: int, path: list[int]) -> Iterator[list[int]]:
        if current == last:
            yield path
            return
        if len(path) == max_stages:
            return
        for nxt in np.flatnonzero(states.includes[current]):
            yield from extend(int(nxt), [*path, int(nxt)])

    yield from extend(0, [])


def replica_vectors(
    stages: int, devices: int, *, straight: bool, all_devices: bool
) -> Iterator[tuple[int, ...]]:
    """Every replica count per stage: positive, total at most (or exactly) ``devices``."""
    if straight:
        if stages <= devices and (not all_devices or stages == devices):
            yield (1,) * stages
        return
    for vector in itertools.product(range(1, devices + 1), repeat=stages):
        total = sum(vector)
        if total == devices or (total < devices and not all_devices):
            yield vector


def _stage_lists(states: StateSpace, path: list[int]) -> list[list[int]]:
    return [
        [int(i) for i in states.stage(a, b)] for a, b in zip([0, *path[:-1]], path, strict=True)
    ]


def placements(cost: CostModel, replicas: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], ...]]:
    """Every essentially different choice of ranks for stages with these replica counts.

    Costs depend on ranks only through the units of the levels they share, so two devices of the
    same innermost unit (server) are interchangeable: it is enough to give each replica, in
    order, a unit label, and then the unit's next free device. With two levels all units are
    interchangeable too, so labels are canonical (a new unit is always the lowest unused one);
    with more levels every labelling is tried. Round-robin routing makes the order of a stage's
    replicas matter, so labels are sequences, not sets.
    """
    topo = cost.topology
    size = topo.levels[0].devices
    units = topo.num_devices // size
    total = sum(replicas)
    canonical = len(topo.levels) <= 2

    def label(prefix: list[int], used: list[int]) -> Iterator[list[int]]:
        if len(prefix) == total:
            yield prefix
            return
        top = max(prefix, default=-1) + 1 if canonical else units - 1
        for u in range(min(top, units - 1) + 1):
            if used[u] < size:
                used[u] += 1
                yield from label([*prefix, u], used)
                used[u] -= 1

    for labels in label([], [0] * units):
        taken = [0] * units
        ranks = []
        for u in labels:
            ranks.append(u * size + taken[u])
            taken[u] += 1
        bounds = [0, *itertools.accumulate(replicas)]
        yield tuple(tuple(ranks[a:b]) for a, b in itertools.pairwise(bounds))


def count_candidates(cost: CostModel, states: StateSpace, *, all_placements: bool = False) -> int:
    """How many partitions :func:`brute_force` would score (to keep property tests quick)."""
    o, devices = cost.options, cost.topology.num_devices
    count = 0
    for path in chains(states, devices):
        for replicas in replica_vectors(
            len(path), devices, straight=o.straight, all_devices=not o.allow_fewer_devices
        ):
            count += sum(1 for _ in placements(cost, replicas)) if all_placements else 1
    return count


def brute_force(
    cost: CostModel, states: StateSpace, *, all_placements: bool = False
) -> Partition | None:
    """The best partition over the state space, or None if none fits in memory.

    With ``all_placements`` every placement of the replicas on the devices is tried as well
    (:func:`placements`); otherwise ranks are contiguous, stage after stage
    (:func:`~planner.optimize.cost.contiguous_ranks`), the space the ILP searches.
    """
    o, devices = cost.options, cost.topology.num_devices
    best: Partition | None = None
    for path in chains(states, devices):
        stages = _stage_lists(states, path)
        for replicas in replica_vectors(
            len(stages), devices, straight=o.straight, all_devices=not o.allow_fewer_devices
        ):
            for ranks in placements(cost, replicas) if all_placements else [None]:
                candidate = cost.evaluate(
                    stages, replicas, ranks, solver="bruteforce", optimal=True
                )
                if not cost.fits(candidate):
                    continue
                if best is None or candidate.objective_s < best.objective_s:
                    best = candidate
    return best
