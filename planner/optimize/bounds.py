"""A lower bound on the best plan over every downset chain, and the certificate a plan records.

The DP searches a bounded state space on branchy graphs (:mod:`planner.optimize.states`), so its
answer is optimal for that space, not necessarily over all partitions. :func:`lower_bound` is a
relaxation that no partition (any chain of downsets, any replicas, any placement) can beat, and
:func:`certify` records the relative gap ``(value - bound) / bound`` in the partition: 0 means
proven optimal.

The relaxation (``planner`` cost model; ``W`` total compute, ``P`` parameter bytes, ``N`` devices,
``M`` microbatches; ``f(m) = 1 / share(m)`` the microbatches per unit time ``m`` replicas
retire: ``m`` for ``pipedream``, ``M / ceil(M / m)`` for ``1f1b``/``gpipe``):

* **One stage** (``S = 1``) is scored exactly: every replica count the options allow whose
  stage fits in memory, with the all-reduce at the cheapest level ``m`` devices can span.
* **Two or more stages.** Links only ever raise a stage's time (they overlap compute in a max),
  memory only removes plans, so both are dropped. Layers may be split fractionally, so what is
  left of a stage is its compute ``C`` and its parameters, which are at least ``g(C)``: the
  fewest parameter bytes any set of layers with compute ``C`` can hold (fractional knapsack:
  layers by parameters per second, cheapest first). For every ``S``:

  - some stage has ``C / m >= W / N`` (the devices do all the work), so the slowest stage is at
    least ``W / N`` (with ``m = 1``; a replicated stage is no faster per device);
  - the largest stage has ``C >= W / S`` on some ``m <= N - S + 1`` replicas: its time is at
    least ``W / (S f(m))``, its all-reduce at least ``A(m, g(W / S))``, and for
    ``pipedream`` its time is ``(C + A) / m``;
  - the stage holding the most expensive layer is at least ``C_max / f(N - S + 1)``;

  and the objective is minimised over ``S`` and ``m``: ``(M + S - 1) T + Z`` for flushed
  schedules, ``T`` for ``pipedream``.
* **Small stages hold little compute** (flushed schedules, any device count): with the slowest
  stage at ``t``, stages on at most ``μ`` replicas hold at most ``t f(μ)`` each, so the larger
  ones hold the rest of the compute and at least its fewest parameters, one of them ``1 / S`` of
  those, reduced at no less than ``a(μ + 1)`` per byte: a largest all-reduce that grows as ``t``
  shrinks, traded against ``(M + S - 1) t`` (:func:`_split_allreduce`). This is what prices
  many stages against large all-reduces on a thousand devices.
* **Sharing the all-reduce** (flushed schedules, up to 128 devices). Every replica vector
  ``m_1..m_S`` gives at least ``(M + S - 1) W / sum f(m_s)`` plus ``P / sum 1 / a(m_s)`` (``a`` the
  all-reduce seconds per byte: however the parameters split, some stage reduces its share that
  slowly). Vectors with a single-replica stage only get the first term; for the others a line
  ``F + λ H <= Φ(λ)`` over all vectors (a DP over devices) bounds both sums at once
  (:func:`_shared_allreduce`). This is what catches "replicate everything 32 ways" at 64 devices.
* **The ``pipedream`` cost model** (PipeDream's formulas, hierarchical): ``W / N``; every device
  retires at most its share of the compute.

It is exact for a single layer (one stage), and close when the work divides evenly; it is loose
where the optimum is limited by things it drops (cut sizes larger than compute, memory, how
parameters and compute sit together in layers).

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> from planner.topology import Topology
    >>> from planner.optimize.cost import CostModel
    >>> la = [LayerProfile(name=f"l{i}", op="", forward_ms=1, backward_ms=1, output_bytes=(0,),
    ...                    parameter_bytes=0, inputs=(i - 1,) if i else ()) for i in range(4)]
    >>> c = CostModel(Profile(model="m", batch_size=1, layers=tuple(la)), Topology.from_args(gpus=2))
    >>> lower_bound(c)  # 8 ms of work on 2 devices
    0.004
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from planner.optimize.cost import CostModel, CostModelKind, SolverOptions
from planner.optimize.result import Partition
from planner.profile.format import Profile
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Topology

__all__ = ["certify", "certify_plan", "gap_of", "lower_bound"]

#: Relative slack under which a plan counts as meeting its bound (float rounding).
TIGHT = 1e-9


def lower_bound(cost: CostModel) -> float:
    """A value no partition of ``cost``'s profile on its topology can beat (module docstring).

    Returns ``inf`` when nothing can fit (no stage count survives), never more than the optimum.
    """
    o = cost.options
    compute = np.asarray(cost.compute_s, dtype=float)
    work = float(compute.sum())
    devices = cost.topology.num_devices
    if work <= 0:
        return 0.0
    if o.cost_model is CostModelKind.PIPEDREAM:
        return work / devices
    one = _one_stage(cost)
    layers = cost.num_layers
    most_stages = min(devices, layers)
    if most_stages < 2:
        return one
    return min(one, _many_stages(cost, work, float(compute.max()), most_stages))


def gap_of(value: float, bound: float) -> float:
    """Relative gap ``(value - bound) / bound``, 0.0 within rounding, inf without a bound."""
    if not math.isfinite(value):
        return math.inf
    if bound <= 0:
        return 0.0 if value <= 0 else math.inf
    gap = (value - bound) / bound
    return 0.0 if gap <= TIGHT else gap


def certify(partition: Partition, cost: CostModel, *, complete: bool = False) -> Partition:
    """The partition with ``gap`` set and ``optimal`` true when proven.

    Args:
        partition: A solver's answer for ``cost``.
        cost: Its cost model.
        complete: The solver searched every downset chain exactly (a complete state space), so
            its answer is optimal whatever the gap.
    """
    gap = gap_of(partition.objective_s, lower_bound(cost))
    optimal = (partition.optimal and complete) or gap == 0.0
    return dataclasses.replace(partition, gap=gap, optimal=optimal)


def certify_plan(
    partition: Partition,
    profile: Profile,
    topology: Topology,
    *,
    optimizer: OptimizerKind | str = OptimizerKind.SGD,
    straight: bool = False,
    recompute: bool = False,
    memory_constraint: bool = True,
    allow_fewer_devices: bool = True,
) -> Partition:
    """:func:`certify` for a solver's answer on ``profile`` (at the microbatch size).

    The cost model is rebuilt from the partition (schedule, microbatches, cost model) and these
    options; the search counts as complete when the DP's state space for this graph is
    (:attr:`~planner.optimize.states.StateSpace.complete`). Under the ``pipedream`` cost model on
    a graph whose antichain DAG is too large, the note says the bounded space was searched.
    """
    from planner.optimize.states import build_states

    kind = CostModelKind(partition.cost_model)
    cost = CostModel(
        profile,
        topology,
        SolverOptions(
            schedule=partition.schedule,
            microbatches=partition.microbatches,
            optimizer=OptimizerKind(optimizer),
            straight=straight,
            recompute=recompute,
            memory_constraint=memory_constraint,
            allow_fewer_devices=allow_fewer_devices,
            cost_model=kind,
        ),
    )
    space = build_states(profile, "antichain" if kind is CostModelKind.PIPEDREAM else "auto")
    complete = space.complete
    if space.kind == "antichain" and len(topology.levels) == 1:
        # PipeDream's one-level DP is exact over its antichain space; that space is complete
        # when it holds every downset (e.g. a chain such as VGG16)
        every = build_states(profile, "auto")
        complete = every.complete and len(every) == len(space)
    certified = certify(partition, cost, complete=complete)
    if space.kind == "antichain-bounded":
        note = (
            "PipeDream's antichain space is too large for this graph (its optimizer does not "
            f"finish); planned over a bounded space of {len(space)} states instead, with "
            "PipeDream's formulas"
        )
        certified = dataclasses.replace(
            certified, note=f"{certified.note}; {note}" if certified.note else note
        )
    return certified


# --- the pieces -------------------------------------------------------------------------------


def _capacity(schedule: Schedule, microbatches: int, replicas: np.ndarray) -> np.ndarray:
    """``f(m)``: 1 / the replica share of each replica count."""
    m = replicas.astype(float)
    if schedule is Schedule.PIPEDREAM:
        return m
    return microbatches / np.ceil(microbatches / m)


def _allreduce_floor(cost: CostModel, replicas: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """The least ring all-reduce of ``nbytes`` among ``replicas`` at any level they can span.

    ``m`` distinct devices span at least the innermost level whose unit holds ``m`` devices, and
    possibly any level outside it (whichever is cheapest counts).
    """
    topo = cost.topology
    m = np.asarray(replicas, dtype=float)
    nb = np.asarray(nbytes, dtype=float)
    top = len(topo.levels) - 1
    first = np.full(m.shape, top)
    for level in range(top - 1, -1, -1):
        first = np.where(m <= topo.block_size(level), level, first)
    best = np.full(np.broadcast(m, nb).shape, np.inf)
    steps = 2.0 * (m - 1.0)
    for level, lv in enumerate(topo.levels):
        value = np.where(
            (m > 1) & (nb > 0),
            steps / np.maximum(m, 1.0) * nb / lv.ring_bandwidth_bytes_per_s
            + steps * lv.ring_latency_s,
            0.0,
        )
        best = np.where(level >= first, np.minimum(best, value), best)
    return best


def _param_floor(cost: CostModel):
    """``g``: the fewest parameter bytes a set of layers with the given compute can hold."""
    c = np.asarray(cost.compute_s, dtype=float)
    p = np.asarray(cost.parameter_bytes, dtype=float)
    keep = c > 0
    c, p = c[keep], p[keep]
    order = np.argsort(p / c, kind="stable")
    xs = np.concatenate([[0.0], np.cumsum(c[order])])
    ys = np.concatenate([[0.0], np.cumsum(p[order])])

    def g(x: np.ndarray) -> np.ndarray:
        # piecewise linear and convex; rounding down keeps it a floor
        return np.maximum(np.interp(x, xs, ys) * (1 - 1e-12), 0.0)

    return g


def _one_stage(cost: CostModel) -> float:
    """The best single-stage plan, scored exactly (all-reduce at its cheapest possible level)."""
    o = cost.options
    devices = cost.topology.num_devices
    work = float(np.sum(cost.compute_s))
    most = 1 if o.straight else devices
    beyond = math.inf  # replica counts past _MAX_REPLICAS: bounded, not enumerated
    if most > _MAX_REPLICAS:
        # pipedream: (W + A) / m >= W / N; flushed: M W ceil(M/m)/M >= W max(M / N, 1)
        beyond = (
            work / devices
            if o.schedule is Schedule.PIPEDREAM
            else work * max(o.microbatches / devices, 1.0)
        )
        most = _MAX_REPLICAS
    reps = np.arange(1, most + 1)
    if not o.allow_fewer_devices:  # one stage then runs on every device
        reps = reps[reps == devices]
        if not len(reps):
            return beyond if devices > most else math.inf
    params = float(np.sum(cost.parameter_bytes))
    ar = _allreduce_floor(cost, reps, np.full(len(reps), params))
    share = 1.0 / _capacity(o.schedule, o.microbatches, reps)
    if o.schedule is Schedule.PIPEDREAM:
        values = (work + ar) * share
    else:
        values = o.microbatches * work * share + ar
    if o.memory_constraint:
        fits = np.array(
            [
                cost.stage_memory_bytes(
                    parameter_bytes=params,
                    buffer_bytes=float(np.sum(cost.buffer_bytes)),
                    saved_bytes=float(np.sum(cost.saved_bytes)),
                    input_bytes=0.0,
                    replicas=int(m),
                    devices_from_here=int(m),
                )
                <= cost.memory_limit_bytes
                for m in reps
            ]
        )
        values = np.where(fits, values, np.inf)
    return min(float(values.min()), beyond)


def _many_stages(cost: CostModel, work: float, heaviest: float, most_stages: int) -> float:
    """The relaxation's best value over two or more stages (module docstring)."""
    o = cost.options
    devices = cost.topology.num_devices
    g = _param_floor(cost)
    stages = np.arange(2, most_stages + 1)  # (S,)
    room = devices - stages + 1  # most replicas one stage can have
    if o.straight:
        room = np.ones_like(room)
    # replica counts past the cap are bounded in one column (below), not enumerated
    reps = np.arange(1, min(int(room.max()), _MAX_REPLICAS) + 1)  # (m,)
    ok = reps[None, :] <= room[:, None]  # (S, m)
    cap = _capacity(o.schedule, o.microbatches, reps)  # (m,)
    largest = work / stages  # compute of the largest stage is at least this
    params = g(largest)  # (S,)
    ar = _allreduce_floor(
        cost, np.broadcast_to(reps[None, :], ok.shape), np.broadcast_to(params[:, None], ok.shape)
    )  # (S, m)
    cap_room = _capacity(o.schedule, o.microbatches, room)  # (S,)
    floor_t = np.maximum(work / devices, heaviest / cap_room)  # (S,)
    if o.schedule is Schedule.PIPEDREAM:
        t_big = (largest[:, None] + ar) / reps[None, :]  # (S, m)
        value = np.maximum(floor_t[:, None], t_big)
    else:
        t_big = largest[:, None] / cap[None, :]
        t = np.maximum(floor_t[:, None], t_big)
        value = (o.microbatches + stages[:, None] - 1) * t + ar
    per_stages = np.where(ok, value, np.inf).min(axis=1)  # (S,)
    many = room > _MAX_REPLICAS
    if many.any():  # m > cap: time >= largest / min(m, M) >= largest / min(room, M), Z >= 0
        top = room.astype(float)
        if o.schedule is not Schedule.PIPEDREAM:
            top = np.minimum(top, float(o.microbatches))
        t = np.maximum(floor_t, largest / top)
        past = t if o.schedule is Schedule.PIPEDREAM else (o.microbatches + stages - 1) * t
        per_stages = np.where(many, np.minimum(per_stages, past), per_stages)
    if o.schedule is not Schedule.PIPEDREAM and not o.straight:
        per_stages = np.maximum(per_stages, _split_allreduce(cost, work, stages, floor_t))
        if devices <= _SHARED_MAX_DEVICES:
            per_stages = np.maximum(per_stages, _shared_allreduce(cost, work, stages, devices))
    return float(per_stages.min())


