"""PipeDream's hierarchy for multi-level topologies, and the ranks a nested plan runs on.

Level 0 is solved for every pair of states ``(i, j)``: the best sub-pipeline of ``D_j \\ D_i`` on
at most one level-0 unit (e.g. the devices of one server), with links and all-reduces at level 0.
Level ``l > 0`` then partitions the model into *groups*; a group is a range of states run by
``n'`` level-``(l-1)`` units, each holding a copy of the range's best sub-pipeline (PipeDream
SOSP'19 §3.1: "the optimal sub-pipelines of the lower level become the stages of the next"). The
top level runs the same exact suffix program as a single-level topology
(:func:`planner.optimize.dp.search`), with group costs instead of stage costs; with more than 16
units and the ``pipedream`` objective it instead bisects the bottleneck over a fewest-units
shortest path (:func:`_bisect_min_units`), whose cost does not grow with the units' windows.

A group's cost at level ``l`` is an *upper bound* on the exact time of its stages once replicated:
``pipedream``: ``(B + 2 Q / bandwidth_l) / n' + 2 latency_l`` where ``B`` is the sub-pipeline's
slowest stage and ``Q`` the largest parameter bytes per replica among its stages (the ring
all-reduce of ``r n'`` replicas moves under ``2 P / bandwidth`` per replica); links into and out
of the group at level ``l``, divided by ``n'``. ``1f1b``/``gpipe``: ``B`` times the largest
``ceil(ceil(M / r) / n') / ceil(M / r)`` over the stages' replica counts ``r`` (a stage's busiest
replica runs ``ceil(M / r)`` microbatches, round-robin, and ``ceil(M / (r n'))`` once the group is
replicated; :func:`planner.optimize.cost.replica_share`), links times ``ceil(M / n') / M``. Memory is checked exactly, stage by stage of the sub-pipeline, with
the microbatches in flight of its ``r n'`` replicas and the devices after it (later groups counted
as whole units): a linear bound in the later devices ignored the ``ceil(M / replicas)`` cap of
``1f1b``/``gpipe`` and added one microbatch for rounding even with nothing after the group, which
rejected plain data parallelism and straight pipelines that fit (vgg16, 2 x 8 x 16 GiB, ``1f1b``). The plan the DP returns is then scored exactly from its ranks
(:meth:`planner.optimize.cost.CostModel.evaluate`), so reported times are exact and never above
what the DP assumed. On one level the DP is exact; across levels it is exact within PipeDream's
plan space up to these bounds.

Graphs with many states are solved on a coarse subset first (the level-0 table is cubic in the
states): at most :data:`COARSE_STATES` states, the cheapest cut in each equal-compute bucket, then
refined around the chosen cuts.

Ranks (:func:`nested_ranks`): groups take consecutive units; inside each unit the sub-pipeline's
stages take consecutive devices. A stage's replicas are listed with the outermost level varying
fastest, so with round-robin routing (microbatch ``i`` on ``ranks[i % replicas]``) a microbatch
stays inside one unit of every level its group is replicated over: links inside a group are at
level 0, as the DP assumed, and a replicated stage's all-reduce spans its group's level.

Example:
    >>> from planner.topology import Topology
    >>> t = Topology.from_args(gpus=8, gpus_per_node=4)
    >>> # two nodes each running stage A (1 device) then stage B (3 devices)
    >>> tree = [(2, [(1, None, 0, 1), (3, None, 1, 2)], 0, 2)]
    >>> leaves, ranks = nested_ranks(t, tree)
    >>> ranks
    [(0, 4), (1, 5, 2, 6, 3, 7)]
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from planner.errors import InfeasibleError, PlanError
from planner.optimize.cost import OPTIMIZER_STATE_FACTOR, CostModel, DownsetTables
from planner.optimize.result import Partition
from planner.optimize.states import StateSpace
from planner.schedules import Schedule
from planner.topology import Topology

__all__ = ["COARSE_STATES", "nested_ranks", "solve_hierarchical"]

#: States kept for the cubic level-0 table on large graphs (per level-0 unit size).
COARSE_STATES = {1: 600, 2: 500, 4: 320, 8: 220, 16: 150}


def nested_ranks(topology: Topology, tree: list) -> tuple[list[tuple], list[tuple[int, ...]]]:
    """Flatten a nested plan into stages and their ranks.

    ``tree`` is the top level's pipeline: a list of groups ``(units, sub, start, end)`` where
    ``sub`` is the next level's pipeline, or None for a level-0 stage of ``units`` devices.

    Returns:
        ``leaves``: ``(start, end, replicas, devices per unit)`` per stage in pipeline order, and
        the ranks of each.
    """
    depth = _depth(tree)
    leaves: list[tuple] = []
    ranks: list[tuple[int, ...]] = []

    def place(pipeline: list, level: int, fixed: dict[int, tuple[int, int]]) -> None:
        pos = 0
        for units, sub, start, end in pipeline:
            here = {**fixed, level: (pos, units)}
            pos += units
            if sub is None:
                ranges = [
                    range(here.get(lv, (0, 1))[0], sum(here.get(lv, (0, 1)))) for lv in range(depth)
                ]
                rs = []
                for coords in itertools.product(*ranges):  # outermost level varies fastest
                    rank = sum(
                        c * (topology.block_size(lv - 1) if lv else 1)
                        for lv, c in enumerate(coords)
                    )
                    rs.append(rank)
                replicas = len(rs)
                leaves.append((start, end, replicas, units))
                ranks.append(tuple(rs))
            else:
                place(sub, level - 1, here)

    place(tree, depth - 1, {})
    return leaves, ranks


def _depth(pipeline: list) -> int:
    sub = pipeline[0][1]
    return 1 if sub is None else 1 + _depth(sub)


# --- the level-0 table ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Table:
    """Best sub-pipelines of every state pair on at most ``units`` of one level (its inner DP).

    ``value[i, j]``: slowest stage; ``param_per_replica``: largest parameter bytes per replica
    of a stage; ``param_max``: largest parameter bytes of a stage (its all-reduce volume);
    ``mem_fixed``/``mem_slope``: memory bound ``fixed + slope * (devices after the group) / n'``.
    ``arg_k``/``arg_m``: first stage's end and replicas (for the whole-range stage, ``arg_k=j``);
    ``devices``: devices the sub-pipeline uses. Per stage ``s`` of the chosen sub-pipeline (padded
    to ``units`` with zeros): ``stage_base`` and ``stage_flight`` (memory is ``base + flight x
    microbatches in flight``), ``stage_reps`` (replicas in the unit) and ``stage_from`` (devices of
    the unit from ``s`` on), for the exact memory check at the next level.
    """

    value: np.ndarray
    param_per_replica: np.ndarray
    param_max: np.ndarray
    mem_fixed: np.ndarray
    mem_slope: np.ndarray
    arg_k: np.ndarray
    arg_m: np.ndarray
    devices: np.ndarray
    stage_base: np.ndarray
    stage_flight: np.ndarray
    stage_reps: np.ndarray
    stage_from: np.ndarray


def _minmax_product(first: np.ndarray, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``out[i, j] = min_k max(first[i, k], rest[k, j])`` and its argmin, for ``i <= k < j``.

    States are sorted by size, so a stage ``i -> k`` needs ``k > i`` and the rest ``k -> j``
    needs ``j > k``: blocks of ``(i, j)`` only visit ``k`` between them (a sixth of the cube),
    with ``k`` innermost so the reduction runs over contiguous memory.
    """
    n = len(first)
    out = np.full((n, n), np.inf)
    arg = np.zeros((n, n), dtype=np.int64)
    rest_t = np.ascontiguousarray(rest.T)  # rest_t[j, k]
    size = 64
    for i0 in range(0, n, size):
        i1 = min(n, i0 + size)
        for j0 in range(i0, n, size):
            j1 = min(n, j0 + size)
            block = np.maximum(first[i0:i1, None, i0:j1], rest_t[None, j0:j1, i0:j1])
            pick = block.argmin(axis=2)
            out[i0:i1, j0:j1] = np.take_along_axis(block, pick[:, :, None], axis=2)[..., 0]
            arg[i0:i1, j0:j1] = pick + i0
    return out, arg


