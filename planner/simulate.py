"""Event-driven simulation of a plan: every forward, backward, transfer and all-reduce, timed.

The simulator walks the operation lists of :mod:`planner.schedules` (the same lists the runtime
follows), one list per device, and times each operation: it starts when its device is free and
its input has arrived. Transfers go over the link between the two ranks (one link per ordered
pair of ranks, i.e. per direction, each serialising its transfers in the order they are sent);
the link's level comes from :meth:`Topology.link_level`. Tensors that skip stages are relayed by
the stages in between, so the link from stage s to s+1 carries every tensor produced in stages
<= s and read in stages > s; gradients of the same size go back. Replicated stages all-reduce
their gradients once per minibatch after their last backward of it (``pipedream``: once per
round of R microbatches, one on each replica, as PipeDream does; see
:func:`planner.schedules.sync_points`); ring all-reduce: 2(m-1)/m x parameter bytes at the slowest
level the replicas span, plus 2(m-1) latencies. ``1f1b`` and ``gpipe`` flush after every
minibatch, ``pipedream`` runs minibatches back to back.

Today's schedules (:class:`planner.schedules.SimulatedSchedule`) run on virtual stages:
``interleaved-1f1b`` and ``zbv`` put several stages (chunks) on one rank, as
:func:`planner.schedules.stage_ranks` lays them out, and walk
:func:`planner.schedules.rank_orders` (torch's orders); a transfer between two stages of one
rank is free. ``zb-h1`` and ``zbv`` split each backward into B (input gradient: it sends the
gradient upstream and frees the activations) and W (weight gradient,
:attr:`SimStage.backward_weight_s`), which needs only its own B. On equal stages the simulated
bubbles are the closed forms: 1F1B ``(p - 1)(F + B)``, interleaved ``(p - 1)/(v M)`` of the
compute, ZB-H1 ``(p - 1)(F + B - W)``, ZBV none in the steady state for ``F = B = W`` and
``M >= 2p - 1`` (tests/test_simulate.py).

What is not modelled: compute and communication overlap perfectly (sends use no compute time),
the all-reduce does not share links with activation transfers, the optimizer step takes no time,
and data loading is free; under ``zb-h1``/``zbv`` the tensors W still needs after B (the layer
inputs of weight gradients) are not counted, as the ZB paper's "1F1B memory" does not. Links are full duplex, as the topology's per-direction bandwidths say;
the optimizer's cost model charges activations and their gradients to one link, so a plan bound
by its transfers can simulate faster than predicted.

Example:
    >>> r = simulate_stages(
    ...     [SimStage(forward_s=1.0, backward_s=2.0, ranks=(0,)),
    ...      SimStage(forward_s=1.0, backward_s=2.0, ranks=(1,))],
    ...     schedule=Schedule.GPIPE, microbatches=4, minibatches=2)
    >>> r.minibatch_s                       # (M + S - 1) x (f + b)
    15.0
    >>> round(r.devices[0].idle_fraction, 3)  # the bubble: (S - 1) / (M + S - 1)
    0.2
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from planner.errors import PlanError
from planner.plan import Plan
from planner.profile.format import Profile
from planner.schedules import (
    AnySchedule,
    OptimizerKind,
    Schedule,
    SimulatedSchedule,
    check_schedule,
    rank_orders,
    replica_order,
    splits_backward,
    stage_ranks,
    sync_points,
    sync_unit,
)
from planner.topology import Topology

__all__ = [
    "COMPUTE_KINDS",
    "EVENT_COLUMNS",
    "EVENT_KINDS",
    "DeviceStats",
    "LinkStats",
    "SimStage",
    "SimulationResult",
    "default_minibatches",
    "plan_stages",
    "simulate",
    "simulate_stages",
    "steady_window",
    "virtual_stages",
]

EVENT_KINDS = (
    "forward",
    "backward",
    "send",
    "recv",
    "allreduce",
    "backward_input",
    "backward_weight",
)
COMPUTE_KINDS = ("forward", "backward", "backward_input", "backward_weight")
EVENT_COLUMNS = (
    "rank",
    "stage",
    "replica",
    "kind",
    "microbatch",
    "minibatch",
    "start_s",
    "end_s",
    "peer",
    "bytes",
)
_F, _B, _SEND, _RECV, _AR, _BI, _W = range(7)
_COMPUTE = (_F, _B, _BI, _W)
_STATE_COPIES = {OptimizerKind.SGD: 0, OptimizerKind.MOMENTUM: 1, OptimizerKind.ADAM: 2}


@dataclass(frozen=True, kw_only=True)
class SimStage:
    """One pipeline stage as the simulator sees it; times and sizes are per microbatch.

    Attributes:
        forward_s: Forward time of one microbatch on one replica, seconds.
        backward_s: Backward time (recomputation included, if any), seconds.
        ranks: The ranks of its replicas; replica ``i`` is ``ranks[i]``.
        send_bytes: Bytes sent to the next stage per microbatch (every tensor crossing the
            boundary); the gradients coming back have the same size. Ignored on the last stage.
        allreduce_s: One gradient all-reduce among the replicas, seconds; once per minibatch
            (``pipedream``: once per round of one microbatch on each replica).
        static_bytes: Memory held all the time: weights, gradients, optimizer state, buffers.
        activation_bytes: Memory held per microbatch from its forward's start to its
            backward's end (what is saved for backward).
        backward_extra_bytes: Memory held only during a backward (recomputed activations).
        stash_bytes: Memory per in-flight microbatch beyond the first (PipeDream's stashed
            weight versions).
        backward_weight_s: The weight-gradient part (W) of ``backward_s``, seconds; schedules
            that split the backward (``zb-h1``, ``zbv``) run ``backward_s - backward_weight_s``
            as B and this as W; the others ignore it.
    """

    forward_s: float
    backward_s: float
    ranks: tuple[int, ...]
    send_bytes: float = 0.0
    allreduce_s: float = 0.0
    static_bytes: float = 0.0
    activation_bytes: float = 0.0
    backward_extra_bytes: float = 0.0
    stash_bytes: float = 0.0
    backward_weight_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.ranks:
            raise PlanError("a stage needs at least one rank")
        for name in (
            "forward_s",
            "backward_s",
            "send_bytes",
            "allreduce_s",
            "static_bytes",
            "activation_bytes",
            "backward_extra_bytes",
            "stash_bytes",
            "backward_weight_s",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise PlanError(f"stage {name} must be finite and >= 0, got {value!r}")
        if self.backward_weight_s > self.backward_s:
            raise PlanError(
                f"stage backward_weight_s {self.backward_weight_s!r} exceeds backward_s "
                f"{self.backward_s!r}; W is part of the backward"
            )


@dataclass(frozen=True, kw_only=True)
class DeviceStats:
    """What one device did in the steady-state window.

    Attributes:
        rank: The device's rank.
        stage: The stage it runs.
        replica: Which replica of the stage.
        compute_fraction: Share of the window spent in forwards and backwards.
        allreduce_fraction: Share spent in the gradient all-reduce.
        idle_fraction: The rest: the bubble (waiting for inputs, gradients or the flush).
        peak_memory_bytes: Highest memory over the whole run.
        stages: Every (virtual) stage it runs, ``(stage,)`` but under ``interleaved-1f1b`` and
            ``zbv`` (where ``stage`` is the first).
    """

    rank: int
    stage: int
    replica: int
    compute_fraction: float
    allreduce_fraction: float
    idle_fraction: float
    peak_memory_bytes: float
    stages: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LinkStats:
    """One direction of a link between two ranks and how busy it was in the window."""

    src: int
    dst: int
    level: int
    busy_fraction: float


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """A simulated run; times in seconds.

    Attributes:
        schedule: The schedule simulated.
        chunks: (Virtual) stages per rank: ``v`` under ``interleaved-1f1b`` and ``zbv``, else 1.
        microbatches: Microbatches per minibatch (M).
        minibatches: Minibatches simulated.
        samples_per_minibatch: Samples per minibatch.
        minibatch_s: Steady-state time per minibatch: the mean spacing of minibatch ends in
            the window of :func:`steady_window` (for ``pipedream`` cut to whole periods of the
            steady state when it repeats; the first minibatch's time if only one ran).
        first_minibatch_s: When the first minibatch ended (from an empty pipeline).
        makespan_s: When the last operation ended.
        samples_per_s: ``samples_per_minibatch / minibatch_s``.
        window_s: The steady-state window ``(start, end)`` the fractions are measured over.
        critical_stage: The stage whose devices were busiest in the window (the bottleneck).
        devices: Per device, ordered by stage then replica.
        links: Per link direction that carried data, busiest first.
        memory_limit_bytes: Device memory of the topology, if one was given.
        events: One row per operation; columns :data:`EVENT_COLUMNS` (``kind`` is one of
            :data:`EVENT_KINDS`; ``peer`` is the other rank of a send/recv, else -1).
        memory: The memory of each device as a step function: columns ``rank``, ``stage``,
            ``time_s``, ``bytes`` (the value holds from ``time_s`` until the device's next row).
    """

    schedule: AnySchedule
    microbatches: int
    minibatches: int
    samples_per_minibatch: int
    minibatch_s: float
    first_minibatch_s: float
    makespan_s: float
    samples_per_s: float
    window_s: tuple[float, float]
    critical_stage: int
    devices: tuple[DeviceStats, ...]
    links: tuple[LinkStats, ...]
    memory_limit_bytes: float | None
    events: pd.DataFrame = field(repr=False, compare=False)
    memory: pd.DataFrame = field(repr=False, compare=False)
    chunks: int = 1

    @property
    def num_stages(self) -> int:
        return 1 + max(d.stage for d in self.devices)

    def describe(self) -> str:
        """The summary ``plan simulate`` prints."""
        lines = [
            f"simulated {_count(self.minibatches, 'minibatch')} of "
            f"{_count(self.microbatches, 'microbatch')} "
            f"({self.samples_per_minibatch} samples), schedule {self.schedule}",
            f"time per minibatch {self.minibatch_s * 1e3:.2f} ms (first {self.first_minibatch_s * 1e3:.2f} ms), "
            f"{self.samples_per_s:.1f} samples/s, critical stage {self.critical_stage}",
            "rank  stage  replica  compute  allreduce  idle (bubble)  peak memory GiB",
        ]
        for d in self.devices:
            lines.append(
                f"{d.rank:>4}  {d.stage:>5}  {d.replica:>7}  {d.compute_fraction:>6.1%}  "
                f"{d.allreduce_fraction:>9.1%}  {d.idle_fraction:>13.1%}  "
                f"{d.peak_memory_bytes / 1024**3:>15.3f}"
            )
        if self.links and self.links[0].busy_fraction > 0:
            top = self.links[0]
            lines.append(
                f"busiest link: rank {top.src} -> {top.dst} (level {top.level}), "
                f"{top.busy_fraction:.1%} busy"
            )
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es"


def default_minibatches(schedule: AnySchedule, *, devices: int, microbatches: int) -> int:
    """Enough minibatches to see the steady state.

    3 for the flushed schedules (every minibatch after the first is alike); for ``pipedream``
    enough that a window of at least eight minibatches and four microbatches per device remains
    between the fill and the drain of a pipeline over ``devices`` devices (see
    :func:`steady_window`).
    """
    if schedule is not Schedule.PIPEDREAM:
        return 3
    return 2 * _edge(devices, microbatches) + 1 + max(8, math.ceil(4 * devices / microbatches))


def steady_window(
    schedule: AnySchedule, *, devices: int, microbatches: int, minibatches: int
) -> tuple[int, int]:
    """The minibatches ``(lo, hi)`` whose end times bound the steady-state window.

    The time per minibatch is ``(end[hi] - end[lo]) / (hi - lo)``; ``lo == hi == 0`` means one
    minibatch, timed from 0. Flushed schedules: ``(0, N - 1)``. ``pipedream``: the fill and the
    drain each distort the ends of ``E = ceil(devices / M)`` minibatches (the input stage admits
    ``devices - 1`` microbatches ahead), so the window runs from ``E`` to ``N - 1 - E``; shorter
    runs fall back to their second half.

    Example:
        >>> steady_window(Schedule.PIPEDREAM, devices=4, microbatches=2, minibatches=10)
        (2, 7)
    """
    if minibatches == 1:
        return 0, 0
    if schedule is not Schedule.PIPEDREAM:
        return 0, minibatches - 1
    edge = _edge(devices, microbatches)
    lo, hi = edge, minibatches - 1 - edge
    if hi - lo < 1:
        return (minibatches - 1) // 2, minibatches - 1
    return lo, hi


def _whole_periods(done: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Shrink the window ``lo..hi`` to whole periods of the steady state, if it has one.

    Round-robin replication makes a steady state periodic over several minibatches (e.g. every
    round of replicas ends with its all-reduce), so a window over part of a period would be off.
    """
    steps = np.diff(done[lo : hi + 1])
    scale = max(float(np.abs(steps).max(initial=0.0)), 1e-300)
    for period in range(1, len(steps) // 2 + 1):
        if np.allclose(steps[period:], steps[:-period], rtol=1e-9, atol=1e-9 * scale):
            return hi - (len(steps) // period) * period, hi
    return lo, hi


def _edge(devices: int, microbatches: int) -> int:
    return math.ceil(devices / microbatches)


def simulate(plan: Plan, profile: Profile, *, minibatches: int | None = None) -> SimulationResult:
    """Simulate ``plan`` with the costs of ``profile`` (rescaled to the plan's microbatch size).

    Example:
        >>> from planner.plan import Plan
        >>> from planner.profile import Profile
        >>> plan = Plan.load("plan.json")                                   # doctest: +SKIP
        >>> result = simulate(plan, Profile.load(plan.profile.path))        # doctest: +SKIP
        >>> print(result.describe())                                        # doctest: +SKIP

    Args:
        plan: The plan.
        profile: The profile it was made from (checked with :meth:`Plan.check_profile`).
        minibatches: How many to simulate; default :func:`default_minibatches`.

    Raises:
        PlanError: The plan does not match the profile.
    """
    plan.check_profile(profile)
    stages = plan_stages(plan, profile)
    return simulate_stages(
        stages,
        schedule=plan.schedule,
        microbatches=plan.microbatches,
        minibatches=minibatches,
        topology=plan.topology,
        microbatch_size=plan.microbatch_size,
    )


def plan_stages(plan: Plan, profile: Profile) -> list[SimStage]:
    """The per-microbatch costs of a plan's stages, from ``profile`` rescaled to the microbatch.

    Memory counted per device: weights, buffers, gradients and optimizer state (``static``);
    per microbatch in flight the bytes saved for backward (``saved_bytes``, or the layer outputs
    where the profile does not know); with recomputation only the stage's input per microbatch in
    flight, plus the saved bytes of one microbatch during its backward; for ``pipedream`` one
    stashed weight copy per in-flight microbatch beyond the first. Imported PipeDream profiles
    plan without their ``Input`` nodes (data loading) and unused ``__getitem__`` sinks, as the
    optimizer does; the simulator ignores them too.

    Example:
        >>> [s.ranks for s in plan_stages(plan, profile)]       # doctest: +SKIP
        [(0,), (1,)]
    """
    scaled = profile.rescale(plan.microbatch_size)
    ignored = _not_planned(profile)
    stage_of = np.empty(len(scaled.layers), dtype=np.int64)
    for s, indices in enumerate(plan.stage_layer_indices(scaled)):
        stage_of[indices] = s
    num = len(plan.stages)
    boundary = _boundary_bytes(scaled, stage_of, num, ignored)
    copies = 2 + _STATE_COPIES[plan.optimizer]  # weights, gradients, optimizer state
    out = []
    for s, stage in enumerate(plan.stages):
        layers = [scaled.layers[i] for i in np.flatnonzero(stage_of == s) if i not in ignored]
        fwd = sum(layer.forward_ms for layer in layers) / 1e3
        bwd = sum(layer.backward_ms for layer in layers) / 1e3
        params = sum(layer.parameter_bytes for layer in layers)
        saved = sum(
            layer.activation_bytes if layer.saved_bytes is None else layer.saved_bytes
            for layer in layers
        )
        inbound = float(boundary[s - 1]) if s > 0 else 0.0
        out.append(
            SimStage(
                forward_s=fwd,
                backward_s=bwd + (fwd if plan.recompute else 0.0),
                ranks=stage.ranks,
                send_bytes=float(boundary[s]) if s < num - 1 else 0.0,
                allreduce_s=ring_allreduce_s(plan.topology, stage.ranks, params),
                static_bytes=float(copies * params + sum(layer.buffer_bytes for layer in layers)),
                activation_bytes=inbound if plan.recompute else float(saved),
                backward_extra_bytes=float(saved) if plan.recompute else 0.0,
                stash_bytes=float(params) if plan.schedule is Schedule.PIPEDREAM else 0.0,
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
    schedule: AnySchedule,
    ranks: int,
    chunks: int = 1,
    microbatch_size: int | None = None,
    starts: Sequence[int] | None = None,
    topology: Topology | None = None,
    optimizer: OptimizerKind = OptimizerKind.SGD,
) -> list[SimStage]:
    """The profile cut into ``ranks x chunks`` stages in its layer order, placed as ``schedule``
    lays them out (:func:`planner.schedules.stage_ranks`), for :func:`simulate_stages`.

    This is how today's schedules, which plans cannot name yet, are simulated on a real model.
    Costs are counted as :func:`plan_stages` counts them (no recomputation), and each stage's W
    (:attr:`SimStage.backward_weight_s`) is the sum of its layers'
    :meth:`~planner.profile.format.LayerProfile.split_backward_ms` weight parts.

    Example:
        >>> stages = virtual_stages(profile, schedule=SimulatedSchedule.ZBV, ranks=4, chunks=2)  # doctest: +SKIP
        >>> simulate_stages(stages, schedule=SimulatedSchedule.ZBV, microbatches=8, chunks=2)  # doctest: +SKIP

    Args:
        profile: The profile; its layer order is a topological order, so any cut of it is a
            valid pipeline.
        schedule: The schedule (sets the placement).
        ranks: Pipeline ranks ``p``.
        chunks: Stages per rank ``v``.
        microbatch_size: Samples per microbatch; default the profile's batch size.
        starts: The first layer index of every stage after the first (``p v - 1`` increasing
            indices); default cuts where the running forward+backward time crosses each
            ``k / (p v)`` of the total, an even split of the compute.
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
    if starts is None:
        work = np.cumsum(
            [0.0 if i in ignored else x.compute_ms for i, x in enumerate(scaled.layers)]
        )
        targets = work[-1] * np.arange(1, num) / num
        cuts = np.searchsorted(work, targets, side="left") + 1
        starts = [int(min(max(c, k + 1), count - num + k + 1)) for k, c in enumerate(cuts)]
        for k in range(1, len(starts)):  # at least one layer per stage
            starts[k] = max(starts[k], starts[k - 1] + 1)
    bounds = [0, *starts, count]
    if len(bounds) != num + 1 or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise PlanError(
            f"stage starts {list(starts)} must be {num - 1} increasing layer indices in 1..{count - 1}"
        )
    stage_of = np.repeat(np.arange(num), np.diff(bounds))
    boundary = _boundary_bytes(scaled, stage_of, num, ignored)
    layout = stage_ranks(schedule, ranks=ranks, chunks=chunks)
    copies = 2 + _STATE_COPIES[optimizer]
    out = []
    for s in range(num):
        layers = [scaled.layers[i] for i in range(bounds[s], bounds[s + 1]) if i not in ignored]
        params = sum(layer.parameter_bytes for layer in layers)
        out.append(
            SimStage(
                forward_s=sum(layer.forward_ms for layer in layers) / 1e3,
                backward_s=sum(layer.backward_ms for layer in layers) / 1e3,
                backward_weight_s=min(
                    sum(layer.split_backward_ms()[1] for layer in layers) / 1e3,
                    sum(layer.backward_ms for layer in layers) / 1e3,
                ),
                ranks=(layout[s],),
                send_bytes=float(boundary[s]) if s < num - 1 else 0.0,
                allreduce_s=0.0,
                static_bytes=float(copies * params + sum(x.buffer_bytes for x in layers)),
                activation_bytes=float(
                    sum(
                        x.activation_bytes if x.saved_bytes is None else x.saved_bytes
                        for x in layers
                    )
                ),
                stash_bytes=float(params) if schedule is Schedule.PIPEDREAM else 0.0,
            )
        )
    return out


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
    return 2 * (m - 1) / m * nbytes / level.bandwidth_bytes_per_s + 2 * (m - 1) * level.latency_s


def simulate_stages(
    stages: Sequence[SimStage],
    *,
    schedule: AnySchedule,
    microbatches: int,
    minibatches: int | None = None,
    topology: Topology | None = None,
    microbatch_size: int = 1,
    chunks: int = 1,
) -> SimulationResult:
    """Simulate a pipeline given as plain per-stage costs; see the module docstring.

    Under ``interleaved-1f1b``, ``zb-h1`` and ``zbv`` (:class:`SimulatedSchedule`) the
    ``stages`` are the ``p x chunks`` virtual stages in pipeline order, one rank each, placed as
    :func:`planner.schedules.stage_ranks` says (stage ``s`` on the rank of stage ``s % p`` for
    interleaved, the V for ``zbv``): stages that share a device name the same rank. Transfers
    between two stages of one rank are free.

    Example:
        >>> r = simulate_stages([SimStage(forward_s=1, backward_s=2, ranks=(0, 1))],
        ...                     schedule=Schedule.ONE_F_ONE_B, microbatches=4, minibatches=1)
        >>> r.minibatch_s, sorted(set(r.events["kind"]))   # two replicas, two microbatches each
        (6.0, ['backward', 'forward'])

    Args:
        stages: The stages in pipeline order.
        schedule: The schedule.
        microbatches: Microbatches per minibatch (M).
        minibatches: Minibatches to run; default :func:`default_minibatches`.
        topology: Links and memory; None makes every transfer free.
        microbatch_size: Samples per microbatch (for the throughput).
        chunks: Virtual stages per rank (``interleaved-1f1b``: ``v >= 2``; ``zbv``: 2).

    Raises:
        PlanError: No stages, a rank used twice, a rank outside the topology, fewer than one
            microbatch or minibatch, or a shape the schedule does not allow
            (:func:`planner.schedules.check_schedule`).
    """
    num = len(stages)
    if num == 0:
        raise PlanError("nothing to simulate: give at least one stage")
    if microbatches < 1:
        raise PlanError(f"need at least one microbatch per minibatch, got {microbatches}")
    if chunks < 1 or num % chunks:
        raise PlanError(
            f"{num} stages are not {chunks} chunks on each of a whole number of ranks; "
            "give ranks x chunks stages"
        )
    check_schedule(schedule, ranks=num // chunks, microbatches=microbatches, chunks=chunks)
    if isinstance(schedule, SimulatedSchedule):
        _check_layout(stages, schedule, chunks)
    if minibatches is None:
        minibatches = default_minibatches(
            schedule, devices=sum(len(st.ranks) for st in stages), microbatches=microbatches
        )
    if minibatches < 1:
        raise PlanError(
            f"need at least one minibatch to simulate, got {minibatches}; use --minibatches 4"
        )
    ranks = [r for st in stages for r in st.ranks]
    if isinstance(schedule, Schedule) and len(set(ranks)) != len(ranks):
        raise PlanError(f"ranks {ranks} repeat; give each replica its own rank")
    if topology is not None and max(ranks) >= topology.num_devices:
        raise PlanError(
            f"rank {max(ranks)} is outside the topology's {topology.num_devices} devices"
        )
    engine = _Engine(stages, schedule, microbatches, minibatches, topology, microbatch_size, chunks)
    return engine.run()


def _check_layout(stages: Sequence[SimStage], schedule: SimulatedSchedule, chunks: int) -> None:
    """One rank per virtual stage, and the same rank exactly where the schedule's layout says."""
    layout = stage_ranks(schedule, ranks=len(stages) // chunks, chunks=chunks)
    device_rank: dict[int, int] = {}
    for s, (st, device) in enumerate(zip(stages, layout, strict=True)):
        if len(st.ranks) != 1:
            raise PlanError(
                f"stage {s} has {len(st.ranks)} replicas; schedule {schedule} is simulated "
                "without replication; use 1f1b, gpipe or pipedream for replicated stages"
            )
        expected = device_rank.setdefault(device, st.ranks[0])
        if st.ranks[0] != expected:
            raise PlanError(
                f"stage {s} runs on rank {st.ranks[0]}, but schedule {schedule} puts it with "
                f"stage {layout.index(device)} on rank {expected}; give stages "
                f"{[i for i, d in enumerate(layout) if d == device]} the same rank"
            )
    if len(set(device_rank.values())) != len(device_rank):
        raise PlanError(
            f"ranks {[st.ranks[0] for st in stages]} put two devices' stages on one rank; "
            f"schedule {schedule} places them as {list(layout)}"
        )


class _Engine:
    """The event loop; devices advance through their op lists as far as their inputs allow."""

    def __init__(
        self,
        stages: Sequence[SimStage],
        schedule: AnySchedule,
        microbatches: int,
        minibatches: int,
        topology: Topology | None,
        microbatch_size: int,
        chunks: int,
    ) -> None:
        self.stages, self.schedule, self.topology = list(stages), schedule, topology
        self.M, self.N, self.mb_size = microbatches, minibatches, microbatch_size
        self.chunks = chunks
        self.total = microbatches * minibatches
        replicas = [len(st.ranks) for st in stages]
        self.devices: list[tuple[int, int, int]] = []  # (rank, first stage, replica)
        # per device: (kind, stage, microbatch over the run; for _AR the last one it covers)
        self.ops: list[list[tuple[int, int, int]]] = []
        num = len(stages)
        self.dev_of = [[0] * self.total for _ in range(num)]
        if isinstance(schedule, SimulatedSchedule):
            split = splits_backward(schedule)
            kinds = {"F": _F, "B": _BI if split else _B, "W": _W}
            orders = rank_orders(
                schedule, ranks=num // chunks, microbatches=microbatches, chunks=chunks
            )
            for r, order in enumerate(orders):
                self.devices.append((stages[r].ranks[0], r, 0))
                self.ops.append(
                    [
                        (kinds[op.kind], op.stage or 0, k * self.M + op.microbatch)
                        for k in range(self.N)
                        for op in order
                    ]
                )
        else:
            for s, st in enumerate(stages):
                for r, rank in enumerate(st.ranks):
                    self.devices.append((rank, s, r))
                    self.ops.append(self._device_ops(replicas, s, r, len(st.ranks) > 1))
        self.stages_of: list[tuple[int, ...]] = []
        for d, ops in enumerate(self.ops):
            mine = set()
            for kind, s, g in ops:
                if kind == _F:
                    self.dev_of[s][g] = d
                    mine.add(s)
            self.stages_of.append(tuple(sorted(mine)) or (self.devices[d][1],))
        nan = math.nan
        self.fwd_in = [[0.0 if s == 0 else nan] * self.total for s in range(num)]
        self.grad_in = [[0.0 if s == num - 1 else nan] * self.total for s in range(num)]
        self.waiting: dict[tuple[int, int, int], int] = {}
        self.link_free: dict[tuple[int, int], float] = {}
        self.link_busy: dict[tuple[int, int], list[tuple[float, float]]] = {}
        self.groups: dict[tuple[int, int], list[int]] = {}  # (stage, minibatch) -> arrived
        self.group_t: dict[tuple[int, int], float] = {}
        self.ptr = [0] * len(self.devices)
        self.free = [0.0] * len(self.devices)
        self.in_flight = [0] * len(self.devices)
        self.mem_t: list[list[float]] = []
        self.mem_v: list[list[float]] = []
        for _, s, _ in self.devices:
            self.mem_t.append([0.0])
            self.mem_v.append([stages[s].static_bytes])
        # (device, kind, microbatch, minibatch, start, end, peer, bytes, stage)
        self.ev: list[tuple[int, int, int, int, float, float, int, float, int]] = []
        self.queue: deque[int] = deque(range(len(self.devices)))

    def _device_ops(
        self, replicas: list[int], s: int, r: int, reduce: bool
    ) -> list[tuple[int, int, int]]:
        """The device's op list from planner.schedules, with an all-reduce per minibatch."""
        kinds = {"F": _F, "B": _B}
        schedule = self.schedule
        assert isinstance(schedule, Schedule)
        if schedule is Schedule.PIPEDREAM:
            ops = [
                (kinds[op.kind], s, op.microbatch)
                for op in replica_order(
                    schedule, replicas=replicas, stage=s, replica=r, microbatches=self.total
                )
            ]
        else:
            base = replica_order(
                schedule, replicas=replicas, stage=s, replica=r, microbatches=self.M
            )
            ops = [
                (kinds[op.kind], s, k * self.M + op.microbatch)
                for k in range(self.N)
                for op in base
            ]
        if not reduce:
            return ops
        points = sync_points(
            schedule,
            replicas=replicas,
            stage=s,
            replica=r,
            microbatches=self.M,
            minibatches=self.N,
        )
        unit = sync_unit(schedule, replicas=replicas[s], microbatches=self.M)
        out: list[tuple[int, int, int]] = []
        start = 0
        for j, point in enumerate(points):  # an all-reduce names the last microbatch it covers
            out.extend(ops[start:point])
            out.append((_AR, s, min((j + 1) * unit, self.total) - 1))
            start = point
        out.extend(ops[start:])
        return out

    def run(self) -> SimulationResult:
        while self.queue:
            self._advance(self.queue.popleft())
        stuck = [
            self.devices[d][0] for d in range(len(self.devices)) if self.ptr[d] < len(self.ops[d])
        ]
        assert not stuck, f"schedule deadlocked on ranks {stuck}"
        return self._result()

    def _advance(self, d: int) -> None:
        """Run device ``d``'s ops until one needs an input that has not been produced yet."""
        rank = self.devices[d][0]
        ops, ev = self.ops[d], self.ev
        mem_t, mem_v = self.mem_t[d], self.mem_v[d]
        i, t = self.ptr[d], self.free[d]
        last = len(self.stages) - 1
        while i < len(ops):
            kind, s, g = ops[i]
            st = self.stages[s]
            if kind == _AR:
                key = (s, g)
                arrived = self.groups.setdefault(key, [])
                arrived.append(d)
                self.group_t[key] = max(self.group_t.get(key, 0.0), t)
                self.ptr[d], self.free[d] = i, t
                if len(arrived) < len(st.ranks):
                    return  # the last replica to arrive releases the others
                start = self.group_t[key]
                end = start + st.allreduce_s
                for m in arrived:
                    if end > start:
                        ev.append((m, _AR, -1, g // self.M, start, end, -1, 0.0, s))
                    self.free[m] = end
                    self.ptr[m] += 1
                    if m != d:
                        self.queue.append(m)
                i, t = self.ptr[d], end
                continue
            if kind == _W:  # the weight gradient follows this device's own B: no input
                start, end = t, t + st.backward_weight_s
                ev.append((d, kind, g, g // self.M, start, end, -1, 0.0, s))
                t = end
                i += 1
                continue
            ready = (self.fwd_in if kind == _F else self.grad_in)[s][g]
            if ready != ready:  # nan: the input has not been produced yet
                self.waiting[(_F if kind == _F else _B, s, g)] = d
                break
            start = t if t > ready else ready
            if kind == _F:
                end = start + st.forward_s
                n = self.in_flight[d]
                mem_t.append(start)
                mem_v.append(mem_v[-1] + st.activation_bytes + (st.stash_bytes if n else 0.0))
                self.in_flight[d] = n + 1
                if s < last:
                    self._send(d, rank, s + 1, g, end, st.send_bytes, _F)
            else:
                end = start + st.backward_s - (st.backward_weight_s if kind == _BI else 0.0)
                n = self.in_flight[d] - 1
                if st.backward_extra_bytes:
                    mem_t.append(start)
                    mem_v.append(mem_v[-1] + st.backward_extra_bytes)
                    mem_t.append(end)
                    mem_v.append(mem_v[-1] - st.backward_extra_bytes)
                mem_t.append(end)
                mem_v.append(mem_v[-1] - st.activation_bytes - (st.stash_bytes if n else 0.0))
                self.in_flight[d] = n
                if s > 0:
                    self._send(d, rank, s - 1, g, end, self.stages[s - 1].send_bytes, _B)
            ev.append((d, kind, g, g // self.M, start, end, -1, 0.0, s))
            t = end
            i += 1
        self.ptr[d], self.free[d] = i, t

    def _send(
        self, d: int, src: int, stage: int, g: int, ready: float, nbytes: float, kind: int
    ) -> None:
        """Send microbatch ``g``'s activations (kind F) or gradients (B) to ``stage``."""
        dd = self.dev_of[stage][g]
        dst = self.devices[dd][0]
        arrive = ready
        if self.topology is not None and nbytes > 0 and dst != src:
            key = (src, dst)
            level = self.topology.link_level(src, dst)
            start = max(ready, self.link_free.get(key, 0.0))
            arrive = start + self.topology.transfer_s(nbytes, level)
            self.link_free[key] = arrive
            self.link_busy.setdefault(key, []).append((start, arrive))
            here = stage - 1 if kind == _F else stage + 1
            self.ev.append((d, _SEND, g, g // self.M, start, arrive, dst, nbytes, here))
            self.ev.append((dd, _RECV, g, g // self.M, start, arrive, src, nbytes, stage))
        (self.fwd_in if kind == _F else self.grad_in)[stage][g] = arrive
        waiter = self.waiting.pop((kind, stage, g), None)
        if waiter is not None:
            self.queue.append(waiter)

    # --- summarising -----------------------------------------------------------------------

    def _result(self) -> SimulationResult:
        cols = list(zip(*self.ev, strict=True))
        dev = np.asarray(cols[0], dtype=np.int64)
        kind = np.asarray(cols[1], dtype=np.int64)
        start = np.asarray(cols[4], dtype=float)
        end = np.asarray(cols[5], dtype=float)
        minibatch = np.asarray(cols[3], dtype=np.int64)
        done = np.zeros(self.N)
        np.maximum.at(done, minibatch, end)  # each minibatch ends with its last operation
        lo, hi = steady_window(
            self.schedule, devices=len(self.devices), microbatches=self.M, minibatches=self.N
        )
        if self.schedule is Schedule.PIPEDREAM:
            lo, hi = _whole_periods(done, lo, hi)
        w0, w1 = (0.0, float(done[0])) if hi == 0 else (float(done[lo]), float(done[hi]))
        minibatch_s = (w1 - w0) / max(hi - lo, 1)
        span = max(w1 - w0, 1e-300)
        clipped = np.clip(end, w0, w1) - np.clip(start, w0, w1)
        ndev = len(self.devices)
        busy = np.isin(kind, _COMPUTE)
        compute = np.bincount(dev[busy], clipped[busy], minlength=ndev) / span
        reduce = np.bincount(dev[kind == _AR], clipped[kind == _AR], minlength=ndev) / span
        peaks = [max(v) for v in self.mem_v]
        devices = tuple(
            DeviceStats(
                rank=rank,
                stage=s,
                replica=r,
                compute_fraction=float(compute[d]),
                allreduce_fraction=float(reduce[d]),
                idle_fraction=float(max(0.0, 1.0 - compute[d] - reduce[d])),
                peak_memory_bytes=float(peaks[d]),
                stages=self.stages_of[d],
            )
            for d, (rank, s, r) in enumerate(self.devices)
        )
        links = []
        for (src, dst), spans in self.link_busy.items():
            busy = np.asarray(spans)
            used = float(np.sum(np.clip(busy[:, 1], w0, w1) - np.clip(busy[:, 0], w0, w1)))
            links.append(
                LinkStats(
                    src=src,
                    dst=dst,
                    level=self.topology.link_level(src, dst) if self.topology else 0,
                    busy_fraction=used / span,
                )
            )
        links.sort(key=lambda link: (-link.busy_fraction, link.src, link.dst))
        busiest: dict[int, float] = {}
        for stats in devices:
            busiest[stats.stage] = max(
                busiest.get(stats.stage, 0.0), stats.compute_fraction + stats.allreduce_fraction
            )
        critical = max(busiest, key=lambda s: (round(busiest[s], 6), self._stage_time(s)))
        ranks = np.asarray([rank for rank, _, _ in self.devices], dtype=np.int64)
        stage = np.asarray([s for _, s, _ in self.devices], dtype=np.int64)
        replica = np.asarray([r for _, _, r in self.devices], dtype=np.int64)
        events = pd.DataFrame(
            {
                "rank": ranks[dev],
                "stage": np.asarray(cols[8], dtype=np.int64),
                "replica": replica[dev],
                "kind": pd.Categorical.from_codes(kind, categories=list(EVENT_KINDS)),
                "microbatch": np.asarray(cols[2], dtype=np.int64),
                "minibatch": minibatch,
                "start_s": start,
                "end_s": end,
                "peer": np.asarray(cols[6], dtype=np.int64),
                "bytes": np.asarray(cols[7], dtype=float),
            }
        ).sort_values(["start_s", "rank"], kind="stable", ignore_index=True)
        sizes = [len(t) for t in self.mem_t]
        memory = pd.DataFrame(
            {
                "rank": np.repeat(ranks, sizes),
                "stage": np.repeat(stage, sizes),
                "time_s": np.concatenate([np.asarray(t) for t in self.mem_t]),
                "bytes": np.concatenate([np.asarray(v) for v in self.mem_v]),
            }
        )
        samples = self.M * self.mb_size
        return SimulationResult(
            schedule=self.schedule,
            microbatches=self.M,
            minibatches=self.N,
            samples_per_minibatch=samples,
            minibatch_s=minibatch_s,
            first_minibatch_s=float(done[0]),
            makespan_s=float(end.max()),
            samples_per_s=samples / minibatch_s if minibatch_s > 0 else math.inf,
            window_s=(w0, w1),
            critical_stage=critical,
            devices=devices,
            links=tuple(links),
            memory_limit_bytes=None if self.topology is None else self.topology.memory_bytes,
            events=events,
            memory=memory,
            chunks=self.chunks,
        )

    def _stage_time(self, s: int) -> float:
        st = self.stages[s]
        return (st.forward_s + st.backward_s) / len(st.ranks)