#: Points per stage count on which :func:`_split_allreduce` minimises over the slowest stage.
_SPLIT_GRID = 33


def _split_allreduce(
    cost: CostModel, work: float, stages: np.ndarray, floor_t: np.ndarray
) -> np.ndarray:
    """Per stage count ``S`` (flushed schedules): a bound from the compute small stages can hold.

    In a plan whose slowest stage takes ``t``, a stage on ``m <= μ`` replicas holds compute at
    most ``t f(μ)``, so the stages on more than ``μ`` replicas hold at least
    ``W - S t f(μ)`` of it, hence at least ``g`` of that in parameters (``g`` as in
    :func:`_param_floor`), and one of these at most ``S`` stages holds ``1 / S`` of those and
    reduces them at ``a(μ + 1)`` seconds per byte or more (``a`` grows with replicas, latency left
    out). So the largest all-reduce is at least ``Z(t) = max over μ of a(μ + 1) g(W - S t f(μ)) / S``
    and the objective at least ``(M + S - 1) t + Z(t)``, minimised over ``t >= floor_t(S)`` on a
    grid (``Z`` falls with ``t``: each interval counts with its left end in the first term and its
    right end in the second; past ``t_end = floor_t + Z(floor_t) / (M + S - 1)`` the first term
    alone is larger than at ``floor_t``). ``μ`` runs over powers of two and the levels' unit sizes.
    """
    o = cost.options
    devices = cost.topology.num_devices
    slots = (o.microbatches + stages - 1).astype(float)  # (S,)
    if float(np.sum(cost.parameter_bytes)) <= 0 or devices < 2:
        return slots * floor_t
    g = _param_floor(cost)
    powers = 2 ** np.arange(int(math.log2(devices - 1)) + 1) if devices > 2 else np.array([1])
    units = [cost.topology.block_size(lv) for lv in range(len(cost.topology.levels) - 1)]
    mus = np.unique(np.concatenate([powers, units]).astype(np.int64))
    mus = mus[(mus >= 1) & (mus < devices)]
    per_byte = _allreduce_per_byte(cost, mus + 1)  # (U,)
    cap = _capacity(o.schedule, o.microbatches, mus)  # (U,)
    count = stages.astype(float)[:, None, None]

    def least_allreduce(t: np.ndarray) -> np.ndarray:  # t: (S, K) -> (S, K)
        cross = np.maximum(work - count * t[:, :, None] * cap[None, None, :], 0.0)
        return np.max(per_byte[None, None, :] * g(cross) / count, axis=2)

    start = floor_t.astype(float)
    first = least_allreduce(start[:, None])[:, 0]
    end = start + first / slots
    steps = np.linspace(0.0, 1.0, _SPLIT_GRID)[None, :]
    grid = start[:, None] + (end - start)[:, None] * steps  # (S, K)
    z = least_allreduce(grid)
    intervals = slots[:, None] * grid[:, :-1] + z[:, 1:]
    return np.minimum(np.min(intervals, axis=1), slots * end)


