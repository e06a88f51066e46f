"""The exact DP for the planner cost model, on any number of topology levels, vectorised.

A plan is a chain of downsets ``∅ = D_0 ⊂ D_1 ⊂ ... ⊂ D_S`` (stage ``s`` is ``D_s \\ D_{s-1}``,
see :mod:`planner.optimize.states`) with stage ``s`` on ``m_s`` *contiguous* ranks, stage after
stage from rank 0 (:func:`~planner.optimize.cost.contiguous_ranks`): the space the ILP and the
brute-force oracle search. Contiguity is what makes the program exact on every topology: the
ranks used so far fix where a stage lies in the hierarchy, hence which level its all-reduce spans
and which levels its boundary links cross.

The program runs over *suffixes* with ``T`` devices used in all: ``V[k, r, v, c]`` is the best
pipeline covering every layer outside ``D_k`` on the last ``r`` ranks ``T - r .. T - 1`` with
``c`` stages (``c`` only for ``1f1b``/``gpipe``, whose bubble is ``S - 1`` slots); its value is
the slowest stage. ``r`` is also what sets a stage's microbatches in flight, hence its memory
(:func:`~planner.optimize.cost.in_flight`).

Links. Between stage ``A`` on ``[a, d)`` and ``B`` on ``[d, e)`` microbatches travel round-robin
over rank pairs; the outermost level they use is the level spanned by ``[a, e)``, which is
``max(α, β)`` with ``α`` = level of ranks ``(a, d)`` (known to ``A``) and ``β`` = level of ranks
``(d - 1, e - 1)`` (known to ``B``). So ``A`` *promises* the level ``ℓ`` its outgoing link is
charged at and the suffix state carries it: ``v = (ℓ, exact)`` where ``exact`` says ``α = ℓ``
(then ``B`` needs ``β <= ℓ``) or ``α < ℓ`` (then ``B`` needs ``β = ℓ``). Each stage then charges
``max(compute (+ all-reduce), link in, link out) x share(m)`` exactly as
:meth:`~planner.optimize.cost.CostModel.evaluate` does. On one level there is one variant.

Objective. ``pipedream``: the slowest stage. ``1f1b``/``gpipe``: ``(M + S - 1) x slowest +
largest all-reduce`` (:func:`~planner.optimize.cost.schedule_objective`): the program minimises
the slowest stage per stage count, and the all-reduce term is handled by capping the stages'
all-reduce strictly below the last plan's largest and solving again until the rest of the
objective alone can no longer improve (each plan found is the best with all-reduces below the
cap; the optimum's largest all-reduce is below every earlier cap).

Speed: the search is *bounded*. For a trial bound ``b`` on the slowest stage, a stage of compute
``C`` needs ``m >= C / b`` devices, so the devices a suffix can use lie in the window
``[work after / b, T - work before / b]`` and only those cells are stored (flat, per state).
``pipedream``: ``b`` starts at 1.1 x the perfect balance ``total work / N`` and grows by 1.1x
until a plan is found; that plan is optimal (every plan not searched has a stage slower than
``b``). ``1f1b``/``gpipe``: a plan of objective ``F`` found under ``b`` is optimal once
``F <= M b`` (a plan with a stage slower than ``b`` costs more than ``M b``); otherwise ``b``
becomes ``F / M`` and one more search certifies it. Stage counts that cannot beat the best
objective found, ``(M + S - 1) x total work / N > F``, are not tracked.

With idle devices allowed, multi-level topologies solve one program per total ``T`` modulo the
devices of one outermost unit (levels only see positions modulo that size), largest first,
skipping totals whose perfect balance cannot beat the best found.

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

import math
from dataclasses import dataclass

import numpy as np

from planner.errors import PlanError
from planner.optimize.cost import OPTIMIZER_STATE_FACTOR, CostModel, CostModelKind, DownsetTables
from planner.optimize.dp_pipedream import solve_pipedream
from planner.optimize.feasibility import check_fits, explain_infeasible
from planner.optimize.result import Partition
from planner.optimize.states import StateSpace, build_states
from planner.schedules import Schedule

__all__ = ["MAX_DEVICES", "search", "solve"]

_REL = 1e-9  # relative slack for float comparisons against trial bounds
_CHUNK_CELLS = 4_000_000  # candidate cells (next state x replicas x devices x ...) per batch
#: Devices the DP plans for at most; beyond, its tables would not fit in memory anyway.
MAX_DEVICES = 65_536
_TABLE_CELLS = 40_000_000  # stored (state, devices, variant, stage count) cells at most


def solve(cost: CostModel, *, states: StateSpace | None = None) -> Partition:
    """The best partition for ``cost`` (its profile, topology and options).

    Args:
        cost: The cost model; its options select schedule, memory constraint, cost model, ...
        states: A state space to search; default :func:`build_states` of ``options.state_space``
            (``auto``, or PipeDream's antichains for the ``pipedream`` cost model).

    Returns:
        The optimum over the state space and contiguous ranks, scored by
        :meth:`CostModel.evaluate` (``solver="dp"``, ``optimal=True``).

    Raises:
        InfeasibleError: No partition fits in memory; the message names what would fit.
    """
    options = cost.options
    if options.cost_model is CostModelKind.PIPEDREAM:
        kind = "antichain" if options.state_space == "auto" else options.state_space
        return solve_pipedream(cost, states or build_states(cost.profile, kind))
    n = cost.topology.num_devices
    if n > MAX_DEVICES:
        raise PlanError(
            f"{n} devices is more than the planner handles ({MAX_DEVICES}); plan one replica "
            f"group of at most {MAX_DEVICES} devices and replicate the whole plan (data "
            "parallelism across groups)"
        )
    check_fits(cost)  # lower bounds first: "does not fit" without any search
    space = states or build_states(cost.profile, options.state_space)
    found = search(cost, space)
    if found is None:
        raise explain_infeasible(cost, lambda c: search(c, space) is not None)
    path, _ = found
    stages = [space.stage(k, j).tolist() for k, j, _ in path]
    replicas = [m for _, _, m in path]
    return cost.evaluate(stages, replicas, solver="dp", optimal=True)


# --- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Problem:
    """Everything the kernel reads, as arrays."""

    t: DownsetTables
    succ: list[np.ndarray]
    devices: int
    blocks: tuple[int, ...]  # devices per unit of every level but the outermost
    bandwidth: np.ndarray  # per level
    latency: np.ndarray
    max_replicas: int
    memory_cap: float
    schedule: Schedule
    microbatches: int
    optimizer_factor: int
    recompute: bool
    allow_fewer: bool

    @property
    def levels(self) -> int:
        return len(self.bandwidth)

    @property
    def pipedream(self) -> bool:
        return self.schedule is Schedule.PIPEDREAM

    @property
    def variants(self) -> int:
        return 1 if self.levels == 1 else 2 * self.levels


def _problem(cost: CostModel, space: StateSpace) -> _Problem:
    o = cost.options
    topo = cost.topology
    n = topo.num_devices
    return _Problem(
        t=DownsetTables.from_masks(cost, space.masks),
        succ=[np.flatnonzero(space.includes[k]) for k in range(len(space))],
        devices=n,
        blocks=tuple(topo.block_size(lv) for lv in range(len(topo.levels) - 1)),
        bandwidth=np.array([lv.bandwidth_bytes_per_s for lv in topo.levels]),
        latency=np.array([lv.latency_s for lv in topo.levels]),
        max_replicas=1 if o.straight else n,
        memory_cap=cost.memory_limit_bytes if o.memory_constraint else np.inf,
        schedule=o.schedule,
        microbatches=o.microbatches,
        optimizer_factor=OPTIMIZER_STATE_FACTOR[o.optimizer],
        recompute=o.recompute,
        allow_fewer=o.allow_fewer_devices,
    )


def _level(x, y, blocks: tuple[int, ...]):
    """Level of the link between ranks ``x != y`` (arrays broadcast): levels whose units differ."""
    out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=np.int64)
    for b in blocks:
        out += (np.asarray(x) // b) != (np.asarray(y) // b)
    return out


def _exact(p: _Problem, level: int) -> int:
    return 0 if p.levels == 1 else 2 * level


def _loose(level: int) -> int:
    return 2 * level + 1


def _link(p: _Problem, nbytes, level: int):
    """cost.link_s at ``level`` (0 without bytes), vectorised over ``nbytes``."""
    nbytes = np.asarray(nbytes, dtype=float)
    return np.where(nbytes > 0, 2 * (p.latency[level] + nbytes / p.bandwidth[level]), 0.0)


def _share(p: _Problem, reps: np.ndarray) -> np.ndarray:
    """cost.replica_share: 1 / m in steady state; ceil(M / m) / M on a flush's busiest replica."""
    if p.pipedream:
        return 1.0 / reps
    return (-(-p.microbatches // reps)) / p.microbatches


def _flights(p: _Problem, reps: np.ndarray, from_here: np.ndarray) -> np.ndarray:
    """cost.in_flight, vectorised (``reps`` and ``from_here`` broadcast)."""
    total = -(-p.microbatches // reps)
    if p.schedule is Schedule.GPIPE:
        return np.broadcast_to(total, np.broadcast_shapes(reps.shape, from_here.shape))
    depth = -(-from_here // reps)
    return np.minimum(depth, total) if p.schedule is Schedule.ONE_F_ONE_B else depth


def _allreduce(p: _Problem, params: np.ndarray, reps: np.ndarray, first, last):
    """cost.allreduce_s of ``params`` bytes over ranks ``first .. last`` (``reps`` of them)."""
    m = reps.astype(float)
    level = _level(first, last, p.blocks) if p.levels > 1 else 0
    out = np.zeros(np.broadcast_shapes(np.shape(params), m.shape, np.shape(level)))
    for lv in range(p.levels):
        ring = 2 * (m - 1) / m * params / p.bandwidth[lv] + 2 * (m - 1) * p.latency[lv]
        out = np.where(np.asarray(level) == lv, ring, out) if p.levels > 1 else ring + out
    return np.where((m > 1) & (params > 0), out, 0.0)


# --- the kernel ----------------------------------------------------------------------------------


@dataclass
class _Tables:
    """Values and choices of every (state, devices from here) cell inside the windows."""

    lo: np.ndarray  # per state: fewest devices from here
    hi: np.ndarray
    offset: np.ndarray  # per state: first row in the flat arrays
    value: np.ndarray  # (cells, variants, counts)
    arg_j: np.ndarray
    arg_m: np.ndarray
    arg_l: np.ndarray

    def rows(self, states: np.ndarray, rs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat rows of cells ``(states, rs)`` (broadcast) and whether they are in the window."""
        lo, hi = self.lo[states], self.hi[states]
        ok = (rs >= lo) & (rs <= hi)
        return np.where(ok, self.offset[states] + rs - lo, 0), ok


def _kernel(p: _Problem, total: int, bound: float, counts: int, sync_cap: float) -> _Tables:
    """Fill the suffix values for ``total`` devices under a trial bound and an all-reduce cap.

    ``counts``: stage counts tracked (``1f1b``/``gpipe``), 0 for the ``pipedream`` objective.
    """
    t = p.t
    work = t.compute_s
    n_states = len(work)
    last = n_states - 1
    limit = bound * (1 + _REL)
    scale = 1.0 / limit if np.isfinite(bound) and limit > 0 else 0.0
    lo = np.maximum(np.ceil((work[last] - work) * scale - _REL).astype(np.int64), 1)
    hi = np.minimum(total - np.ceil(work * scale - _REL).astype(np.int64), total)
    hi[1:] = np.minimum(hi[1:], total - 1)  # a stage before it needs a device
    lo[last] = hi[last] = 0
    width = np.maximum(hi - lo + 1, 0)
    offset = np.concatenate([[0], np.cumsum(width)[:-1]])
    cols = counts + 1 if counts else 1
    shape = (int(width.sum()), p.variants, cols)
    if shape[0] * shape[1] * shape[2] > _TABLE_CELLS:
        raise PlanError(
            f"the DP's table for {p.devices} devices, {n_states} states and {cols} stage counts "
            f"has {shape[0] * shape[1] * shape[2]:,} cells, more than it keeps "
            f"({_TABLE_CELLS:,}); use fewer devices per plan, fewer microbatches, or "
            "--state-space profile"
        )
    tab = _Tables(
        lo=lo,
        hi=hi,
        offset=offset,
        value=np.full(shape, np.inf),
        arg_j=np.full(shape, -1, dtype=np.int32),
        arg_m=np.zeros(shape, dtype=np.int32),
        arg_l=np.zeros(shape, dtype=np.int8),
    )
    tab.value[offset[last]] = np.inf
    tab.value[offset[last], :, 0] = 0.0
    o_fac = 1 + (0 if p.pipedream else 1) + p.optimizer_factor
    for k in range(last - 1, -1, -1):
        if width[k] == 0 or len(p.succ[k]) == 0:
            continue
        if k == 0 and hi[0] < lo[0]:
            continue
        _fill(p, tab, k, total, limit, scale, counts, sync_cap, o_fac)
    return tab


def _fill(p, tab, k, total, limit, scale, counts, sync_cap, o_fac) -> None:
    """One state's row: every (devices from here, incoming variant, stage count) cell."""
    t = p.t
    work = t.compute_s
    js = p.succ[k]
    rs = np.arange(tab.lo[k], tab.hi[k] + 1)
    # replicas: enough for the stage's compute within the bound, leaving the rest its minimum
    r_lo = np.maximum(1, np.ceil((work[js] - work[k]) * scale - _REL).astype(np.int64))
    r_hi = np.minimum(p.max_replicas, rs[-1] - tab.lo[js])
    keep = r_lo <= r_hi
    if not keep.any():
        return
    js, r_lo, r_hi = js[keep], r_lo[keep], r_hi[keep]
    # bounded memory: next states in chunks of at most _CHUNK_CELLS candidate cells
    per_j = (int((r_hi - r_lo).max()) + 1) * len(rs) * p.variants * tab.value.shape[2]
    size = max(1, _CHUNK_CELLS // max(per_j, 1))
    for start in range(0, len(js), size):
        part = slice(start, start + size)
        _fill_chunk(
            p, tab, k, js[part], r_lo[part], r_hi[part], rs, total, limit, counts, sync_cap, o_fac
        )


def _fill_chunk(p, tab, k, js, r_lo, r_hi, rs, total, limit, counts, sync_cap, o_fac) -> None:
    """The cells of state ``k`` reachable through next states ``js``, merged into the table."""
    t = p.t
    work = t.compute_s
    w = int((r_hi - r_lo).max()) + 1
    reps = r_lo[:, None] + np.arange(w)[None, :]  # (j, w)
    r_ok = reps <= r_hi[:, None]
    reps = np.where(r_ok, reps, r_lo[:, None])
    m3 = reps[:, :, None]  # (j, w, 1)
    first = total - rs  # (d,) first rank of the stage
    end = first[None, None, :] + m3  # (j, w, d): one past its last rank
    rest = rs[None, None, :] - m3
    share = _share(p, reps)[:, :, None]
    c = work[js] - work[k]
    params = t.parameter_bytes[js] - t.parameter_bytes[k]
    ar = _allreduce(p, params[:, None, None], m3, first[None, None, :], end - 1)
    body = c[:, None, None] + (ar if p.pipedream else 0.0)
    if np.isfinite(sync_cap):
        body = np.where(ar < sync_cap, body, np.inf)
    # memory (cost.stage_memory_bytes): weights x versions + gradients + optimizer state + ...
    saved = t.saved_bytes[js] - t.saved_bytes[k]
    base = params * o_fac + (t.buffer_bytes[js] - t.buffer_bytes[k])
    base = base + (saved if p.recompute else 0.0)
    per_flight = (params if p.pipedream else 0.0) + (t.cut_bytes[k] if p.recompute else saved)
    per_flight = np.broadcast_to(per_flight, js.shape)
    flights = _flights(p, m3, rs[None, None, :])
    fits = base[:, None, None] + per_flight[:, None, None] * flights <= p.memory_cap
    alive = fits & (rest >= 0) & r_ok[:, :, None]
    # the rest after j: its value under each outgoing level, the best level kept
    rows, in_window = tab.rows(js[:, None, None], np.maximum(rest, 0))
    nxt = np.where(
        (in_window & alive)[..., None, None], tab.value[rows], np.inf
    )  # (j, w, d, variants, cols)
    nxt = nxt[..., :-1] if counts else nxt  # the rest has one stage fewer
    if p.levels == 1:
        out = _link(p, t.cut_bytes[js], 0)[:, None, None] * share
        tail = np.maximum(out[..., None], nxt[..., 0, :])
        tail_l = np.zeros(tail.shape, dtype=np.int8)
    else:
        alpha = _level(first[None, None, :], end, p.blocks)  # (j, w, d)
        options = []
        for lv in range(p.levels):
            pick = np.where(
                (alpha == lv)[..., None],
                nxt[..., _exact(p, lv), :],
                np.where((alpha < lv)[..., None], nxt[..., _loose(lv), :], np.inf),
            )
            out = _link(p, t.cut_bytes[js], lv)[:, None, None] * share
            options.append(np.maximum(out[..., None], pick))
        stacked = np.stack(options)
        tail_l = stacked.argmin(axis=0).astype(np.int8)
        tail = np.take_along_axis(stacked, tail_l[None].astype(np.int64), axis=0)[0]
    n_d = len(rs)
    base_row = tab.offset[k]
    variants = [0] if k == 0 else range(p.variants)
    beta = _level(first[None, None, :] - 1, end - 1, p.blocks) if p.levels > 1 and k > 0 else None
    for v in variants:
        if k == 0:
            link_in = 0.0
            valid = alive
        else:
            level_in = v // 2 if p.levels > 1 else 0
            if p.levels > 1 and v == 1:
                continue  # level 0 cannot be promised loosely
            link_in = float(_link(p, t.cut_bytes[k], level_in))
            valid = alive
            if beta is not None:
                valid = valid & ((beta <= level_in) if v % 2 == 0 else (beta == level_in))
        time = np.maximum(body, link_in) * share
        time = np.where(valid & (time <= limit), time, np.inf)
        cand = np.maximum(time[..., None], tail)  # (j, w, d, cols)
        cand = np.where(cand <= limit, cand, np.inf)  # the link out counts towards the bound too
        flat = cand.reshape(-1, n_d, cand.shape[-1])
        best = flat.argmin(axis=0)  # (d, cols)
        value = np.take_along_axis(flat, best[None], axis=0)[0]
        bj, bw = np.unravel_index(best, reps.shape)
        chosen_l = tail_l.reshape(-1, n_d, cand.shape[-1])
        chosen_l = np.take_along_axis(chosen_l, best[None], axis=0)[0]
        sl = slice(base_row, base_row + n_d)
        cols = slice(1, None) if counts else slice(0, 1)
        better = value < tab.value[sl, v, cols]  # earlier chunks may hold better cells
        for array, new in (
            (tab.value, value),
            (tab.arg_j, js[bj]),
            (tab.arg_m, reps[bj, bw]),
            (tab.arg_l, chosen_l),
        ):
            array[sl, v, cols] = np.where(better, new, array[sl, v, cols])


# --- the search ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    objective: float
    path: list[tuple[int, int, int]]
    total: int


def search(cost: CostModel, space: StateSpace) -> tuple[list[tuple[int, int, int]], float] | None:
    """The optimal stages ``[(start state, end state, replicas), ...]`` and objective, or None.

    Stages take contiguous ranks in order from rank 0 (module docstring).
    """
    p = _problem(cost, space)
    found = _search(p, _incumbent(cost))
    return None if found is None else (found.path, found.objective)


def _incumbent(cost: CostModel) -> float:
    """The best objective of a fitting baseline the options allow (every baseline is a plan of the
    DP's space), or inf: trial bounds never need to exceed what it implies."""
    from planner.optimize.baselines import baselines

    o = cost.options
    best = np.inf
    for part in baselines(cost).values():
        replicas = [s.replicas for s in part.stages]
        if not part.fits or (o.straight and max(replicas) > 1):
            continue
        if not o.allow_fewer_devices and sum(replicas) != cost.topology.num_devices:
            continue
        best = min(best, part.objective_s)
    return float(best)


def _search(p: _Problem, incumbent: float) -> _Found | None:
    work = float(p.t.compute_s[-1])
    n = p.devices
    per_bound = 1 if p.pipedream else p.microbatches  # objective >= per_bound x slowest stage
    # Positions matter modulo the devices of one outermost unit only (levels are translation
    # invariant by whole units), so one run per residue of the total covers every total.
    period = p.blocks[-1] if p.blocks else 1
    totals = list(range(n, max(n - period, 0), -1)) if p.allow_fewer else [n]
    ceiling = incumbent / per_bound * (1 + 1e-6) if np.isfinite(incumbent) else np.inf
    bound = min(1.1 * work / n, ceiling) if work > 0 else ceiling
    best: _Found | None = None
    while True:
        best = _under(p, bound, totals, best)
        if best is not None and best.objective <= per_bound * bound * (1 + _REL):
            return best
        if best is not None:  # anything better has every stage faster than F (1f1b/gpipe: F / M)
            bound = best.objective / per_bound
            continue
        if not np.isfinite(bound):
            return None
        if bound >= ceiling:  # the incumbent lies outside the space searched: search everything
            ceiling = np.inf
        bound = min(bound * 1.25 if bound > 0 else np.inf, ceiling)
        if bound > max(work, 1e-300) * 1e3:  # links can be slower than all compute: no bound
            bound = np.inf


def _under(p: _Problem, bound: float, totals: list[int], best: _Found | None) -> _Found | None:
    """The best plan with every stage at most ``bound`` (or ``best`` if that is better)."""
    work = float(p.t.compute_s[-1])
    m_count = p.microbatches
    n_states = len(p.t.compute_s)
    period = p.blocks[-1] if p.blocks else 1
    for total in totals:
        floor = work / total  # the slowest stage of any plan on ``total`` devices or fewer
        if floor > bound * (1 + _REL):
            break
        if best is not None and floor * (1 if p.pipedream else m_count) >= best.objective:
            break
        counts = 0
        if not p.pipedream:
            counts = min(total, n_states - 1)
            if best is not None and floor > 0:
                counts = min(counts, max(1, math.floor(best.objective / floor) - m_count + 1))
        sync_cap = np.inf
        while True:
            tab = _kernel(p, total, bound, counts, sync_cap)
            root = _root(p, tab, total, counts, period)
            if root is None:
                break
            g, r, c = root
            path = _walk(p, tab, total, r, c, counts)
            syncs = [] if p.pipedream else _syncs(p, path, total - r)
            y = max(syncs, default=0.0)
            if best is None or g + y < best.objective:
                best = _Found(g + y, path, total)
            if p.pipedream or y <= 0 or g >= best.objective:
                break
            sync_cap = y
    return best


def _root(
    p: _Problem, tab: _Tables, total: int, counts: int, period: int
) -> tuple[float, int, int] | None:
    """(objective without the all-reduce term, devices, stage count) of the best root cell: a
    plan starting at rank 0 up to translation by whole outermost units."""
    lo, hi = int(tab.lo[0]), int(tab.hi[0])
    if not p.allow_fewer:
        lo = max(lo, total)
    if lo > hi:
        return None
    rs = np.arange(lo, hi + 1)
    values = tab.value[tab.offset[0] + rs - tab.lo[0], 0]  # (r, cols)
    values = np.where(((total - rs) % period == 0)[:, None], values, np.inf)
    if counts:
        slots = p.microbatches + np.arange(values.shape[1]) - 1
        with np.errstate(invalid="ignore"):
            values = np.where(np.isfinite(values), values * slots[None, :], np.inf)
        values[:, 0] = np.inf
    flat = int(np.argmin(values))
    r, c = divmod(flat, values.shape[1])
    best = float(values[r, c])
    return None if not np.isfinite(best) else (best, lo + r, c)


def _walk(p: _Problem, tab: _Tables, total: int, r: int, c: int, counts: int):
    """Stages ``(start state, end state, replicas)`` from the root cell ``(r, c)``."""
    last = len(p.t.compute_s) - 1
    out: list[tuple[int, int, int]] = []
    k, v = 0, 0
    while k != last:
        row = tab.offset[k] + r - tab.lo[k]
        col = c if counts else 0
        j, m, lv = (int(x[row, v, col]) for x in (tab.arg_j, tab.arg_m, tab.arg_l))
        out.append((k, j, m))
        first = total - r
        if p.levels > 1 and j != last:
            alpha = int(_level(first, first + m, p.blocks))
            v = _exact(p, lv) if lv == alpha else _loose(lv)
        k, r, c = j, r - m, c - 1
    return out


def _syncs(p: _Problem, path: list[tuple[int, int, int]], first: int) -> list[float]:
    """Each stage's all-reduce, computed as the kernel does (same floats for the cap)."""
    out = []
    for k, j, m in path:
        params = np.array([p.t.parameter_bytes[j] - p.t.parameter_bytes[k]])[:, None, None]
        reps = np.array([[[m]]])
        out.append(float(_allreduce(p, params, reps, np.array([first]), first + reps - 1)[0, 0, 0]))
        first += m
    return out
