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

Today's schedules (:class:`planner.schedules.Schedule`) run on virtual stages:
``interleaved-1f1b`` and ``zbv`` put several stages (chunks) on one rank, as
:func:`planner.rank_schedules.stage_ranks` lays them out, and walk
:func:`planner.rank_schedules.rank_orders` (torch's orders); a transfer between two stages of one
rank is free. ``zb-h1`` and ``zbv`` split each backward into B (input gradient: it sends the
gradient upstream and frees the activations) and W (weight gradient,
:attr:`SimStage.backward_weight_s`), which needs only its own B. On equal stages the simulated
bubbles are the closed forms: 1F1B ``(p - 1)(F + B)``, interleaved ``(p - 1)/(v M)`` of the
compute, ZB-H1 ``(p - 1)(F + B - W)``, ZBV none in the steady state for ``F = B = W`` and
``M >= 2p - 1`` (tests/test_simulate.py).

What is not modelled: compute and communication overlap perfectly (sends use no compute time),
the all-reduce does not share links with activation transfers, the optimizer step takes no time,
and data loading is free. Links are full duplex, as the topology's per-direction bandwidths say;
the optimizer's cost model charges activations and their gradients to one link, so a plan bound
by its transfers can simulate faster than predicted. Under ``zb-h1``/``zbv`` a microbatch keeps
:attr:`SimStage.weight_held_bytes` from its B to its W (:func:`virtual_stages` counts the inputs
of the layers with parameters); the closed forms' "1F1B memory" counts F to B only.

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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from planner.errors import PlanError
from planner.plan import Plan
from planner.profile.format import Profile
from planner.rank_schedules import check_schedule, stage_ranks
from planner.schedules import PER_STAGE_SCHEDULES, RANK_SCHEDULES, Schedule
from planner.simulate_costs import (
    DEFAULT_CASES,
    compare_schedules,
    plan_stages,
    ring_allreduce_s,
    virtual_stages,
)
from planner.topology import Topology

__all__ = [
    "COMPUTE_KINDS",
    "DEFAULT_CASES",
    "EVENT_COLUMNS",
    "EVENT_KINDS",
    "DeviceStats",
    "LinkStats",
    "SimStage",
    "SimulationResult",
    "compare_schedules",
    "default_minibatches",
    "plan_stages",
    "ring_allreduce_s",
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
    "update",
)
COMPUTE_KINDS = ("forward", "backward", "backward_input", "backward_weight", "update")
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
        weight_held_bytes: Of ``activation_bytes``, what a split backward keeps from a
            microbatch's B to its W (the inputs of the weight gradients); the rest is freed at
            the B. Ignored by schedules that do not split the backward.
        update_s: One optimizer step of the stage's parameters on one replica, seconds; after
            each all-reduce (or where one would be: once per minibatch, ``pipedream`` once per
            round of one microbatch on each replica).
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
    weight_held_bytes: float = 0.0
    update_s: float = 0.0

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
            "weight_held_bytes",
            "update_s",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise PlanError(f"stage {name} must be finite and >= 0, got {value!r}")
        if self.weight_held_bytes > self.activation_bytes:
            raise PlanError(
                f"stage weight_held_bytes {self.weight_held_bytes!r} exceeds activation_bytes "
                f"{self.activation_bytes!r}; W keeps part of what the forward saved"
            )
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

    schedule: Schedule
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
            f"({self.samples_per_minibatch} samples), schedule {self.schedule}"
            + (f", {self.chunks} chunks per rank" if self.chunks > 1 else ""),
            f"time per minibatch {self.minibatch_s * 1e3:.2f} ms (first {self.first_minibatch_s * 1e3:.2f} ms), "
            f"{self.samples_per_s:.1f} samples/s, critical stage {self.critical_stage}",
            "rank  stage  replica  compute  allreduce  idle (bubble)  peak memory GiB",
        ]
        for d in self.devices:  # several chunks: the rank's first stage
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


def default_minibatches(schedule: Schedule, *, devices: int, microbatches: int) -> int:
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
    schedule: Schedule, *, devices: int, microbatches: int, minibatches: int
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
        chunks=plan.chunks,
    )


def simulate_stages(
    stages: Sequence[SimStage],
    *,
    schedule: Schedule,
    microbatches: int,
    minibatches: int | None = None,
    topology: Topology | None = None,
    microbatch_size: int = 1,
    chunks: int = 1,
) -> SimulationResult:
    """Simulate a pipeline given as plain per-stage costs; see the module docstring.

    Under ``interleaved-1f1b``, ``zb-h1`` and ``zbv`` (:class:`Schedule`) the
    ``stages`` are the ``p x chunks`` virtual stages in pipeline order, one rank each, placed as
    :func:`planner.rank_schedules.stage_ranks` says (stage ``s`` on the rank of stage ``s % p`` for
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
            (:func:`planner.rank_schedules.check_schedule`).
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
    if schedule in RANK_SCHEDULES:
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
    if schedule in PER_STAGE_SCHEDULES and len(set(ranks)) != len(ranks):
        raise PlanError(f"ranks {ranks} repeat; give each replica its own rank")
    if topology is not None and max(ranks) >= topology.num_devices:
        raise PlanError(
            f"rank {max(ranks)} is outside the topology's {topology.num_devices} devices"
        )
    from planner.simulate_engine import Engine  # it reads this module's dataclasses

    engine = Engine(stages, schedule, microbatches, minibatches, topology, microbatch_size, chunks)
    return engine.run()


def _check_layout(stages: Sequence[SimStage], schedule: Schedule, chunks: int) -> None:
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
