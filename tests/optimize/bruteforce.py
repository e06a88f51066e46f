"""The brute-force oracle: every partition and every replication, scored by the cost model.

A test helper shared by the DP, ILP and baseline tests. It enumerates every chain of downsets
``∅ ⊂ D_0 ⊂ ... ⊂ D_{S-1} = all layers`` from a state family (stage ``s`` is ``D_s \\ D_{s-1}``),
and for each chain every replica vector the options allow (one each when ``straight``; summing to
the device count, or to at most it with ``allow_fewer_devices``), scores each with
:meth:`CostModel.evaluate` (contiguous ranks), drops those that do not fit in memory, and keeps the
smallest objective. Nothing is pruned or clever, so it is slow and obviously right.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from planner.optimize.cost import CostModel
from planner.optimize.result import Partition

__all__ = ["all_downsets", "brute_force", "chains", "count_candidates", "replica_vectors"]


def all_downsets(cost: CostModel) -> np.ndarray:
    """Every non-empty down-closed layer set of the profile's DAG, as a boolean matrix."""
    n = cost.num_layers
    inputs = [layer.inputs for layer in cost.profile.layers]
    rows = []
    for bits in itertools.product((False, True), repeat=n):
        if any(bits) and all(not bits[i] or all(bits[j] for j in inputs[i]) for i in range(n)):
            rows.append(bits)
    return np.array(rows, dtype=bool)


def chains(masks: np.ndarray, max_stages: int) -> Iterator[list[np.ndarray]]:
    """Every chain of strictly growing downsets from ``masks`` that ends at the full set."""
    masks = np.unique(np.asarray(masks, dtype=bool), axis=0)
    masks = masks[masks.any(axis=1)]
    n = masks.shape[1]

    def extend(current: np.ndarray, chain: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
        if current.all():
            yield chain
            return
        if len(chain) == max_stages:
            return
        for mask in masks:
            if (mask & current).sum() == current.sum() and mask.sum() > current.sum():
                yield from extend(mask, [*chain, mask])

    yield from extend(np.zeros(n, dtype=bool), [])


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


def _stage_lists(chain: list[np.ndarray]) -> list[list[int]]:
    prev = np.zeros_like(chain[0])
    out = []
    for mask in chain:
        out.append([int(i) for i in np.flatnonzero(mask & ~prev)])
        prev = mask
    return out


def count_candidates(cost: CostModel, masks: np.ndarray) -> int:
    """How many partitions :func:`brute_force` would score (to keep property tests quick)."""
    o, devices = cost.options, cost.topology.num_devices
    return sum(
        sum(
            1
            for _ in replica_vectors(
                len(c), devices, straight=o.straight, all_devices=not o.allow_fewer_devices
            )
        )
        for c in chains(masks, devices)
    )


def brute_force(cost: CostModel, masks: np.ndarray) -> Partition | None:
    """The best partition over the state family ``masks``, or None if none fits in memory."""
    o, devices = cost.options, cost.topology.num_devices
    best: Partition | None = None
    for chain in chains(masks, devices):
        stages = _stage_lists(chain)
        for replicas in replica_vectors(
            len(stages), devices, straight=o.straight, all_devices=not o.allow_fewer_devices
        ):
            candidate = cost.evaluate(stages, replicas, solver="bruteforce", optimal=True)
            if not cost.fits(candidate):
                continue
            if best is None or candidate.objective_s < best.objective_s:
                best = candidate
    return best
