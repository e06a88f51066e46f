"""PipeDream's hierarchy for multi-level topologies, and the ranks a nested plan runs on.

Level 0 is solved for every pair of states ``(i, j)``: the best sub-pipeline of ``D_j \\ D_i`` on
at most one level-0 unit (e.g. the devices of one server), with links and all-reduces at level 0.
Level ``l > 0`` then partitions the model into *groups*; a group is a range of states run by
``n'`` level-``(l-1)`` units, each holding a copy of the range's best sub-pipeline (PipeDream
SOSP'19 §3.1: "the optimal sub-pipelines of the lower level become the stages of the next"). The
top level runs the same exact suffix program as a single-level topology
(:func:`planner.optimize.dp.solve_flat`), with group costs instead of stage costs.

A group's cost at level ``l`` is an *upper bound* on the exact time of its stages once replicated:
``(B + 2 Q / bandwidth_l) / n' + 2 latency_l`` where ``B`` is the sub-pipeline's slowest stage
and ``Q`` the largest parameter bytes per replica among its stages (the ring all-reduce of
``r n'`` replicas moves under ``2 P / bandwidth`` per replica); links into and out of the group at
level ``l``, divided by ``n'``; memory grows with the devices after the group, bounded by each
sub-pipeline's stored worst stage. The plan the DP returns is then scored exactly from its ranks
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

from planner.errors import InfeasibleError
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
    ``devices``: devices the sub-pipeline uses.
    """

    value: np.ndarray
    param_per_replica: np.ndarray
    param_max: np.ndarray
    mem_fixed: np.ndarray
    mem_slope: np.ndarray
    arg_k: np.ndarray
    arg_m: np.ndarray
    devices: np.ndarray