#: Replica counts enumerated per stage; larger ones are bounded together (absurd device counts).
_MAX_REPLICAS = 1024

#: The all-reduce sharing bound (a DP over devices) is computed up to this many devices.
_SHARED_MAX_DEVICES = 128


def _shared_allreduce(cost: CostModel, work: float, stages: np.ndarray, devices: int) -> np.ndarray:
    """Per stage count ``S``: a bound from how the parameters share out among the stages.

    Replicas ``m_s`` give a flushed pipeline at least ``(M + S - 1) W / F`` with
    ``F = sum f(m_s)``, and a largest all-reduce of at least ``P / H`` with ``H = sum 1 / a(m_s)``
    (``a(m)`` the all-reduce seconds per byte; the parameters, however split, leave some stage
    with ``a(m_s) P_s >= P / H``). A plan with a single-replica stage may have ``H`` unbounded,
    so it is only bounded by ``(M + S - 1) W / max F``. Otherwise, for every ``λ > 0``,
    ``F + λ H <= Φ(λ) = max over vectors of sum (f(m) + λ / a(m))`` (a DP over devices), and
    minimising ``α / F + P / H`` under that line gives ``(sqrt(α) + sqrt(λ P))^2 / Φ(λ)`` with
    ``α = (M + S - 1) W``; the best ``λ`` of a grid counts.
    """
    o = cost.options
    total_params = float(np.sum(cost.parameter_bytes))
    reps = np.arange(1, devices + 1)
    f = _capacity(o.schedule, o.microbatches, reps)
    per_byte = _allreduce_per_byte(cost, reps)  # latency left out: still a lower bound
    alpha = (o.microbatches + stages - 1) * work  # (S,)
    most = int(stages.max())
    # best F of a vector with a single-replica stage: that stage, then S - 1 on N - 1 devices
    rest = _max_sum(f[: devices - 1], most - 1, devices - 1)
    with_single = alpha / np.maximum(f[0] + rest[stages - 1], 1e-300)
    if total_params <= 0:  # no all-reduce anywhere: the best F of any vector
        return alpha / np.maximum(_max_sum(f, most, devices)[stages], 1e-300)
    inv_a = np.where(reps >= 2, 1.0 / np.maximum(per_byte, 1e-300), -np.inf)
    scale = float(np.max(f)) / float(np.max(inv_a[reps >= 2])) if devices >= 2 else 1.0
    without = np.zeros(len(stages))
    for lam in scale * np.logspace(-3, 3, 25):
        values = np.where(reps >= 2, f + lam * inv_a, -np.inf)
        phi = _max_sum(values, most, devices)[stages]  # (S,)
        bound = (np.sqrt(alpha) + np.sqrt(lam * total_params)) ** 2 / phi
        without = np.maximum(without, np.where(np.isfinite(phi) & (phi > 0), bound, np.inf))
    return np.minimum(with_single, without)


