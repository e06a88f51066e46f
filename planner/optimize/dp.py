"""PipeDream's dynamic program over DAG states, hierarchical over topology levels, vectorised.

PipeDream's recurrence (SOSP'19 §3.1): the best pipeline over a prefix on ``m`` devices is the
best split into a shorter pipeline on ``m - m'`` devices followed by one stage replicated ``m'``
times; the objective is the slowest stage. Here a "prefix" is a downset of the layer DAG (see
:mod:`planner.optimize.states`), and the program runs over suffixes instead of prefixes, so that
each stage knows how many devices run it and every later stage: that is what sets its microbatches
in flight, hence its memory (:func:`planner.optimize.cost.in_flight`).

``V[k, d]`` is the best slowest-stage time of a pipeline covering every layer outside ``D_k`` on
exactly ``d`` devices; ``V[k, d] = min over D_j ⊋ D_k, m' <= d`` of
``max(t(k -> j, m'), V[j, d - m'])`` over stages that fit in memory. For ``1f1b``/``gpipe`` a
third index counts the stages (the bubble is ``S - 1`` slots) and the largest gradient all-reduce
is capped and lowered until it no longer pays (the objective is ``(M + S - 1) x slowest + largest
all-reduce``; :func:`planner.optimize.cost.schedule_objective`).

Speed: each state's row is one batch of numpy operations over (next state, replicas, devices);
and the search is *bounded*: for a trial bound ``T`` on the slowest stage, a stage needs at least
``compute / T`` devices, so the devices a suffix can use lie in a narrow window
``[work after / T, N - work before / T]``. Cells outside it and candidates slower than ``T`` are
never built. Trial bounds start at 1.1 x the perfect-balance bound ``total work / N`` and grow by 1.1x
until a plan is found; since every pruned candidate is slower than ``T`` and a plan at most ``T``
exists, the result is exactly optimal.

Multi-level topologies follow PipeDream's hierarchy (:mod:`planner.optimize.hierarchy`): the
innermost level's best sub-pipelines become the stages of the next level.

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> from planner.topology import Topology
    >>> from planner.optimize.cost import CostModel
    >>> # the last layer holds 1 GB of weights: replicating it costs more than it saves
    >>> layers = tuple(
    ...     LayerProfile(name=f"l{i}", op="", forward_ms=t, backward_ms=2 * t, output_bytes=(0,),
    ...                  parameter_bytes=p, inputs=(i - 1,) if i else ())
    ...     for i, (t, p) in enumerate([(1.0, 0), (1.0, 0), (2.0, 0), (4.0, 10**9)]))
    >>> part = solve(CostModel(Profile(model="m", batch_size=1, layers=layers),
    ...                        Topology.from_args(gpus=3)))
    >>> [s.layers for s in part.stages], [s.replicas for s in part.stages], part.bottleneck_s
    ([(0, 1, 2), (3,)], [1, 1], 0.012)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.errors import InfeasibleError
from planner.optimize.cost import (
    OPTIMIZER_STATE_FACTOR,
    CostModel,
    CostModelKind,
    DownsetTables,
    in_flight,
)
from planner.optimize.result import Partition
from planner.optimize.states import StateSpace, build_states
from planner.schedules import Schedule

__all__ = ["flight_table", "search", "solve", "solve_flat"]

_REL = 1e-9  # relative slack for float comparisons against trial bounds


def solve(cost: CostModel, *, states: StateSpace | None = None) -> Partition:
    """The best partition for ``cost`` (its profile, topology and options).

    Args:
        cost: The cost model; its options select schedule, memory constraint, cost model, ...
        states: A state space to search; default :func:`build_states` of ``options.state_space``
            (``auto``, or PipeDream's antichains for the ``pipedream`` cost model).

    Raises:
        InfeasibleError: No partition fits in memory; the message names what would fit.
    """
    options = cost.options
    if options.cost_model is CostModelKind.PIPEDREAM:
        from planner.optimize.dp_pipedream import solve_pipedream

        kind = "antichain" if options.state_space == "auto" else options.state_space
        return solve_pipedream(cost, states or build_states(cost.profile, kind))
    space = states or build_states(cost.profile, options.state_space)
    if len(cost.topology.levels) == 1:
        return solve_flat(cost, space)
    return _solve_levels(cost, space, explain=True)


def _solve_levels(cost: CostModel, space: StateSpace, *, explain: bool) -> Partition:
    """The hierarchical DP, never worse than a baseline that fits.

    Across levels the DP plans on upper bounds of group costs (:mod:`planner.optimize.hierarchy`),
    so a baseline scored exactly can beat it (e.g. data parallelism, whose ring all-reduce over
    every device costs less than the DP's bound of one ring per level): the fitting baselines are
    candidates too, and the best objective wins.
    """
    from planner.optimize.baselines import baselines
    from planner.optimize.hierarchy import solve_hierarchical

    candidates = [p for p in baselines(cost).values() if p.fits and _allowed(cost, p)]
    try:
        candidates.append(solve_hierarchical(cost, space))
    except InfeasibleError:
        if not candidates:
            if explain:
                raise _infeasible(cost, space) from None
            raise
    return min(candidates, key=lambda p: p.objective_s)


# --- the single-level program ------------------------------------------------------------------


def flight_table(cost: CostModel, devices: int) -> np.ndarray:
    """``F[m, d]``: microbatches in flight per replica for ``m`` replicas, ``d`` devices from here."""
    o = cost.options
    table = np.zeros((devices + 1, devices + 1))
    for m in range(1, devices + 1):
        for d in range(1, devices + 1):
            table[m, d] = in_flight(o.schedule, d, m, o.microbatches)
    return table


@dataclass(frozen=True, kw_only=True)
class _Flat:
    """Everything the single-level kernel reads, as arrays."""

    t: DownsetTables
    succ: list[np.ndarray]
    devices: int
    bandwidth: float
    latency: float
    max_replicas: int
    flights: np.ndarray
    memory_cap: float
    pipedream: bool
    microbatches: int
    optimizer_factor: int
    recompute: bool


def _stage_arrays(f: _Flat, k: int, js: np.ndarray, reps: np.ndarray, sync_cap: float):
    """Time, all-reduce, memory base and per-in-flight memory of stages ``k -> js`` on ``reps``."""
    t = f.t
    c = t.compute_s[js] - t.compute_s[k]
    p = t.parameter_bytes[js] - t.parameter_bytes[k]
    saved = t.saved_bytes[js] - t.saved_bytes[k]
    buffers = t.buffer_bytes[js] - t.buffer_bytes[k]
    m = reps.astype(float)  # (j, r)
    # ring all-reduce, cost.allreduce_s: nothing to reduce (no latency either) without parameters
    ar = np.where(
        (m > 1) & (p[:, None] > 0),
        2 * (m - 1) / m * p[:, None] / f.bandwidth + 2 * (m - 1) * f.latency,
        0.0,
    )
    x_in = t.cut_bytes[k]
    link_in = 2 * (f.latency + x_in / f.bandwidth) if x_in > 0 else 0.0
    x_out = t.cut_bytes[js]
    link_out = np.where(x_out > 0, 2 * (f.latency + x_out / f.bandwidth), 0.0)
    work = c[:, None] + (ar if f.pipedream else 0.0)
    # cost.replica_share: 1 / m in steady state; ceil(M / m) / M on the busiest replica of a flush
    share = 1.0 / m if f.pipedream else (-(-f.microbatches // reps)) / f.microbatches
    time = np.maximum(np.maximum(work, link_in), link_out[:, None]) * share
    if np.isfinite(sync_cap):  # only stages whose all-reduce is below the cap
        time = np.where(ar < sync_cap, time, np.inf)
    # cost.stage_memory_bytes: weights x versions + gradients + optimizer state + buffers + ...
    versions_fixed = 0 if f.pipedream else 1  # pipedream: one version per microbatch in flight
    base = p * (1 + versions_fixed + f.optimizer_factor) + buffers + (saved if f.recompute else 0.0)
    per_flight = (p if f.pipedream else np.zeros_like(p)) + (x_in if f.recompute else saved)
    return time, ar, base, per_flight


def _flat_stage_fn(f: _Flat):
    """Stage costs for the single-level kernel: ``(time (j, r), fits (j, r, d))``."""

    def stage(k, js, reps, ds, sync_cap):
        time, _, base, per_flight = _stage_arrays(f, k, js, reps, sync_cap)
        flights = f.flights[reps[:, :, None], ds[None, None, :]]  # (j, r, d)
        fits = base[:, None, None] + per_flight[:, None, None] * flights <= f.memory_cap
        return time, fits

    return stage


def _kernel(succ, devices, max_replicas, work, stage, bound, count_stages, sync_cap):
    """Fill ``V`` under a trial bound; returns (V, arg_next, arg_reps).

    ``work[k]``: compute of ``D_k`` in seconds of one device (for the pruning window);
    ``stage(k, js, reps, ds, sync_cap)``: for next states ``js``, replica counts ``reps`` (one row
    per next state) and devices-from-here ``ds``, the stage times ``(j, r)`` and whether the stage
    fits in memory ``(j, r, d)``.
    """
    n_states = len(work)
    last = n_states - 1
    n = devices
    stages_dim = n + 1 if count_stages else 1
    value = np.full((n_states, n + 1, stages_dim), np.inf)
    arg_j = np.full((n_states, n + 1, stages_dim), -1, dtype=np.int64)
    arg_m = np.zeros((n_states, n + 1, stages_dim), dtype=np.int64)
    value[last, 0, 0] = 0.0
    total = work[last]
    limit = bound * (1 + _REL)
    if np.isfinite(bound):
        scale = 1.0 / limit
        lo_all = np.ceil((total - work) * scale - _REL).astype(int)
        hi_all = n - np.ceil(work * scale - _REL).astype(int)
    else:
        scale = 0.0
        lo_all = np.zeros(n_states, dtype=int)
        hi_all = np.full(n_states, n)
    # devices the rest after state j may use: none after the last state, else at least one
    lo_rest = np.maximum(lo_all, 1)
    lo_rest[last] = 0
    for k in range(last - 1, -1, -1):
        lo, hi = max(1, lo_all[k]), min(n, hi_all[k])
        js = succ[k]
        if lo > hi or len(js) == 0:
            continue
        # replicas of stage k -> j: enough for its compute within the bound, and leaving the rest
        # after j at least its own minimum
        r_lo = np.maximum(1, np.ceil((work[js] - work[k]) * scale - _REL).astype(int))
        r_hi = np.minimum(max_replicas, hi - lo_rest[js])
        keep = r_lo <= r_hi
        if not keep.any():
            continue
        js, r_lo, r_hi = js[keep], r_lo[keep], r_hi[keep]
        width = int((r_hi - r_lo).max()) + 1
        reps = r_lo[:, None] + np.arange(width)[None, :]  # (j, r)
        r_ok = reps <= r_hi[:, None]
        reps = np.where(r_ok, reps, r_lo[:, None])
        ds = np.arange(lo, hi + 1)
        time, fits = stage(k, js, reps, ds, sync_cap)
        time = np.where(r_ok & (time <= limit), time, np.inf)
        live = np.isfinite(time).any(axis=1)
        if not live.any():
            continue
        js, reps, time, fits = js[live], reps[live], time[live], fits[live]
        rest = ds[None, None, :] - reps[:, :, None]  # (j, r, d): devices left for the rest
        ok = fits & (rest >= 0)
        rest = np.maximum(rest, 0)
        if count_stages:
            nxt = value[js[:, None, None], rest, :-1]  # (j, r, d, c-1)
            cand = np.maximum(time[:, :, None, None], nxt)
            cand = np.where(ok[..., None], cand, np.inf)
            flat3 = cand.reshape(-1, len(ds), stages_dim - 1)
            best = flat3.argmin(axis=0)
            value[k, lo : hi + 1, 1:] = np.take_along_axis(flat3, best[None], axis=0)[0]
            bj, br = np.unravel_index(best, reps.shape)
            arg_j[k, lo : hi + 1, 1:] = js[bj]
            arg_m[k, lo : hi + 1, 1:] = reps[bj, br]
        else:
            nxt = value[js[:, None, None], rest, 0]  # (j, r, d)
            cand = np.where(ok, np.maximum(time[:, :, None], nxt), np.inf)
            flat = cand.reshape(-1, len(ds))
            best = flat.argmin(axis=0)
            value[k, lo : hi + 1, 0] = flat[best, np.arange(len(ds))]
            bj, br = np.unravel_index(best, reps.shape)
            arg_j[k, lo : hi + 1, 0] = js[bj]
            arg_m[k, lo : hi + 1, 0] = reps[bj, br]
    return value, arg_j, arg_m


def _flat_inputs(cost: CostModel, space: StateSpace, level: int, devices: int) -> _Flat:
    o = cost.options
    lv = cost.topology.levels[level]
    tables = DownsetTables.from_masks(cost, space.masks)
    inc = space.includes
    return _Flat(
        t=tables,
        succ=[np.flatnonzero(inc[k]) for k in range(len(space))],
        devices=devices,
        bandwidth=lv.bandwidth_bytes_per_s,
        latency=lv.latency_s,
        max_replicas=1 if o.straight else devices,
        flights=flight_table(cost, devices),
        memory_cap=cost.memory_limit_bytes if o.memory_constraint else np.inf,
        pipedream=o.schedule is Schedule.PIPEDREAM,
        microbatches=o.microbatches,
        optimizer_factor=OPTIMIZER_STATE_FACTOR[o.optimizer],
        recompute=o.recompute,
    )


def _walk(arg_j, arg_m, d: int, c: int) -> list[tuple[int, int, int]]:
    """Stages ``(start state, end state, replicas)`` from the root with ``d`` devices."""
    out, k = [], 0
    while d > 0:
        j, m = int(arg_j[k, d, c]), int(arg_m[k, d, c])
        out.append((k, j, m))
        k, d, c = j, d - m, max(c - 1, 0)
    return out


def _root_choice(
    value: np.ndarray, devices: int, allow_fewer: bool, microbatches: int, count_stages: bool
) -> tuple[float, int, int]:
    """(objective without sync, devices, stage count) at the root, or inf."""
    ds = range(1, devices + 1) if allow_fewer else [devices]
    best = (np.inf, 0, 0)
    for d in ds:
        if count_stages:
            for c in range(1, d + 1):
                v = value[0, d, c]
                if np.isfinite(v) and (microbatches + c - 1) * v < best[0] * (1 - 1e-12):
                    best = ((microbatches + c - 1) * v, d, c)
        elif value[0, d, 0] < best[0] * (1 - 1e-12):
            best = (value[0, d, 0], d, 0)
    return best


def solve_flat(
    cost: CostModel,
    space: StateSpace,
    *,
    level: int = 0,
    devices: int | None = None,
    explain: bool = True,
) -> Partition:
    """Exact DP on one level of the topology (all links and all-reduces at ``level``).

    Example:
        >>> from planner.profile import LayerProfile, Profile
        >>> from planner.topology import Topology
        >>> from planner.optimize.cost import CostModel
        >>> la = [LayerProfile(name=f"l{i}", op="", forward_ms=1, backward_ms=1, output_bytes=(0,),
        ...                    parameter_bytes=0, inputs=(i - 1,) if i else ()) for i in range(4)]
        >>> c = CostModel(Profile(model="m", batch_size=1, layers=tuple(la)), Topology.from_args(gpus=2))
        >>> solve_flat(c, build_states(c.profile)).bottleneck_s
        0.004
    """
    o = cost.options
    n = devices or cost.topology.levels[level].devices
    f = _flat_inputs(cost, space, level, n)
    path = search(
        succ=f.succ,
        devices=n,
        max_replicas=f.max_replicas,
        work=f.t.compute_s,
        stage=_flat_stage_fn(f),
        sync=lambda k, j, m: _sync_of(f, k, j, m),
        options=o,
    )
    if path is None:
        raise _infeasible(cost, space) if explain else InfeasibleError("does not fit")
    stages = [space.stage(k, j).tolist() for k, j, _ in path]
    replicas = [m for _, _, m in path]
    return cost.evaluate(stages, replicas, solver="dp", optimal=True)


def _allowed(cost: CostModel, part: Partition) -> bool:
    """Whether a baseline lies in the plan space the options allow (straight, idle devices)."""
    o = cost.options
    replicas = [s.replicas for s in part.stages]
    if o.straight and max(replicas) > 1:
        return False
    return o.allow_fewer_devices or sum(replicas) == cost.topology.num_devices


def search(
    *, succ, devices, max_replicas, work, stage, sync, options, start_bound: float | None = None
) -> list | None:
    """Bounded search (module docstring): the optimal path ``[(k, j, m'), ...]`` or None.

    ``start_bound``: a value some plan is known to reach (skips the failing small trials).
    """
    count = options.schedule is not Schedule.PIPEDREAM
    total = work[-1]
    bound = total / devices * 1.1 if total > 0 and not count else np.inf
    if start_bound is not None and not count and np.isfinite(start_bound):
        bound = max(bound, start_bound)
    sync_cap = np.inf
    best: tuple[float, list] | None = None
    while True:
        value, arg_j, arg_m = _kernel(
            succ, devices, max_replicas, work, stage, bound, count, sync_cap
        )
        obj, d, c = _root_choice(
            value, devices, options.allow_fewer_devices, options.microbatches, count
        )
        if not np.isfinite(obj):
            if np.isfinite(bound):
                bound *= 1.1  # small steps keep the windows of the successful trial narrow
                if bound > total:  # beyond a one-device plan's time: search everything
                    bound = np.inf
                continue
            break
        path = _walk(arg_j, arg_m, d, c)
        if not count:
            return path
        # 1f1b / gpipe: add the largest all-reduce; lower its cap while that can still pay
        syncs = [sync(k, j, m) for k, j, m in path]
        total_obj = obj + max(syncs)
        if best is None or total_obj < best[0]:
            best = (total_obj, path)
        if max(syncs) <= 0 or obj >= best[0]:
            break
        sync_cap = max(syncs)
    return None if best is None else best[1]


def _sync_of(f: _Flat, k: int, j: int, m: int) -> float:
    _, ar, _, _ = _stage_arrays(f, k, np.array([j]), np.array([[m]]), np.inf)
    return float(ar[0, 0])


# --- explaining infeasibility ------------------------------------------------------------------


def _infeasible(cost: CostModel, space: StateSpace) -> InfeasibleError:
    """An error naming the smallest device count, or the change, that would fit."""
    import dataclasses

    from planner.topology import GIB

    o = cost.options
    n = cost.topology.num_devices
    need = _lightest_stage_bytes(cost)
    lines = [
        f"{cost.profile.model!r} does not fit on {n} device(s) of "
        f"{cost.memory_limit_bytes / GIB:.3g} GiB under schedule {o.schedule}"
        + (" with recomputation" if o.recompute else "")
        + f" and optimizer {o.optimizer}"
    ]
    fixes = []
    trials = []
    if not o.recompute:
        trials.append(("--recompute", dataclasses.replace(o, recompute=True)))
    if o.schedule is Schedule.PIPEDREAM:
        trials.append(("--schedule 1f1b", dataclasses.replace(o, schedule=Schedule.ONE_F_ONE_B)))
    if o.optimizer != "sgd":
        from planner.schedules import OptimizerKind

        trials.append(("--optimizer sgd", dataclasses.replace(o, optimizer=OptimizerKind.SGD)))
    for flag, opts in trials:
        if _fits(CostModel(cost.profile, cost.topology, opts), space):
            fixes.append(flag)
    # more devices of the same machine: one level grows its devices, two levels add nodes
    step = cost.topology.levels[0].devices if len(cost.topology.levels) > 1 else 1

    def grown(devices: int) -> CostModel:
        levels = list(cost.topology.levels)
        levels[-1] = dataclasses.replace(levels[-1], devices=devices // (n // levels[-1].devices))
        return CostModel(cost.profile, dataclasses.replace(cost.topology, levels=tuple(levels)), o)

    for more in (2 * n, 4 * n, 8 * n):
        if _fits(grown(more), space):
            lo, hi = n // step + 1, more // step
            while lo < hi:  # smallest device count that fits, in whole nodes
                mid = (lo + hi) // 2
                if _fits(grown(mid * step), space):
                    hi = mid
                else:
                    lo = mid + 1
            fixes.append(f"--gpus {lo * step}")
            break
    lines.append(
        f"the smallest stage (one layer) needs {need / GIB:.3g} GiB"
        if need > cost.memory_limit_bytes
        else f"the whole model needs {_whole_bytes(cost) / GIB:.3g} GiB on one device"
    )
    if fixes:
        lines.append("it fits with " + ", or with ".join(fixes))
    else:
        lines.append("no single change fits it: use devices with more memory or a smaller batch")
    return InfeasibleError("; ".join(lines))


def _fits(cost: CostModel, space: StateSpace) -> bool:
    """Whether :func:`solve` finds a plan (the same solver and topology shape, no explanation)."""
    try:
        if len(cost.topology.levels) == 1:
            solve_flat(cost, space, explain=False)
        else:
            _solve_levels(cost, space, explain=False)
    except InfeasibleError:
        return False
    return True


def _whole_bytes(cost: CostModel) -> float:
    return cost.stage_memory_bytes(
        parameter_bytes=float(cost.parameter_bytes.sum()),
        buffer_bytes=float(cost.buffer_bytes.sum()),
        saved_bytes=float(cost.saved_bytes.sum()),
        input_bytes=0.0,
        replicas=1,
        devices_from_here=1,
    )


def _lightest_stage_bytes(cost: CostModel) -> float:
    """Memory of the heaviest single layer with one microbatch in flight: a floor for any plan."""
    return max(
        cost.stage_memory_bytes(
            parameter_bytes=float(cost.parameter_bytes[i]),
            buffer_bytes=float(cost.buffer_bytes[i]),
            saved_bytes=float(cost.saved_bytes[i]),
            input_bytes=0.0,
            replicas=1,
            devices_from_here=1,
        )
        for i in range(len(cost.profile))
    )
