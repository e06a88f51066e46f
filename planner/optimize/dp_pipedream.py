"""The PipeDream-compatible DP: PipeDream's released optimizer's assumptions, our code.

Reproduces ``optimizer_graph_hierarchical.py`` (msr-fiddle/pipedream) as it runs by default with
``--use_memory_constraint``: its formulas (:class:`planner.optimize.cost.PipeDreamFormulas`), its
antichain states, every device used, and its hierarchy (level ``l``'s best sub-pipelines on all
of its devices become the stage times of level ``l + 1``, whose data-parallel term of a single
stage is divided by the devices below). Written from reading that file; no code taken. One
deliberate difference: at non-final levels PipeDream also combines states that are not nested (it
subtracts prefix sums of incomparable antichains); we only combine nested ones, which changes
nothing on chain-like graphs (VGG16, AlexNet) and keeps every stage a real set of layers.

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> from planner.topology import Topology
    >>> from planner.optimize.cost import CostModel, CostModelKind, SolverOptions
    >>> from planner.optimize.states import build_states
    >>> la = [LayerProfile(name=f"l{i}", op="", forward_ms=10, backward_ms=20, output_bytes=(8,),
    ...                    parameter_bytes=0, inputs=(i - 1,) if i else ()) for i in range(3)]
    >>> c = CostModel(Profile(model="m", batch_size=1, layers=tuple(la)), Topology.from_args(gpus=3),
    ...               SolverOptions(cost_model=CostModelKind.PIPEDREAM))
    >>> solve_pipedream(c, build_states(c.profile, "antichain")).bottleneck_s
    0.03
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from planner.errors import InfeasibleError
from planner.optimize.cost import CostModel, DownsetTables
from planner.optimize.result import Partition, StageAssignment
from planner.optimize.states import StateSpace
from planner.topology import Topology

__all__ = ["nested_ranks", "solve_pipedream"]


@dataclass(frozen=True, kw_only=True)
class _Level:
    value: np.ndarray  # (starts, states, devices + 1)
    arg_k: np.ndarray
    arg_m: np.ndarray  # replicas of the last stage; 0: single stage; -1: fewer devices
    starts: np.ndarray
    devices: int


def solve_pipedream(cost: CostModel, space: StateSpace) -> Partition:
    """PipeDream's optimum (its "time per stage") and the partition it picks.

    Raises:
        InfeasibleError: No partition passes PipeDream's memory check.
    """
    o = cost.options
    topo = cost.topology
    t = DownsetTables.from_masks(cost, space.masks)
    n_states = len(space)
    last = n_states - 1
    comp, act, par = t.compute_s, t.output_bytes, t.parameter_bytes
    frontier = space.frontier_bytes if space.frontier_bytes is not None else t.cut_bytes
    inc = space.includes
    memory = cost.memory_limit_bytes if o.memory_constraint else np.inf
    ratio = o.activation_compression_ratio

    def diff(x: np.ndarray) -> np.ndarray:
        out = x[None, :] - x[:, None]
        return np.where(inc, out, np.nan)

    stage_time = diff(comp)  # level 0: compute of D_j \\ D_i
    act_d, par_d = diff(act), diff(par)
    levels: list[_Level] = []
    within = 1
    for li, lv in enumerate(topo.levels):
        final = li == len(topo.levels) - 1
        level = _solve_level(
            stage_time,
            act_d,
            par_d,
            inc,
            frontier,
            lv.devices,
            lv.bandwidth_bytes_per_s,
            within,
            memory,
            ratio,
            straight=o.straight,
            fewer=o.allow_fewer_devices and final,
            starts=np.array([0]) if final else np.arange(n_states),
        )
        levels.append(level)
        within = lv.devices
        if not final:
            stage_time = np.where(inc, level.value[:, :, lv.devices], np.nan)
    top = levels[-1]
    best = top.value[0, last, top.devices]
    if not np.isfinite(best):
        raise InfeasibleError(
            f"PipeDream's optimizer finds no partition of {cost.profile.model!r} on "
            f"{topo.num_devices} devices within {memory:.4g} bytes each; use more devices, "
            "or turn the memory constraint off"
        )
    tree = _expand(levels, len(levels) - 1, 0, last, top.devices)
    return _partition(cost, space, tree, float(best), t)


def _solve_level(
    stage_time,
    act_d,
    par_d,
    inc,
    frontier,
    devices,
    bandwidth,
    within,
    memory,
    ratio,
    *,
    straight: bool,
    fewer: bool,
    starts: np.ndarray,
) -> _Level:
    n_states = inc.shape[0]
    last = n_states - 1
    value = np.full((len(starts), n_states, devices + 1), np.inf)
    arg_k = np.full(value.shape, -1, dtype=np.int64)
    arg_m = np.zeros(value.shape, dtype=np.int64)
    ct, ad, pdiff = stage_time[starts], act_d[starts], par_d[starts]
    with np.errstate(invalid="ignore"):
        for m in range(1, (1 if straight else devices) + 1):
            # one stage from the start, replicated m times (its dp term divided by `within`)
            stash = np.ceil((devices - m) / m) * (ad + pdiff)
            dp = 4.0 * (m - 1) * pdiff / (bandwidth * m) / within
            v = (ct + dp) / m
            ok = np.isfinite(ct) & (stash <= memory)
            value[:, :, m] = np.where(ok, v, np.inf)
        reps_all = np.arange(1, devices)
        nested = np.where(inc, 1.0, np.nan)
        for m in range(2, devices + 1):
            reps = reps_all[: m - 1] if not straight else reps_all[:1]
            best_v = np.full((len(starts), n_states), np.inf)
            best_k = np.zeros((len(starts), n_states), dtype=np.int64)
            best_r = np.zeros((len(starts), n_states), dtype=np.int64)
            for r in reps:  # last stage k -> j on r devices after a pipeline on m - r
                last_t = (stage_time + 4.0 * (r - 1) * par_d / (bandwidth * r)) / r
                stash = (act_d + par_d) * np.ceil((devices - m) / r)
                last_t = np.where(np.isfinite(stage_time) & (stash <= memory), last_t, np.inf)
                if ratio is not None:
                    last_t = np.maximum(last_t, 2.0 * frontier[:, None] / (bandwidth * r) / ratio)
                    out = np.where(np.arange(n_states) < last, frontier, 0.0)
                    last_t = np.maximum(last_t, 2.0 * out[None, :] / (bandwidth * r) / ratio)
                last_t = np.where(np.isnan(nested), np.inf, last_t)
                last_t[0, :] = np.inf  # a split needs a real state, not the empty root
                prev = value[:, :, m - r]
                if len(starts) == 1:
                    block = np.maximum(prev[0][:, None], last_t)  # (k, j)
                    ks = block.argmin(axis=0)
                    v = block[ks, np.arange(n_states)][None, :]
                    ks = ks[None, :]
                else:
                    v, ks = _minmax_product(prev, last_t)
                # PipeDream scans k, then m': keep the smallest k among equal times
                take = (v < best_v) | ((v == best_v) & (ks < best_k) & np.isfinite(v))
                best_v = np.where(take, v, best_v)
                best_k = np.where(take, ks, best_k)
                best_r = np.where(take, r, best_r)
            if fewer:
                better = value[:, :, m - 1] < value[:, :, m]
                value[:, :, m] = np.where(better, value[:, :, m - 1], value[:, :, m])
                arg_m[:, :, m] = np.where(better, -1, arg_m[:, :, m])
            better = best_v < value[:, :, m]
            value[:, :, m] = np.where(better, best_v, value[:, :, m])
            arg_k[:, :, m] = np.where(better, best_k, arg_k[:, :, m])
            arg_m[:, :, m] = np.where(better, best_r, arg_m[:, :, m])
    # rows are indexed by state; the final level only has the root row
    if len(starts) < n_states:
        full = np.full((n_states, n_states, devices + 1), np.inf)
        full[starts] = value
        ak = np.full(full.shape, -1, dtype=np.int64)
        ak[starts] = arg_k
        am = np.zeros(full.shape, dtype=np.int64)
        am[starts] = arg_m
        value, arg_k, arg_m = full, ak, am
    return _Level(value=value, arg_k=arg_k, arg_m=arg_m, starts=starts, devices=devices)


def _expand(levels: list[_Level], li: int, i: int, j: int, m: int) -> list:
    """The nested plan under ``levels[li]`` from state ``i`` to ``j`` on ``m`` units.

    A pipeline is a list of groups ``(units, sub, start, end, time)``; ``sub`` is the lower
    level's pipeline, or None at level 0 (a stage of ``units`` devices).
    """
    lv = levels[li]
    groups = []
    while True:
        am = int(lv.arg_m[i, j, m])
        if am == -1:
            m -= 1
            continue
        if am == 0:
            start, units = i, m
        else:
            start, units = int(lv.arg_k[i, j, m]), am
        sub = None
        if li > 0:
            below = levels[li - 1]
            sub = _expand(levels, li - 1, start, j, below.devices)
        groups.append((units, sub, start, j))
        if am == 0:
            break
        j, m = start, m - am
    return groups[::-1]


def _partition(
    cost: CostModel, space: StateSpace, tree: list, best: float, t: DownsetTables
) -> Partition:
    leaves, ranks = nested_ranks(cost.topology, tree)
    o = cost.options
    topo = cost.topology
    n0 = topo.levels[0].devices
    stages = []
    used = 0
    for (start, end, replicas, inner_units), rs in zip(leaves, ranks, strict=True):
        layers = space.stage(start, end)
        compute = float(t.compute_s[end] - t.compute_s[start])
        params = float(t.parameter_bytes[end] - t.parameter_bytes[start])
        bw = topo.levels[max(topo.span_level(rs), 0)].bandwidth_bytes_per_s
        dp = 4.0 * (replicas - 1) * params / (bw * replicas)
        used = used % n0 + inner_units
        stash = (float(t.output_bytes[end] - t.output_bytes[start]) + params) * -(
            -(n0 - used) // inner_units
        )
        stages.append(
            StageAssignment(
                layers=tuple(int(x) for x in layers),
                replicas=replicas,
                ranks=rs,
                compute_s=compute,
                comm_s=0.0,
                allreduce_s=dp,
                time_s=(compute + dp) / replicas,
                memory_bytes=stash,
            )
        )
    # PipeDream's objective is its DP value; stage times follow its own flat formula, scaled so
    # the slowest equals the value (its hierarchy shares a group's data-parallel time).
    slowest = max(s.time_s for s in stages)
    scale = best / slowest if slowest > 0 else 1.0
    import dataclasses

    stages = [dataclasses.replace(s, time_s=s.time_s * scale) for s in stages]
    return Partition(
        stages=tuple(stages),
        schedule=o.schedule,
        microbatches=o.microbatches,
        bottleneck_s=best,
        minibatch_s=best * o.microbatches,
        objective_s=best,
        solver="dp",
        optimal=True,
        cost_model=str(o.cost_model),
    )


# --- PipeDream's nested plans --------------------------------------------------------------------


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