def _allreduce_per_byte(cost: CostModel, replicas: np.ndarray) -> np.ndarray:
    """``a(m)``: the least ring all-reduce seconds per parameter byte among ``m`` replicas."""
    topo = cost.topology
    m = replicas.astype(float)
    top = len(topo.levels) - 1
    first = np.full(m.shape, top)
    for level in range(top - 1, -1, -1):
        first = np.where(m <= topo.block_size(level), level, first)
    best = np.full(m.shape, np.inf)
    for level, lv in enumerate(topo.levels):
        value = 2.0 * (m - 1.0) / m / lv.ring_bandwidth_bytes_per_s
        best = np.where(level >= first, np.minimum(best, value), best)
    return best


def _max_sum(values: np.ndarray, most: int, devices: int) -> np.ndarray:
    """``out[s]``: the largest ``sum values[m_i - 1]`` over ``s`` parts with ``sum m_i <= devices``.

    ``-inf`` entries are replica counts not allowed.
    """
    best = np.full(devices + 1, -np.inf)
    best[0] = 0.0  # best[d]: s parts on exactly d devices
    out = np.full(most + 1, -np.inf)
    out[0] = 0.0
    d = np.arange(devices + 1)
    for s in range(1, most + 1):
        # new[d] = max over m of best[d - m] + values[m - 1]
        m = d[:, None] - d[None, :]  # (d, d'): replicas m = d - d'
        gain = np.where((m >= 1), values[np.clip(m, 1, devices) - 1], -np.inf)
        best = np.max(best[None, :] + gain, axis=1)
        out[s] = float(best.max())
    return out