def _level0_table(cost: CostModel, t: DownsetTables, inc: np.ndarray, units: int) -> _Table:
    """All-pairs suffix DP inside one level-0 unit, vectorised over the end state."""
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
    q = np.zeros(shape)
    pmax = np.zeros(shape)
    mfix = np.zeros(shape)
    mslope = np.zeros(shape)
    arg_k = np.full(shape, -1, dtype=np.int64)
    arg_m = np.zeros(shape, dtype=np.int64)
    reps_all = np.arange(1, (1 if o.straight else units) + 1)
    link = np.where(t.cut_bytes > 0, 2 * (lat + t.cut_bytes / bw), 0.0)
    for i in range(n_states - 2, -1, -1):
        ks = np.flatnonzero(inc[i])
        if len(ks) == 0:
            continue
        c = t.compute_s[ks] - t.compute_s[i]
        p = t.parameter_bytes[ks] - t.parameter_bytes[i]
        saved = t.saved_bytes[ks] - t.saved_bytes[i]
        buffers = t.buffer_bytes[ks] - t.buffer_bytes[i]
        mp = reps_all[None, :].astype(float)
        ar = np.where(mp > 1, 2 * (mp - 1) / mp * p[:, None] / bw + 2 * (mp - 1) * lat, 0.0)
        work = c[:, None] + (ar if pd else 0.0)
        # first stage i -> k on m' devices: link in at i (inside the unit: conservative when i is
        # the group's boundary), link out at k (only when more stages follow)
        t_single = np.maximum(work, link[i]) / mp  # k is the end of the range
        t_split = np.maximum(t_single, link[ks][:, None] / mp)
        versions_fixed = 0 if pd else 1
        base = p * (1 + versions_fixed + opt) + buffers + (saved if o.recompute else 0.0)
        per_flight = (p if pd else np.zeros_like(p)) + (t.cut_bytes[i] if o.recompute else saved)
        for m in range(1, units + 1):
            reps = reps_all[reps_all <= m]
            fl = flights[reps, m]  # devices from here = m within the unit
            mem = base[:, None] + per_flight[:, None] * fl[None, :]
            fits = mem <= cap
            # whole range as one stage on m devices: end state = ks
            if m <= reps_all[-1]:
                col = m - 1
                ok = fits[:, col]
                vals = np.where(ok, t_single[:, col], np.inf)
                better = vals < value[i, ks, m]
                sel = ks[better]
                value[i, sel, m] = vals[better]
                q[i, sel, m] = p[better] / m
                pmax[i, sel, m] = p[better]
                mfix[i, sel, m] = mem[better, col] + per_flight[better]
                mslope[i, sel, m] = per_flight[better] / m
                arg_k[i, sel, m] = sel
                arg_m[i, sel, m] = m
            if m == 1:
                continue
            # split: first stage i -> k on m' < m devices, then the best from k to every j
            sub_reps = reps[reps < m]
            if len(sub_reps) == 0:
                continue
            rest = value[ks][:, :, m - sub_reps]  # (k, j, m')
            first = np.where(fits[:, : len(sub_reps)], t_split[:, : len(sub_reps)], np.inf)
            cand = np.maximum(first[:, None, :], rest)
            cand = np.moveaxis(cand, 1, 0).reshape(n_states, -1)  # (j, k*m')
            pick = cand.argmin(axis=1)
            best = cand[np.arange(n_states), pick]
            better = best < value[i, :, m]
            if not better.any():
                continue
            js = np.flatnonzero(better)
            kk, mm = np.unravel_index(pick[js], (len(ks), len(sub_reps)))
            k_sel, m_sel = ks[kk], sub_reps[mm]
            value[i, js, m] = best[js]
            rest_m = m - m_sel
            q[i, js, m] = np.maximum(p[kk] / m_sel, q[k_sel, js, rest_m])
            pmax[i, js, m] = np.maximum(p[kk], pmax[k_sel, js, rest_m])
            mfix[i, js, m] = np.maximum(mem[kk, mm] + per_flight[kk], mfix[k_sel, js, rest_m])
            mslope[i, js, m] = np.maximum(per_flight[kk] / m_sel, mslope[k_sel, js, rest_m])
            arg_k[i, js, m] = k_sel
            arg_m[i, js, m] = m_sel
    # best over the devices of one unit (fewer devices allowed inside a unit only if asked)
    ms = np.arange(1, units + 1) if o.allow_fewer_devices else np.array([units])
    pick = ms[value[:, :, ms].argmin(axis=2)]
    take = np.take_along_axis
    pick3 = pick[:, :, None]
    return _Table(
        value=take(value, pick3, 2)[..., 0],
        param_per_replica=take(q, pick3, 2)[..., 0],
        param_max=take(pmax, pick3, 2)[..., 0],
        mem_fixed=take(mfix, pick3, 2)[..., 0],
        mem_slope=take(mslope, pick3, 2)[..., 0],
        arg_k=arg_k,
        arg_m=arg_m,
        devices=pick,
    )


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
        InfeasibleError: No plan fits; the message names what would.
    """
    topo = cost.topology
    if len(topo.levels) > 2:
        raise InfeasibleError(
            f"topologies of {len(topo.levels)} levels are not supported by the planner cost "
            "model's DP yet; describe the machine as two levels (devices per node, nodes)"
        )
    units = topo.levels[0].devices
    limit = COARSE_STATES.get(units, max(100, int(1600 / max(units, 1) ** 0.5)))
    if len(space) <= limit:
        result = _solve_on(cost, space)
        if result is None:
            from planner.optimize.dp import _infeasible

            raise _infeasible(cost, space)
        return result
    tables = DownsetTables.from_masks(cost, space.masks)
    keep = _coarse(tables, limit)
    best = None
    for _ in range(3):  # coarse, then refine around the cuts the plan uses
        result = _solve_on(cost, space.subset(keep))
        if result is None:
            break
        best = result if best is None or result.objective_s < best.objective_s else best
        cuts = _cuts_of(space, result)
        refined = _refine(tables, keep, cuts, limit)
        if set(refined) == set(keep):
            break
        keep = refined
    if best is None:
        from planner.optimize.dp import _infeasible

        raise _infeasible(cost, space)
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
    coarse = keep if len(keep) + len(extra) <= 2 * limit else _coarse(t, limit // 2)
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

    def sync_bound(k, js, mp):
        pm = table.param_max[k, js][:, None]
        across = 2 * pm / bw1 + 2 * units * mp * lat1
        inside = 2 * pm / lv0.bandwidth_bytes_per_s + 2 * units * lv0.latency_s
        return np.where(mp > 1, across, inside)

    def stage(k, js, reps, ds, sync_cap):
        mp = reps[None, :].astype(float)
        b = table.value[k, js][:, None]
        q = table.param_per_replica[k, js][:, None]
        extra = (2 * q / bw1 / mp + 2 * lat1) if pd else 0.0
        body = np.where(mp > 1, b / mp + extra, b)
        time = np.maximum(np.maximum(body, link[k] / mp), link[js][:, None] / mp)
        if np.isfinite(sync_cap):
            time = np.where(sync_bound(k, js, mp) < sync_cap, time, np.inf)
        later = (ds[None, :] - reps[:, None]) * units / reps[:, None]  # (n', d)
        fits = (
            table.mem_fixed[k, js][:, None, None]
            + table.mem_slope[k, js][:, None, None] * np.maximum(later, 0)[None]
            <= cap
        )
        return time, fits

    def sync(k, j, m):
        if pd:
            return 0.0
        return float(sync_bound(k, np.array([j]), np.array([[float(m)]]))[0, 0])

    return stage, sync


def _solve_on(cost: CostModel, space: StateSpace) -> Partition | None:
    """Both levels on ``space``; None when nothing fits."""
    from planner.optimize.dp import search

    topo = cost.topology
    t = DownsetTables.from_masks(cost, space.masks)
    table = _level0_table(cost, t, space.includes, topo.levels[0].devices)
    stage, sync = _group_fns(cost, t, table)
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
    return cost.evaluate(stages, [r for _, _, r, _ in leaves], ranks, solver="dp", optimal=False)