def _level0_table(cost: CostModel, t: DownsetTables, inc: np.ndarray, units: int) -> _Table:
    """Best sub-pipeline of every state pair on at most ``units`` devices of one level-0 unit.

    ``value[i, j, m]`` (exactly ``m`` devices) is the min over a first stage ``i -> k`` on ``m'``
    devices and the best ``k -> j`` on ``m - m'``: one min-max matrix product per ``(m, m')``.
    """
    o = cost.options
    lv = cost.topology.levels[0]
    bw, lat = lv.bandwidth_bytes_per_s, lv.latency_s
    pd = o.schedule is Schedule.PIPEDREAM
    opt = OPTIMIZER_STATE_FACTOR[o.optimizer]
    cap = cost.memory_limit_bytes if o.memory_constraint else np.inf
    from planner.optimize.dp import flight_table

    flights = flight_table(cost, units)
    n_states = len(t.compute_s)
    shape = (n_states, n_states, units + 1)
    value = np.full(shape, np.inf)
    q, pmax, mfix, mslope = (np.zeros(shape) for _ in range(4))
    arg_k = np.full(shape, -1, dtype=np.int64)
    arg_m = np.zeros(shape, dtype=np.int64)

    def pair(x: np.ndarray) -> np.ndarray:
        return np.where(inc, x[None, :] - x[:, None], 0.0)  # stage i -> k sums

    c, p = pair(t.compute_s), pair(t.parameter_bytes)
    saved, buffers = pair(t.saved_bytes), pair(t.buffer_bytes)
    link = np.where(t.cut_bytes > 0, 2 * (lat + t.cut_bytes / bw), 0.0)
    versions_fixed = 0 if pd else 1
    base = p * (1 + versions_fixed + opt) + buffers + (saved if o.recompute else 0.0)
    per_flight = (p if pd else 0.0) + (t.cut_bytes[:, None] if o.recompute else saved)
    per_flight = np.broadcast_to(per_flight, (n_states, n_states))
    max_reps = 1 if o.straight else units

    def stage_time(r: int, split: bool) -> np.ndarray:
        # cost.allreduce_s: nothing to reduce (no latency either) without parameters
        ar = np.where(p > 0, 2 * (r - 1) / r * p / bw + 2 * (r - 1) * lat, 0.0) if r > 1 else 0.0
        work = c + (ar if pd else 0.0)
        # link in at i (conservative at the group's own boundary), out at k when more follow
        out = np.maximum(work, link[:, None])
        if split:
            out = np.maximum(out, link[None, :])
        # cost.replica_share: ceil(M / r) / M on the busiest replica under a flush (round-robin)
        share = 1.0 / r if pd else -(-o.microbatches // r) / o.microbatches
        return np.where(inc, out * share, np.inf)

    for m in range(1, units + 1):
        if m <= max_reps:  # the whole range as one stage on m devices
            mem = base + per_flight * flights[m, m]
            value[:, :, m] = np.where(mem <= cap, stage_time(m, False), np.inf)
            q[:, :, m], pmax[:, :, m] = p / m, p
            mfix[:, :, m], mslope[:, :, m] = mem + per_flight, per_flight / m
            arg_k[:, :, m] = np.arange(n_states)[None, :]
            arg_m[:, :, m] = m
        for r in range(1, min(m - 1, max_reps) + 1):
            mem = base + per_flight * flights[r, m]
            first = np.where(mem <= cap, stage_time(r, True), np.inf)
            best, ks = _minmax_product(first, value[:, :, m - r])
            better = best < value[:, :, m]
            if not better.any():
                continue
            ii, jj = np.nonzero(better)
            kk = ks[ii, jj]
            value[ii, jj, m] = best[ii, jj]
            q[ii, jj, m] = np.maximum(p[ii, kk] / r, q[kk, jj, m - r])
            pmax[ii, jj, m] = np.maximum(p[ii, kk], pmax[kk, jj, m - r])
            mfix[ii, jj, m] = np.maximum(mem[ii, kk] + per_flight[ii, kk], mfix[kk, jj, m - r])
            mslope[ii, jj, m] = np.maximum(per_flight[ii, kk] / r, mslope[kk, jj, m - r])
            arg_k[ii, jj, m] = kk
            arg_m[ii, jj, m] = r
    # best over the devices of one unit (fewer devices inside a unit only if allowed)
    ms = np.arange(1, units + 1) if o.allow_fewer_devices else np.array([units])
    pick = ms[value[:, :, ms].argmin(axis=2)]
    pick3 = pick[:, :, None]

    def at(x: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, pick3, 2)[..., 0]

    per_stage = _stage_memory(base, per_flight, arg_k, arg_m, pick, np.isfinite(at(value)), units)
    return _Table(
        value=at(value),
        param_per_replica=at(q),
        param_max=at(pmax),
        mem_fixed=at(mfix),
        mem_slope=at(mslope),
        arg_k=arg_k,
        arg_m=arg_m,
        devices=pick,
        stage_base=per_stage[0],
        stage_flight=per_stage[1],
        stage_reps=per_stage[2],
        stage_from=per_stage[3],
    )


def _stage_memory(base, per_flight, arg_k, arg_m, pick, valid, units: int):
    """Per-stage memory terms of every pair's chosen sub-pipeline, shape ``(n, n, units)``."""
    n = len(base)
    shape = (n, n, units)
    out_base, out_flight = np.zeros(shape), np.zeros(shape)
    out_reps, out_from = np.ones(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    ii, jj = np.nonzero(valid)
    cur, m = ii.copy(), pick[ii, jj].astype(np.int64)
    for s in range(units):
        if len(ii) == 0:
            break
        k, r = arg_k[cur, jj, m], arg_m[cur, jj, m]
        out_base[ii, jj, s] = base[cur, k]
        out_flight[ii, jj, s] = per_flight[cur, k]
        out_reps[ii, jj, s] = r
        out_from[ii, jj, s] = m
        more = k != jj
        ii, jj, cur, m = ii[more], jj[more], k[more], (m - r)[more]
    return out_base, out_flight, out_reps, out_from


def _sub_pipeline(table: _Table, i: int, j: int) -> list:
    """The level-0 stages ``(replicas, None, start, end)`` of the table's best ``i -> j``."""
    m = int(table.devices[i, j])
    out = []
    while True:
        k, r = int(table.arg_k[i, j, m]), int(table.arg_m[i, j, m])
        out.append((r, None, i, k))
        if k == j:
            return out
        i, m = k, m - r


# --- the top level -------------------------------------------------------------------------------


def solve_hierarchical(cost: CostModel, space: StateSpace) -> Partition:
    """PipeDream's two-level DP for the planner cost model (module docstring).

    Raises:
        InfeasibleError: No plan fits (:func:`planner.optimize.dp.solve` explains what would).
    """
    topo = cost.topology
    if len(topo.levels) > 2:
        raise PlanError(
            f"topologies of {len(topo.levels)} levels are not supported by the planner cost "
            "model's DP yet; describe the machine as two levels (devices per node, nodes)"
        )
    units = topo.levels[0].devices
    limit = COARSE_STATES.get(units, max(100, int(1600 / max(units, 1) ** 0.5)))
    if len(space) <= limit:
        solved = _solve_on(cost, space)
        if solved is None:
            raise InfeasibleError("no plan fits")
        return solved[0]
    tables = DownsetTables.from_masks(cost, space.masks)
    keep = _coarse(tables, limit)
    best = None
    reached = None
    for _ in range(3):  # coarse, then refine around the cuts the plan uses
        solved = _solve_on(cost, space.subset(keep), start_bound=reached)
        if solved is None:
            break
        result, reached = solved
        best = result if best is None or result.objective_s < best.objective_s else best
        cuts = _cuts_of(space, result)
        refined = _refine(tables, keep, cuts, limit)
        if set(refined) == set(keep):
            break
        keep = refined
    if best is None:
        raise InfeasibleError("no plan fits")
    return best


def _coarse(t: DownsetTables, limit: int) -> np.ndarray:
    """``limit`` states: the one with the smallest cut in each equal-compute bucket."""
    total = t.compute_s[-1]
    n = len(t.compute_s)
    buckets = (
        np.minimum((t.compute_s / total * (limit - 2)).astype(int), limit - 3)
        if total > 0
        else np.arange(n) * (limit - 2) // n
    )
    order = np.lexsort((t.cut_bytes, buckets))
    first = np.ones(len(order), dtype=bool)
    first[1:] = buckets[order][1:] != buckets[order][:-1]
    return np.unique(np.concatenate([[0, n - 1], order[first]]))


def _cuts_of(space: StateSpace, part: Partition) -> list[int]:
    masks = space.masks
    rows = {m.tobytes(): i for i, m in enumerate(masks)}
    mask = np.zeros(masks.shape[1], dtype=bool)
    cuts = []
    for stage in part.stages[:-1]:
        mask[list(stage.layers)] = True
        cuts.append(rows[mask.tobytes()])
    return cuts


def _refine(t: DownsetTables, keep: np.ndarray, cuts: list[int], limit: int) -> np.ndarray:
    """Keep ``keep``'s states, plus every state within half a bucket of compute of each cut."""
    width = t.compute_s[-1] / max(limit - 2, 1)
    near = np.zeros(len(t.compute_s), dtype=bool)
    for c in cuts:
        near |= np.abs(t.compute_s - t.compute_s[c]) <= width
    extra = np.flatnonzero(near)
    if len(extra) > limit:  # keep the refinement affordable: closest states first
        dist = np.min(np.abs(t.compute_s[extra][:, None] - t.compute_s[cuts][None, :]), axis=1)
        extra = extra[np.argsort(dist, kind="stable")[:limit]]
    coarse = keep if len(keep) + len(extra) <= limit * 5 // 4 else _coarse(t, limit // 2)
    return np.unique(np.concatenate([coarse, extra]))


def _group_fns(cost: CostModel, t: DownsetTables, table: _Table):
    """Group cost at level 1 (module docstring): ``stage`` and ``sync`` for the dp search."""
    o = cost.options
    lv0, lv1 = cost.topology.levels[0], cost.topology.levels[1]
    units = lv0.devices
    bw1, lat1 = lv1.bandwidth_bytes_per_s, lv1.latency_s
    pd = o.schedule is Schedule.PIPEDREAM
    cap = cost.memory_limit_bytes if o.memory_constraint else np.inf
    link = np.where(t.cut_bytes > 0, 2 * (lat1 + t.cut_bytes / bw1), 0.0)
    # grow[r, n']: a stage on r replicas of a unit, once on r n', runs at most grow x its time in
    # the table (1 / n' in steady state; under a flush its busiest replica goes from ceil(M / r)
    # to ceil(M / (r n')) = ceil(ceil(M / r) / n') microbatches, cost.replica_share); row 0 pads
    r_all = np.arange(units + 1)[:, None]
    n_all = np.arange(1, cost.topology.levels[1].devices + 1)[None, :]
    if pd:
        grow = np.broadcast_to(1.0 / n_all, (units + 1, n_all.shape[1])).copy()
    else:
        per_r = -(-o.microbatches // np.maximum(r_all, 1))
        grow = -(-per_r // n_all) / per_r
    grow[0] = 0.0
    grow = np.concatenate([np.zeros((units + 1, 1)), grow], axis=1)  # column n' = 0 unused

    def sync_bound(k, js, mp):
        pm = table.param_max[k, js][:, None]
        across = 2 * pm / bw1 + 2 * units * mp * lat1
        inside = 2 * pm / lv0.bandwidth_bytes_per_s + 2 * units * lv0.latency_s
        return np.where(mp > 1, across, inside)

    def stage(k, js, reps, ds, sync_cap):
        mp = reps.astype(float)  # (j, n')
        b = table.value[k, js][:, None]
        q = table.param_per_replica[k, js][:, None]
        extra = (2 * q / bw1 / mp + 2 * lat1) if pd else 0.0
        # (j, n'): the largest growth over the sub-pipeline's stages
        factor = grow[table.stage_reps[k, js][:, None, :], reps[:, :, None]].max(axis=2)
        factor = np.where(factor > 0, factor, 1.0)  # no sub-pipeline: keep b = inf, not nan
        body = np.where(mp > 1, b * factor + extra, b)
        # links into and out of the group: unit u takes microbatches i with i % n' == u
        share = 1.0 / mp if pd else -(-o.microbatches // reps) / o.microbatches
        time = np.maximum(np.maximum(body, link[k] * share), link[js][:, None] * share)
        if np.isfinite(sync_cap):
            time = np.where(sync_bound(k, js, mp) < sync_cap, time, np.inf)
        return time, _group_fits(cost, table, k, js, reps, ds, cap)

    def sync(k, j, m):
        if pd:
            return 0.0
        return float(sync_bound(k, np.array([j]), np.array([[float(m)]]))[0, 0])

    return stage, sync


def _group_fits(cost: CostModel, table: _Table, k, js, reps, ds, cap: float) -> np.ndarray:
    """Whether every stage of group ``k -> js`` on ``reps`` units, ``ds`` units from here, fits.

    Exact (:meth:`CostModel.stage_memory_bytes` of each stage once replicated ``n'`` times):
    a stage with ``r`` replicas and ``e`` devices from it on in its unit has ``r n'`` replicas
    and ``e n' + (d - n') x units`` devices from here; later groups are counted as whole units,
    an upper bound when they leave devices idle (in-flight counts grow with the devices).
    """
    if not np.isfinite(cap):
        return np.ones((len(js), reps.shape[1], len(ds)), dtype=bool)
    o = cost.options
    units = cost.topology.levels[0].devices
    n_rep = reps[:, :, None, None].astype(np.int64)  # (j, n', 1, 1)
    r = table.stage_reps[k, js][:, None, None, :] * n_rep  # (j, n', 1, s)
    later = np.maximum(ds[None, None, :, None] - n_rep, 0) * units
    from_here = table.stage_from[k, js][:, None, None, :] * n_rep + later  # (j, n', d, s)
    depth = -(-from_here // r)
    total = -(-o.microbatches // r)
    if o.schedule is Schedule.GPIPE:
        flight = np.broadcast_to(total, depth.shape)
    elif o.schedule is Schedule.ONE_F_ONE_B:
        flight = np.minimum(depth, total)
    else:
        flight = depth
    base = table.stage_base[k, js][:, None, None, :]
    per = table.stage_flight[k, js][:, None, None, :]
    return (base + per * flight).max(axis=3) <= cap


def _bisect_min_units(
    cost: CostModel, space: StateSpace, t: DownsetTables, table: _Table, stage
) -> list | None:
    """Top level for the ``pipedream`` objective with idle devices allowed, by bisection.

    For a trial bound ``T`` the fewest units covering each suffix is a shortest path: a group
    ``k -> j`` needs ``n'`` units with ``(B + 2 Q / bandwidth) / n' + 2 latency <= T`` (or
    ``n' = 1`` and ``B <= T``), links ``L / n' <= T``, and memory ``fixed + slope * later / n'``
    within the device; fewest units downstream is best for both count and memory. ``T`` is
    bisected to a relative 1e-10 between infeasible and feasible; the plan found at the feasible
    end is optimal to that precision.
    """
    o = cost.options
    lv0, lv1 = cost.topology.levels
    units, nodes = lv0.devices, lv1.devices
    bw1, lat1 = lv1.bandwidth_bytes_per_s, lv1.latency_s
    cap = cost.memory_limit_bytes if o.memory_constraint else np.inf
    link = np.where(t.cut_bytes > 0, 2 * (lat1 + t.cut_bytes / bw1), 0.0)
    succ = [np.flatnonzero(space.includes[k]) for k in range(len(space))]
    last = len(space) - 1

    def plan(bound: float) -> tuple[int, list] | None:
        limit = bound * (1 + 1e-12)
        g = np.full(len(space), np.inf)
        g[last] = 0
        choice = np.zeros((len(space), 2), dtype=np.int64)
        for k in range(last - 1, -1, -1):
            js = succ[k]
            gj = g[js]
            b, q = table.value[k, js], table.param_per_replica[k, js]
            mfix, mslope = table.mem_fixed[k, js], table.mem_slope[k, js]
            links = np.maximum(link[k], link[js])
            later = np.where(np.isfinite(gj), gj, 0) * units
            with np.errstate(divide="ignore", invalid="ignore"):
                one = (np.maximum(b, links) <= limit) & (mfix + mslope * later <= cap)
                if o.straight:
                    need = np.where(one, 1.0, np.inf)
                else:
                    room = limit - 2 * lat1
                    by_time = np.where(room > 0, np.ceil((b + 2 * q / bw1) / room - 1e-9), np.inf)
                    by_link = np.ceil(links / limit - 1e-9)
                    spare = cap - mfix
                    by_mem = np.where(
                        spare < 0,
                        np.inf,
                        np.where(
                            mslope * later <= 0,
                            0.0,
                            np.where(spare > 0, np.ceil(mslope * later / spare - 1e-9), np.inf),
                        ),
                    )
                    many = np.maximum(np.maximum(by_time, by_link), np.maximum(by_mem, 2))
                    need = np.where(one, 1.0, many)
            total = need + gj
            total[~np.isfinite(b)] = np.inf
            pick = int(np.argmin(total))
            if total[pick] <= nodes:
                g[k] = total[pick]
                choice[k] = js[pick], need[pick]
        if not np.isfinite(g[0]):
            return None
        path, k = [], 0
        while k != last:
            j, n_units = (int(x) for x in choice[k])
            path.append((k, j, n_units))
            k = j
        return int(g[0]), path

    def reached(path: list) -> float:
        return max(
            float(stage(k, np.array([j]), np.array([[m]]), np.array([m]), np.inf)[0][0, 0])
            for k, j, m in path
        )

    lo = t.compute_s[-1] / (units * nodes)
    hi = lo * 1.05
    found = plan(hi)
    while found is None:
        lo, hi = hi, hi * 1.5
        if hi > max(1.0, t.compute_s[-1]) * 1e6:
            return None
        found = plan(hi)
    hi = min(hi, reached(found[1]))
    while hi - lo > 1e-10 * hi:
        mid = (lo + hi) / 2
        trial = plan(mid)
        if trial is None:
            lo = mid
        else:
            found, hi = trial, min(mid, reached(trial[1]))
    return found[1]


def _solve_on(
    cost: CostModel, space: StateSpace, start_bound: float | None = None
) -> tuple[Partition, float] | None:
    """Both levels on ``space``: the plan and the DP's own bottleneck; None when nothing fits."""
    from planner.optimize.dp import search

    topo = cost.topology
    t = DownsetTables.from_masks(cost, space.masks)
    table = _level0_table(cost, t, space.includes, topo.levels[0].devices)
    stage, sync = _group_fns(cost, t, table)
    o = cost.options
    if o.schedule is Schedule.PIPEDREAM and o.allow_fewer_devices and topo.levels[1].devices > 16:
        path = _bisect_min_units(cost, space, t, table, stage)
    else:
        path = search(
            succ=[np.flatnonzero(space.includes[k]) for k in range(len(space))],
            devices=topo.levels[1].devices,
            max_replicas=1 if cost.options.straight else topo.levels[1].devices,
            work=t.compute_s / topo.levels[0].devices,
            stage=stage,
            sync=sync,
            options=cost.options,
        )
    if path is None:
        return None
    tree = [(n_units, _sub_pipeline(table, k, j), k, j) for k, j, n_units in path]
    leaves, ranks = nested_ranks(topo, tree)
    stages = [space.stage(s, e).tolist() for s, e, _, _ in leaves]
    part = cost.evaluate(stages, [r for _, _, r, _ in leaves], ranks, solver="dp", optimal=False)
    reached = max(
        float(stage(k, np.array([j]), np.array([[m]]), np.array([m]), np.inf)[0][0, 0])
        for k, j, m in path
    )
    return part, reached
