"""The DP's kernel: one trial bound, one total, every (state, devices from here, incoming link
variant, stage count) cell of the suffix program described in :mod:`planner.optimize.dp`.

Pure numpy: each state's row is a few batches of array operations over (next state, replicas,
devices from here), in chunks of bounded size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.errors import PlanError
from planner.optimize.cost import OPTIMIZER_STATE_FACTOR, CostModel, DownsetTables, SolverOptions
from planner.optimize.states import StateSpace
from planner.schedules import Schedule

__all__ = [
    "REL",
    "Problem",
    "Tables",
    "Windows",
    "allreduce_seconds",
    "build_problem",
    "exact_variant",
    "kernel",
    "kernel_work",
    "link_level",
    "loose_variant",
    "lower_cap",
]

REL = 1e-9  # relative slack for float comparisons against trial bounds
_CHUNK_CELLS = 4_000_000  # candidate cells (next state x replicas x devices x ...) per batch
_TABLE_CELLS = 40_000_000  # stored (state, devices, variant, stage count) cells at most
#: What one batch of array operations costs beyond its cells, in cells (about half a
#: millisecond here): the work a search counts (:attr:`Tables.work`) is cells plus this per batch.
CALL_CELLS = 30_000


@dataclass(frozen=True, kw_only=True)
class Problem:
    """Everything the kernel reads, as arrays."""

    t: DownsetTables
    succ: list[np.ndarray]
    devices: int
    blocks: tuple[int, ...]  # devices per unit of every level but the outermost
    bandwidth: np.ndarray  # per level, of its links
    latency: np.ndarray
    ring_bandwidth: np.ndarray  # per level, of one ring all-reduce step
    ring_latency: np.ndarray
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


def build_problem(cost: CostModel, space: StateSpace) -> Problem:
    o = cost.options
    topo = cost.topology
    n = topo.num_devices
    blocks = tuple(topo.block_size(lv) for lv in range(len(topo.levels) - 1))
    return Problem(
        t=DownsetTables.from_masks(cost, space.masks),
        succ=[np.flatnonzero(space.includes[k]) for k in range(len(space))],
        devices=n,
        blocks=blocks,
        bandwidth=np.array([lv.bandwidth_bytes_per_s for lv in topo.levels]),
        latency=np.array([lv.latency_s for lv in topo.levels]),
        ring_bandwidth=np.array([lv.ring_bandwidth_bytes_per_s for lv in topo.levels]),
        ring_latency=np.array([lv.ring_latency_s for lv in topo.levels]),
        max_replicas=1 if o.straight else _most_replicas(o, n, blocks),
        memory_cap=cost.memory_limit_bytes if o.memory_constraint else np.inf,
        schedule=o.schedule,
        microbatches=o.microbatches,
        optimizer_factor=OPTIMIZER_STATE_FACTOR[o.optimizer],
        recompute=o.recompute,
        allow_fewer=o.allow_fewer_devices,
    )


def _most_replicas(o: SolverOptions, n: int, blocks: tuple[int, ...]) -> int:
    """Replicas one stage needs at most: ``n``; ``1f1b``/``gpipe`` with idle devices allowed,
    ``M + P - 1`` (``P`` devices in one outermost unit, 1 on one level).

    Past ``M`` replicas a flushed stage is no faster (each replica runs ``ceil(M / m) = 1``
    microbatch) and holds one microbatch in flight, so a stage on ``m >= M + P`` replicas can
    give up ``P`` of them: its all-reduce spans fewer ranks (no higher level, fewer ring steps),
    every later stage moves down one whole unit (levels see positions modulo ``P``), every earlier
    one has fewer devices after it (no more in flight), and the plan leaves ``P`` more idle: never
    worse. Without idle devices allowed the plan must use all ``n``, so nothing is capped.
    """
    if o.schedule is Schedule.PIPEDREAM or not o.allow_fewer_devices:
        return n
    return min(n, o.microbatches + (blocks[-1] if blocks else 1) - 1)


def link_level(x, y, blocks: tuple[int, ...]):
    """Level of the link between ranks ``x != y`` (arrays broadcast): levels whose units differ."""
    out = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), dtype=np.int64)
    for b in blocks:
        out += (np.asarray(x) // b) != (np.asarray(y) // b)
    return out


def exact_variant(p: Problem, level: int) -> int:
    return 0 if p.levels == 1 else 2 * level


def loose_variant(level: int) -> int:
    return 2 * level + 1


def _link(p: Problem, nbytes, level: int):
    """cost.link_s at ``level`` (0 without bytes), vectorised over ``nbytes``."""
    nbytes = np.asarray(nbytes, dtype=float)
    return np.where(nbytes > 0, 2 * (p.latency[level] + nbytes / p.bandwidth[level]), 0.0)


def share(p: Problem, reps: np.ndarray) -> np.ndarray:
    """cost.replica_share: 1 / m in steady state; ceil(M / m) / M on a flush's busiest replica."""
    if p.pipedream:
        return 1.0 / reps
    return (-(-p.microbatches // reps)) / p.microbatches


def flights(p: Problem, reps: np.ndarray, from_here: np.ndarray) -> np.ndarray:
    """cost.in_flight, vectorised (``reps`` and ``from_here`` broadcast)."""
    total = -(-p.microbatches // reps)
    if p.schedule is Schedule.GPIPE:
        return np.broadcast_to(total, np.broadcast_shapes(reps.shape, from_here.shape))
    depth = -(-from_here // reps)
    return np.minimum(depth, total) if p.schedule is Schedule.ONE_F_ONE_B else depth


def allreduce_seconds(p: Problem, params: np.ndarray, reps: np.ndarray, first, last):
    """cost.allreduce_s of ``params`` bytes over ranks ``first .. last`` (``reps`` of them)."""
    m = reps.astype(float)
    level = link_level(first, last, p.blocks) if p.levels > 1 else 0
    out = np.zeros(np.broadcast_shapes(np.shape(params), m.shape, np.shape(level)))
    for lv in range(p.levels):
        ring = 2 * (m - 1) / m * params / p.ring_bandwidth[lv] + 2 * (m - 1) * p.ring_latency[lv]
        out = np.where(np.asarray(level) == lv, ring, out) if p.levels > 1 else ring + out
    return np.where((m > 1) & (params > 0), out, 0.0)


# --- the kernel ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    """What the fewest-devices relaxation (:func:`planner.optimize.windows.fewest_devices`)
    allows under a trial bound: per state the fewest devices of a suffix from it and of a prefix
    up to it, and the successors a stage can reach on some plan that fits in ``devices``."""

    suffix: np.ndarray
    prefix: np.ndarray
    succ: list[np.ndarray]


@dataclass
class Tables:
    """Values and choices of every (state, devices from here) cell inside the windows."""

    lo: np.ndarray  # per state: fewest devices from here
    hi: np.ndarray
    offset: np.ndarray  # per state: first row in the flat arrays
    value: np.ndarray  # (cells, variants, counts)
    arg_j: np.ndarray
    arg_m: np.ndarray
    arg_l: np.ndarray
    # 1f1b/gpipe: the largest all-reduce along each cell's chosen suffix (what a cap tests)
    path_y: np.ndarray
    succ: list[np.ndarray]  # per state, the next states tried
    total: int = 0
    limit: float = np.inf
    scale: float = 0.0
    counts: int = 0
    active: int = 0  # stage counts still filled (lower_cap may drop the larger ones)
    work: float = 0.0  # candidate cells computed so far (kernel and lower_cap)

    def rows(self, states: np.ndarray, rs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat rows of cells ``(states, rs)`` (broadcast) and whether they are in the window."""
        lo, hi = self.lo[states], self.hi[states]
        ok = (rs >= lo) & (rs <= hi)
        return np.where(ok, self.offset[states] + rs - lo, 0), ok


def _windows(p: Problem, total: int, bound: float, fewest: Windows | None):
    """Per state the devices ``[lo, hi]`` a suffix from it may use, the next states tried, the
    bound with its float slack and ``1 / limit`` (0 without a bound)."""
    work = p.t.compute_s
    last = len(work) - 1
    limit = bound * (1 + REL)
    scale = 1.0 / limit if np.isfinite(bound) and limit > 0 else 0.0
    lo = np.maximum(np.ceil((work[last] - work) * scale - REL).astype(np.int64), 1)
    hi = np.minimum(total - np.ceil(work * scale - REL).astype(np.int64), total)
    hi[1:] = np.minimum(hi[1:], total - 1)  # a stage before it needs a device
    succ = p.succ
    if fewest is not None:
        suffix, prefix, succ = fewest.suffix, fewest.prefix, fewest.succ
        with np.errstate(invalid="ignore"):
            lo = np.maximum(lo, np.where(np.isfinite(suffix), suffix, total + 1)).astype(np.int64)
            hi = np.minimum(hi, np.where(np.isfinite(prefix), total - prefix, -1)).astype(np.int64)
    lo[last] = hi[last] = 0
    return lo, hi, succ, limit, scale


def _replicas(p: Problem, k: int, js: np.ndarray, most: int, lo: np.ndarray, scale: float):
    """Replica counts a stage ``k -> js`` may take with at most ``most`` devices from ``k`` on:
    enough for its compute within the bound (``1 / scale``), leaving the rest after ``j`` its
    fewest (``lo[j]``); per next state, the first and last (empty when first > last)."""
    work = p.t.compute_s
    r_lo = np.maximum(1, np.ceil((work[js] - work[k]) * scale - REL).astype(np.int64))
    return r_lo, np.minimum(p.max_replicas, most - lo[js])


def kernel_work(
    p: Problem, total: int, bound: float, counts: int, fewest: Windows | None = None
) -> float:
    """The candidate cells :func:`kernel` would compute (what its time grows with): per state,
    each next state's replica range x the state's devices x variants x stage counts, plus
    :data:`CALL_CELLS` per state filled."""
    if bound <= 0:
        return 0.0
    lo, hi, succ, _, scale = _windows(p, total, bound, fewest)
    width = np.maximum(hi - lo + 1, 0)
    per_cell = p.variants * (counts if counts else 1)
    out = 0.0
    for k in np.flatnonzero(width[:-1] > 0):
        js = succ[k]
        if len(js) == 0:
            continue
        r_lo, r_hi = _replicas(p, int(k), js, int(hi[k]), lo, scale)
        span = float(np.clip(r_hi - r_lo + 1, 0, None).sum())
        out += span * int(width[k]) * per_cell + (CALL_CELLS if span > 0 else 0)
    return out


def kernel(
    p: Problem,
    total: int,
    bound: float,
    counts: int,
    sync_cap: float,
    fewest: Windows | None = None,
) -> Tables:
    """Fill the suffix values for ``total`` devices under a trial bound and an all-reduce cap.

    ``counts``: stage counts tracked (``1f1b``/``gpipe``), 0 for the ``pipedream`` objective.
    ``fewest``: per state, the fewest devices a suffix from it and a prefix up to it need under
    ``bound`` (:func:`planner.optimize.windows.fewest_devices`): cells outside
    ``[suffix, total - prefix]`` are on no plan and are not stored, nor tried are stages on no
    plan that fits.
    """
    work = p.t.compute_s
    n_states = len(work)
    last = n_states - 1
    lo, hi, succ, limit, scale = _windows(p, total, bound, fewest)
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
    tab = Tables(
        lo=lo,
        hi=hi,
        offset=offset,
        value=np.full(shape, np.inf),
        arg_j=np.full(shape, -1, dtype=np.int32),
        arg_m=np.zeros(shape, dtype=np.int32),
        arg_l=np.zeros(shape, dtype=np.int8),
        path_y=np.zeros(shape if counts else (0, 1, 1)),
        succ=succ,
        total=total,
        limit=limit,
        scale=scale,
        counts=counts,
        active=counts,
    )
    tab.value[offset[last]] = np.inf
    tab.value[offset[last], :, 0] = 0.0
    for k in range(last - 1, -1, -1):
        if width[k] == 0 or len(succ[k]) == 0:
            continue
        if k == 0 and hi[0] < lo[0]:
            continue
        _fill(p, tab, k, int(lo[k]), int(hi[k]), sync_cap, None)
    return tab


def lower_cap(
    p: Problem, tab: Tables, sync_cap: float, *, bound: float = np.inf, counts: int | None = None
) -> Tables:
    """``tab`` (filled by :func:`kernel`, ``1f1b``/``gpipe``) under a lower all-reduce cap.

    Lowering the cap only removes candidates, so no cell's value decreases. A cell whose chosen
    suffix has every all-reduce below the new cap (``path_y < sync_cap``) therefore keeps its
    value and choice (its suffix is still allowed and nothing else got better); only the other
    cells are computed again, states last to first as in :func:`kernel`, against successors
    that are already final.

    ``bound`` and ``counts`` may also shrink (the caller's best plan improved): cells above the
    bound and stage counts above ``counts`` then become empty (inf) and are not filled again.
    """
    last = len(p.t.compute_s) - 1
    if counts is not None and 0 < counts < tab.active:
        tab.value[:, :, counts + 1 :] = np.inf
        tab.active = counts
    limit = bound * (1 + REL)
    if limit < tab.limit:
        tab.value[tab.value > limit] = np.inf
        tab.limit, tab.scale = limit, 1.0 / limit if limit > 0 else 0.0
    for k in range(last - 1, -1, -1):
        a, b = int(tab.offset[k]), int(tab.offset[k] + tab.hi[k] - tab.lo[k] + 1)
        if b <= a:
            continue
        dirty = np.isfinite(tab.value[a:b]) & (tab.path_y[a:b] >= sync_cap)
        if not dirty.any():
            continue
        tab.value[a:b][dirty] = np.inf
        tab.arg_j[a:b][dirty] = -1
        tab.path_y[a:b][dirty] = 0.0
        at = np.flatnonzero(dirty.any(axis=(1, 2)))
        r_from, r_to = int(tab.lo[k] + at[0]), int(tab.lo[k] + at[-1])
        _fill(p, tab, k, r_from, r_to, sync_cap, dirty[at[0] : at[-1] + 1])
    return tab


def _fill(p, tab, k, r_from, r_to, sync_cap, only) -> None:
    """One state's row: every (devices from here, incoming variant, stage count) cell with
    ``r_from <= devices <= r_to`` (``only``: of those, the cells to write; None for all)."""
    js = tab.succ[k]
    total, limit, scale, counts = tab.total, tab.limit, tab.scale, tab.active
    # the table columns written (stage counts; 0 alone without counts): under lower_cap only
    # those holding a cell to recompute
    cols = np.arange(1, counts + 1) if counts else np.zeros(1, dtype=np.int64)
    if only is not None and counts:
        cols = cols[only[:, :, 1 : counts + 1].any(axis=(0, 1))]
        if len(cols) == 0:
            return
    o_fac = 1 + (0 if p.pipedream else 1) + p.optimizer_factor
    rs = np.arange(r_from, r_to + 1)
    r_lo, r_hi = _replicas(p, k, js, int(rs[-1]), tab.lo, scale)
    keep = r_lo <= r_hi
    if not keep.any():
        return
    js, r_lo, r_hi = js[keep], r_lo[keep], r_hi[keep]
    # bounded memory: next states in chunks of at most _CHUNK_CELLS candidate cells
    per_j = (int((r_hi - r_lo).max()) + 1) * len(rs) * p.variants * len(cols)
    tab.work += float(np.sum(r_hi - r_lo + 1)) * len(rs) * p.variants * len(cols) + CALL_CELLS
    size = max(1, _CHUNK_CELLS // max(per_j, 1))
    for start in range(0, len(js), size):
        part = slice(start, start + size)
        _fill_chunk(
            p,
            tab,
            k,
            js[part],
            r_lo[part],
            r_hi[part],
            rs,
            total,
            limit,
            cols,
            sync_cap,
            o_fac,
            only,
        )


def _fill_chunk(p, tab, k, js, r_lo, r_hi, rs, total, limit, cols, sync_cap, o_fac, only) -> None:
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
    sh = share(p, reps)[:, :, None]
    c = work[js] - work[k]
    params = t.parameter_bytes[js] - t.parameter_bytes[k]
    ar = allreduce_seconds(p, params[:, None, None], m3, first[None, None, :], end - 1)
    body = c[:, None, None] + (ar if p.pipedream else 0.0)
    if np.isfinite(sync_cap):
        body = np.where(ar < sync_cap, body, np.inf)
    # memory (cost.stage_memory_bytes): weights x versions + gradients + optimizer state + ...
    saved = t.saved_bytes[js] - t.saved_bytes[k]
    base = params * o_fac + (t.buffer_bytes[js] - t.buffer_bytes[k])
    base = base + (saved if p.recompute else 0.0)
    per_flight = (params if p.pipedream else 0.0) + (t.cut_bytes[k] if p.recompute else saved)
    per_flight = np.broadcast_to(per_flight, js.shape)
    in_flight = flights(p, m3, rs[None, None, :])
    fits = base[:, None, None] + per_flight[:, None, None] * in_flight <= p.memory_cap
    alive = fits & (rest >= 0) & r_ok[:, :, None]
    # the rest after j: its value under each outgoing level, the best level kept
    rows, in_window = tab.rows(js[:, None, None], np.maximum(rest, 0))
    # (j, w, d, variants, cols); the rest has one stage fewer
    counted = tab.counts > 0
    rest_cols = cols - 1 if counted else cols
    if rest_cols[-1] - rest_cols[0] + 1 == len(rest_cols):  # a slice, then rows: fastest
        rest_values = tab.value[:, :, rest_cols[0] : rest_cols[-1] + 1][rows]
    else:
        rest_values = tab.value[rows][..., rest_cols]
    nxt = np.where((in_window & alive)[..., None, None], rest_values, np.inf)
    alpha = None
    if p.levels == 1:
        out = _link(p, t.cut_bytes[js], 0)[:, None, None] * sh
        tail = np.maximum(out[..., None], nxt[..., 0, :])
        tail_l = np.zeros(tail.shape, dtype=np.int8)
    else:
        alpha = link_level(first[None, None, :], end, p.blocks)  # (j, w, d)
        tail = np.full(nxt.shape[:3] + nxt.shape[4:], np.inf)
        tail_l = np.zeros(tail.shape, dtype=np.int8)
        for lv in range(p.levels):  # the cheapest level, the lowest on ties
            pick = np.where(
                (alpha == lv)[..., None],
                nxt[..., exact_variant(p, lv), :],
                np.where((alpha < lv)[..., None], nxt[..., loose_variant(lv), :], np.inf),
            )
            out = _link(p, t.cut_bytes[js], lv)[:, None, None] * sh
            option = np.maximum(out[..., None], pick)
            lower = option < tail
            tail = np.where(lower, option, tail)
            tail_l[lower] = lv
    tail = np.where(tail <= limit, tail, np.inf)  # the link out counts towards the bound too
    n_d = len(rs)
    d_ix, c_ix = np.arange(n_d)[:, None], np.arange(len(cols))[None, :]  # to read argmin's cells
    base_row = tab.offset[k] + rs[0] - tab.lo[k]
    variants = [0] if k == 0 else range(p.variants)
    beta = (
        link_level(first[None, None, :] - 1, end - 1, p.blocks) if p.levels > 1 and k > 0 else None
    )
    for v in variants:
        if k == 0:
            link_in = 0.0
            valid = alive
        else:
            level_in = v // 2 if p.levels > 1 else 0
            if p.levels > 1 and v == 1:
                continue  # level 0 cannot be promised loosely
            if only is not None and not only[:, v, cols].any():
                continue  # nothing to recompute under this variant
            link_in = float(_link(p, t.cut_bytes[k], level_in))
            valid = alive
            if beta is not None:
                valid = valid & ((beta <= level_in) if v % 2 == 0 else (beta == level_in))
        time = np.maximum(body, link_in) * sh
        time = np.where(valid & (time <= limit), time, np.inf)
        cand = np.maximum(time[..., None], tail)  # (j, w, d, cols): inf or within the bound
        flat = cand.reshape(-1, n_d, cand.shape[-1])
        best = flat.argmin(axis=0)  # (d, cols)
        value = flat[best, d_ix, c_ix]
        bj, bw = np.divmod(best, reps.shape[1])
        chosen_l = tail_l.reshape(-1, n_d, cand.shape[-1])
        chosen_l = chosen_l[best, d_ix, c_ix]
        sl = slice(base_row, base_row + n_d)
        better = value < tab.value[sl, v, cols]  # earlier chunks may hold better cells
        if only is not None:
            better &= only[:, v, cols]
        updates = [
            (tab.value, value),
            (tab.arg_j, js[bj]),
            (tab.arg_m, reps[bj, bw]),
            (tab.arg_l, chosen_l),
        ]
        if counted:
            path_y = _path_y(p, tab, ar, rows, alpha, bj, bw, chosen_l, rest_cols)
            updates.append((tab.path_y, path_y))
        for array, new in updates:
            array[sl, v, cols] = np.where(better, new, array[sl, v, cols])


def _path_y(p, tab, ar, rows, alpha, bj, bw, chosen_l, rest_cols) -> np.ndarray:
    """The largest all-reduce along each chosen suffix: the chosen stage's and its rest's."""
    d = np.arange(bj.shape[0])[:, None]
    col = rest_cols[None, :]  # the rest's column (one stage fewer)
    row = rows[bj, bw, d]
    ar = np.broadcast_to(ar, rows.shape)  # one level: the same at every position
    if p.levels == 1:
        variant = np.zeros_like(row)
    else:
        lv = chosen_l.astype(np.int64)
        variant = np.where(alpha[bj, bw, d] == lv, 2 * lv, 2 * lv + 1)
    return np.maximum(ar[bj, bw, d], tab.path_y[row, variant, col])
