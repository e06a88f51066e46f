"""The cost model's formulas as plain functions: links, all-reduce, microbatches in flight, the
replicas' share, the schedule's objective, ranks and link levels, and PipeDream's formulas.

Shared by the DP, the ILP, the brute-force oracle, the simulator and :class:`~planner.optimize.cost.CostModel`;
the model they make up is described in :mod:`planner.optimize.cost`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planner.schedules import Schedule
from planner.topology import Topology

__all__ = [
    "PipeDreamFormulas",
    "allreduce_s",
    "boundary_link_level",
    "contiguous_ranks",
    "in_flight",
    "link_s",
    "replica_share",
    "schedule_objective",
]


def link_s(nbytes: float, bandwidth_bytes_per_s: float, latency_s: float = 0.0) -> float:
    """Seconds one link is busy per microbatch: ``nbytes`` forward plus their gradients back.

    Example:
        >>> link_s(1e9, 10e9, 1e-5)
        0.20002
    """
    if nbytes <= 0:
        return 0.0
    return 2.0 * (latency_s + nbytes / bandwidth_bytes_per_s)


def allreduce_s(
    nbytes: float, replicas: int, bandwidth_bytes_per_s: float, latency_s: float = 0.0
) -> float:
    """Ring all-reduce of ``nbytes`` among ``replicas`` devices: ``2 (m-1)/m`` of the data per link.

    Example:
        >>> allreduce_s(1e9, 4, 10e9)
        0.15
    """
    if replicas <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (replicas - 1)
    return steps / replicas * nbytes / bandwidth_bytes_per_s + steps * latency_s


def in_flight(schedule: Schedule, devices_from_here: int, replicas: int, microbatches: int) -> int:
    """Microbatches whose activations (and, for pipedream, weight versions) one replica keeps.

    ``devices_from_here`` counts the devices running this stage and every later one.

    Example:
        >>> in_flight(Schedule.PIPEDREAM, 4, 1, 8), in_flight(Schedule.GPIPE, 4, 2, 8)
        (4, 4)
    """
    per_replica_total = -(-microbatches // replicas)
    if schedule is Schedule.GPIPE:
        return per_replica_total
    depth = -(-devices_from_here // replicas)  # PipeDream NOAM from this stage on
    if schedule is Schedule.ONE_F_ONE_B:
        return min(depth, per_replica_total)
    return depth


def replica_share(schedule: Schedule, replicas: int, microbatches: int) -> float:
    """Fraction of a stage's per-microbatch time one replica is charged, per microbatch.

    ``pipedream`` (steady state, no flush): ``1 / m``. ``1f1b``/``gpipe``: ``ceil(M / m) / M``,
    since round-robin routing (microbatch ``i`` on replica ``i % m``) gives the busiest replica
    ``ceil(M / m)`` of the minibatch's ``M`` microbatches. Never below ``1 / m``, and
    non-increasing in ``m``.

    Example:
        >>> replica_share(Schedule.PIPEDREAM, 3, 8), replica_share(Schedule.GPIPE, 3, 8)
        (0.3333333333333333, 0.375)
    """
    if schedule is Schedule.PIPEDREAM:
        return 1.0 / replicas
    return -(-microbatches // replicas) / microbatches


def schedule_objective(
    schedule: Schedule, microbatches: int, stage_times_s: Sequence[float], syncs_s: Sequence[float]
) -> tuple[float, float, float]:
    """``(bottleneck_s, minibatch_s, objective_s)`` of a pipeline under a schedule.

    Example:
        >>> schedule_objective(Schedule.ONE_F_ONE_B, 4, [1.0, 2.0], [0.5, 0.1])
        (2.0, 10.5, 10.5)
    """
    bottleneck = max(stage_times_s)
    if schedule is Schedule.PIPEDREAM:
        return bottleneck, microbatches * bottleneck, bottleneck
    minibatch = (microbatches + len(stage_times_s) - 1) * bottleneck + max(syncs_s, default=0.0)
    return bottleneck, minibatch, minibatch


def contiguous_ranks(replicas: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Ranks in stage order: stage 0 takes ranks ``0..m0-1``, stage 1 the next ``m1``, ...

    Example:
        >>> contiguous_ranks([2, 1, 3])
        ((0, 1), (2,), (3, 4, 5))
    """
    out, start = [], 0
    for m in replicas:
        out.append(tuple(range(start, start + m)))
        start += m
    return tuple(out)


def boundary_link_level(topology: Topology, ranks_a: Sequence[int], ranks_b: Sequence[int]) -> int:
    """The slowest level used between two consecutive stages.

    Microbatch ``i`` runs on ``ranks[i % len(ranks)]`` of every stage (round-robin, the runtime's
    routing), so stage ``a`` sends to stage ``b`` over the pairs
    ``(ranks_a[i % ma], ranks_b[i % mb])``; the level is the outermost any of them uses.

    Example:
        >>> t = Topology.from_args(gpus=4, gpus_per_node=2)
        >>> boundary_link_level(t, [0, 2], [1, 3]), boundary_link_level(t, [0, 1], [2])
        (0, 1)
    """
    ma, mb = len(ranks_a), len(ranks_b)
    period = math.lcm(ma, mb)
    i = np.arange(period)
    ra = np.asarray(ranks_a)[i % ma]
    rb = np.asarray(ranks_b)[i % mb]
    level = np.full(period, -1)
    for lv in range(len(topology.levels) - 1, -1, -1):
        size = topology.block_size(lv)
        level = np.where(ra // size == rb // size, lv, level)
    level = np.where(ra == rb, -1, level)
    return int(level.max())


@dataclass(frozen=True, kw_only=True)
class PipeDreamFormulas:
    """PipeDream's released optimizer (``optimizer_graph_hierarchical.py``), as formulas.

    Written from reading its ``compute_partitioning``; no code taken. ``m`` replicas, ``P``
    parameter bytes, ``B`` the level's bandwidth; sizes and times are sums over the stage's layers.

    * stage time ``(C + 4 (m - 1) P / (B m)) / m`` (its data-parallel term counts 4 (m-1)/m
      transfers of the weights, not the ring's 2 (m-1)/m); for a stage made of one whole
      sub-pipeline of the level below, its data-parallel term is further divided by the
      devices of that sub-pipeline (``num_machines_within_machine``), and ``C`` is the lower
      level's best time;
    * activation transfers ``2 X / (B m)`` for the stage's input and output only when an
      activation compression ratio ``r`` is given (then divided by ``r``), where ``X`` is the
      activation size of the state's antichain nodes (augmented antichain, as PipeDream builds it);
    * memory ``(sum of activation sizes + P) * ceil((N - n) / m)`` must not exceed the device memory
      (16e9 bytes by default), where ``N`` is the level's device count and ``n`` the devices used
      by the pipeline up to and including this stage (so the last stage always fits);
    * every device is used (``--use_fewer_machines`` off), states are PipeDream's antichains.
    """

    bandwidth_bytes_per_s: float
    devices_below: int = 1

    def stage_time_s(self, compute_s: float, parameter_bytes: float, replicas: int) -> float:
        dp = 4.0 * (replicas - 1) * parameter_bytes / (self.bandwidth_bytes_per_s * replicas)
        return (compute_s + dp / self.devices_below) / replicas
