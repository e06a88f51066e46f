"""Fewest devices per state under a trial bound: the DP's device windows and its floor.

For a trial bound ``b`` on the slowest stage, every stage ``k -> j`` needs some number of
replicas, and a suffix (or prefix) of the pipeline needs the sum of its stages'. The fewest
devices any suffix from state ``k`` needs, ``g(k)``, and any prefix up to ``k``, ``h(k)``, are
shortest paths over the state graph, one pass each, with no device axis. A cell ``(k, r)`` of the
kernel (:mod:`planner.optimize.dp_kernel`: the suffix from ``k`` on the last ``r`` of ``T``
ranks) lies on a plan that starts at rank 0 only if ``g(k) <= r <= T - h(k)``: the kernel keeps
only that window. Near the optimum the windows are narrow (a plan of slowest stage close to the
best needs close to all devices), which is what makes a thousand devices tractable.

The counts are a *relaxation*, so the windows never drop a cell some plan uses. On several
levels they run over the residue of each stage's first rank modulo one outermost unit: a stage's
all-reduce is charged at its exact level, its links at the least level its own ranks force (the
neighbour may push them higher). Microbatches in flight are counted with the fewest devices the
rest can take (in flight only grows with devices from here). A stage's replicas up to one unit
are tried one by one; above, every level is the outermost, the tests without the all-reduce's
latency are monotone and bisected, and the first ``_SCAN`` counts from there are tried exactly
(beyond them the count stays a lower bound). On one level nothing is relaxed but that scan.

:func:`floor_bound` bisects on ``b`` for the smallest bound whose fewest devices fit in ``N``:
no plan has a slowest stage below it, a lower bound the DP uses to start its trial bounds and to
bound the stage counts worth tracking (``(M + S - 1) x floor <= objective``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.optimize.dp_kernel import REL, Problem, Windows, flights, link_level, share

__all__ = ["Pairs", "fewest_devices", "floor_bound"]

#: :func:`floor_bound` follows its estimates while the bracket is wider than this many tolerances.
_WIDE = 8
#: Replica counts tried above ``compute / b`` per stage (beyond, the count is a lower bound).
_SCAN = 16


@dataclass(frozen=True)
class Pairs:
    """Every stage ``k -> j`` of the state space, flat (sorted by ``k``), with what its
    relaxed time and memory read."""

    k: np.ndarray
    j: np.ndarray
    start: np.ndarray  # per state: its first pair (pairs of state k: start[k] .. start[k + 1])
    compute: np.ndarray
    params: np.ndarray
    base: np.ndarray  # memory that does not grow with microbatches in flight
    per_flight: np.ndarray
    link_in: np.ndarray  # (levels, pairs): seconds per microbatch on the link into the stage
    link_out: np.ndarray  # at the cheapest level from each level out (0 without bytes)

    @staticmethod
    def of(p: Problem) -> Pairs:
        t = p.t
        n_states = len(t.compute_s)
        counts = np.array([len(s) for s in p.succ], dtype=np.int64)
        k = np.repeat(np.arange(n_states), counts)
        j = np.concatenate(p.succ).astype(np.int64) if counts.sum() else np.zeros(0, np.int64)
        params = t.parameter_bytes[j] - t.parameter_bytes[k]
        saved = t.saved_bytes[j] - t.saved_bytes[k]
        o_fac = 1 + (0 if p.pipedream else 1) + p.optimizer_factor
        base = params * o_fac + (t.buffer_bytes[j] - t.buffer_bytes[k])
        base = base + (saved if p.recompute else 0.0)
        per_flight = (params if p.pipedream else 0.0) + (t.cut_bytes[k] if p.recompute else saved)
        levels = range(p.levels)
        return Pairs(
            k=k,
            j=j,
            start=np.concatenate([[0], np.cumsum(counts)]),
            compute=t.compute_s[j] - t.compute_s[k],
            params=params,
            base=base,
            per_flight=np.broadcast_to(per_flight, k.shape).astype(float),
            link_in=np.stack([_link(p, np.where(k > 0, t.cut_bytes[k], 0.0), lv) for lv in levels]),
            link_out=np.stack([_link(p, t.cut_bytes[j].astype(float), lv) for lv in levels]),
        )


def _passes(
    p: Problem,
    q: Pairs,
    idx: np.ndarray | slice,
    m: np.ndarray,
    limit: float,
    rest: np.ndarray | None,
    *,
    latency: bool,
    levels: tuple[int, int, int],
) -> np.ndarray:
    """Whether stages ``idx`` on ``m`` replicas pass the relaxed tests under ``limit``.

    ``levels``: (link in, link out, all-reduce); each is charged at the cheapest level from
    that one out. Without ``latency`` the all-reduce's latency term is left out: at fixed
    levels every test is then monotone in ``m`` from 2 replicas on (compute, links and the
    all-reduce's bandwidth term per replica all shrink with ``m``, and so do microbatches in
    flight), so it can be bisected. ``rest``: per stage, fewest devices after it (None: memory
    unchecked).
    """
    body = q.compute[idx]
    if p.pipedream:  # the all-reduce is part of the stage's time
        params = q.params[idx]
        ring = 2 * (m - 1) / m * params / np.max(p.ring_bandwidth[levels[2] :])
        if latency:
            ring = ring + 2 * (m - 1) * np.min(p.ring_latency[levels[2] :])
        body = body + np.where((m > 1) & (params > 0), ring, 0.0)
    slowest = np.maximum(body, q.link_in[levels[0]][idx])
    slowest = np.maximum(slowest, q.link_out[levels[1]][idx])
    ok = (slowest * share(p, m) <= limit) & (m <= p.max_replicas)
    if rest is not None:
        ok &= _fits(p, q, idx, m, rest)
    return ok


def _fits(p: Problem, q: Pairs, idx, m: np.ndarray, rest) -> np.ndarray:
    """Whether stages ``idx`` on ``m`` replicas fit in memory with ``rest`` devices after them."""
    rest = np.broadcast_to(np.asarray(rest, dtype=float), np.shape(m))
    known = np.isfinite(rest)
    in_flight = flights(p, m, m + np.where(known, rest, 0.0))
    return known & (q.base[idx] + q.per_flight[idx] * in_flight <= p.memory_cap)


def _link(p: Problem, nbytes: np.ndarray, level: int) -> np.ndarray:
    bandwidth, latency = np.max(p.bandwidth[level:]), np.min(p.latency[level:])
    return np.where(nbytes > 0, 2 * (latency + nbytes / bandwidth), 0.0)


def _levels(p: Problem, first: int, m: int) -> tuple[int, int, int]:
    """The levels of a stage on ranks ``first .. first + m - 1`` (``first`` up to whole
    outermost units): its link in reaches at least the level of ranks ``first - 1`` and
    ``first + m - 1`` (the next stage may push it higher), its link out that of ``first`` and
    ``first + m``, its all-reduce exactly that of ``first`` and ``first + m - 1``."""
    x = first + (p.blocks[-1] if p.blocks else 1)  # keep ``first - 1`` non-negative
    return (
        int(link_level(x - 1, x + m - 1, p.blocks)),
        int(link_level(x, x + m, p.blocks)),
        int(link_level(x, x + m - 1, p.blocks)),
    )


@dataclass
class _Counts:
    """Per stage (pair), the fewest replicas by where it starts: ``small[m - 1, ρ]`` whether
    ``m`` replicas (``m`` up to one outermost unit ``P``) pass when the stage starts at residue
    ``ρ``; ``large`` the fewest above ``P`` (at the outermost level wherever it lies; a lower
    bound), inf where none."""

    small: np.ndarray  # (P, P, pairs) bool
    large: np.ndarray  # (pairs,)


def _counts(
    p: Problem, q: Pairs, scale: float, g: np.ndarray | None, timed: _Counts | None = None
) -> _Counts:
    """:class:`_Counts` under the bound ``1 / scale``; ``g``: per state and residue the fewest
    devices of a suffix (memory is checked with them), None: memory unchecked. ``timed``: the
    counts without memory under the same bound, whose small counts are reused."""
    limit = 1.0 / scale if scale > 0 else np.inf
    period = p.blocks[-1] if p.blocks else 1
    top = min(p.max_replicas, p.devices)
    n = len(q.k)
    everyone = slice(None)
    if timed is None:
        small = np.zeros((period, period, n), dtype=bool)
        for m in range(1, min(period, top) + 1):
            for rho in range(period):
                small[m - 1, rho] = _passes(
                    p,
                    q,
                    everyone,
                    np.full(n, float(m)),
                    limit,
                    None,
                    latency=True,
                    levels=_levels(p, rho, m),
                )
    else:
        small = timed.small.copy()
    if g is not None:
        for m in range(1, min(period, top) + 1):
            # only stages that could overflow with every device after them are checked
            unsure = np.flatnonzero(~_fits(p, q, everyone, np.full(n, float(m)), top - m))
            for rho in range(period):
                rest = g[q.j[unsure], (rho + m) % period]
                fits = _fits(p, q, unsure, np.full(len(unsure), float(m)), rest)
                small[m - 1, rho, unsure] &= fits
    large = np.full(n, np.inf)
    if period >= top:
        return _Counts(small, large)
    # above one unit every link and all-reduce reaches the outermost level: bisect the tests
    # without the all-reduce's latency (monotone there), whose first pass is a lower bound;
    # then scan up from it with every test. Memory with the rest's fewest devices anywhere.
    outer = (p.levels - 1,) * 3
    rest_all = None if g is None else np.min(g, axis=1)[q.j]
    todo = np.arange(n) if rest_all is None else np.flatnonzero(np.isfinite(rest_all))

    def passes(idx, m, latency):
        rest = None if rest_all is None else rest_all[idx]
        return _passes(p, q, idx, m, limit, rest, latency=latency, levels=outer)

    lo = np.maximum(period + 1.0, np.ceil(q.compute[todo] * scale - REL))
    ok = passes(todo, np.minimum(lo, top), True) & (lo <= top)
    large[todo[ok]] = lo[ok]
    todo, lo = todo[~ok], lo[~ok] + 1
    hi = np.full(len(todo), top + 1.0)  # top + 1: none passes
    while True:
        open_ = lo < hi
        if not open_.any():
            break
        mid = np.where(open_, np.floor((lo + hi) / 2), lo)
        ok = passes(todo, np.minimum(mid, top), False) & (mid <= top)
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid + 1, lo)
    keep = lo <= top
    todo, m0 = todo[keep], lo[keep]
    for step in range(_SCAN):
        if len(todo) == 0:
            break
        m = m0 + step
        ok = passes(todo, m, True)
        large[todo[ok]] = m[ok]
        todo, m0 = todo[~ok], m0[~ok]
    # none of the counts tried passes: the next one is still a lower bound
    beyond = m0 + _SCAN
    large[todo] = np.where(beyond <= top, beyond, np.inf)
    return _Counts(small, large)


def _align(values: np.ndarray, period: int) -> np.ndarray:
    """``out[..., s] = min over ρ' of ((ρ' - s) mod P) + values[..., ρ']``: the fewest extra
    devices (and the value) of moving from residue ``s`` up to some residue ``ρ'``."""
    rho = np.arange(period)
    gap = (rho[None, :] - rho[:, None]) % period  # (s, ρ')
    return np.min(gap + values[..., None, :], axis=-1)


def _suffixes(q: Pairs, c: _Counts) -> np.ndarray:
    """Fewest devices of a suffix from each state, by the residue of its first rank
    (shortest paths, states last to first).

    A stage of ``m <= P`` replicas from residue ``ρ`` leaves the rest at ``(ρ + m) mod P``;
    above ``P`` it takes the fewest count ``L`` or more, ``L + δ``, reaching ``(ρ + L + δ) mod
    P``: per next state, :func:`_align` of its row gives the best ``δ`` for each start.
    """
    period = c.small.shape[0]
    n_states = len(q.start) - 1
    g = np.full((n_states, period), np.inf)
    g[-1] = 0.0
    aligned = np.full((n_states, period), np.inf)
    aligned[-1] = _align(g[-1], period)
    rho = np.arange(period)
    ms = np.arange(1, period + 1)
    after = (rho[None, :] + ms[:, None]) % period  # (m, ρ): the rest's residue
    small = np.moveaxis(c.small, 2, 0)  # (pairs, m, ρ)
    for k in range(n_states - 2, -1, -1):
        a, b = q.start[k], q.start[k + 1]
        if b <= a:
            continue
        js = q.j[a:b]
        rest = g[js][:, after] + ms[None, :, None]  # (pairs, m, ρ)
        best = np.min(np.where(small[a:b], rest, np.inf), axis=(0, 1))
        large = c.large[a:b]
        if np.isfinite(large).any():
            with np.errstate(invalid="ignore"):
                shift = (rho[None, :] + np.where(np.isfinite(large), large, 0)[:, None]) % period
            over = large[:, None] + aligned[js[:, None], shift.astype(np.int64)]
            best = np.minimum(best, np.min(over, axis=0))
        g[k] = best
        aligned[k] = _align(best, period)
    return g


def _prefixes(q: Pairs, c: _Counts) -> np.ndarray:
    """Fewest devices of a prefix from rank 0 up to each state, by their residue (the next
    stage's first rank), states first to last (as :func:`_suffixes`, forwards)."""
    period = c.small.shape[0]
    n_states = len(q.start) - 1
    h = np.full((n_states, period), np.inf)
    h[0, 0] = 0.0
    rho = np.arange(period)
    ms = np.arange(1, period + 1)
    after = (rho[None, :] + ms[:, None]) % period  # (m, ρ)
    small = np.moveaxis(c.small, 2, 0)  # (pairs, m, ρ)
    for k in range(n_states - 1):
        a, b = q.start[k], q.start[k + 1]
        if b <= a or not np.isfinite(h[k]).any():
            continue
        js = q.j[a:b]
        # small counts: (pairs, m, ρ) reach residue after[m, ρ]
        reach = np.where(small[a:b], h[k][None, None, :] + ms[None, :, None], np.inf)
        out = np.full((b - a, period), np.inf)
        for m in range(period):  # after[m] is a permutation of the residues
            out[:, after[m]] = np.minimum(out[:, after[m]], reach[:, m, :])
        large = c.large[a:b]
        if np.isfinite(large).any():
            # from residue ρ with L + δ devices to ρ' = ρ + L + δ: the best ρ and δ for ρ' is
            # _lift of h read at ρ' - L
            lifted = _lift(h[k], period)
            with np.errstate(invalid="ignore"):
                back = (rho[None, :] - np.where(np.isfinite(large), large, 0)[:, None]) % period
            out = np.minimum(out, large[:, None] + lifted[back.astype(np.int64)])
        np.minimum.at(h, js, out)
    return h


def _lift(values: np.ndarray, period: int) -> np.ndarray:
    """``out[t] = min over ρ of values[ρ] + ((t - ρ) mod P)``: the fewest devices of reaching
    residue ``t`` from some ``ρ`` with ``(t - ρ) mod P`` more."""
    rho = np.arange(period)
    gap = (rho[:, None] - rho[None, :]) % period  # (t, ρ)
    return np.min(values[None, :] + gap, axis=1)


def _fewest(p: Problem, q: Pairs, bound: float) -> tuple[_Counts, np.ndarray]:
    """Per pair the fewest replicas and per state and residue the fewest devices of a suffix."""
    limit = bound * (1 + REL)
    scale = 1.0 / limit if np.isfinite(limit) and limit > 0 else 0.0
    c = _counts(p, q, scale, None)
    if np.isfinite(p.memory_cap):
        # memory too, in flight counted with the rest's fewest devices by time alone (a lower
        # bound on the rest's true count, so in flight is never overcounted)
        c = _counts(p, q, scale, _suffixes(q, c), timed=c)
    return c, _suffixes(q, c)


def fewest_devices(p: Problem, bound: float, pairs: Pairs | None = None) -> Windows:
    """Per state, the fewest devices of a suffix from it and of a prefix up to it (a plan
    starting at rank 0) with every stage at most ``bound`` (inf where none), both lower bounds
    (module docstring); and per state the next states of stages some plan on at most
    ``p.devices`` devices can take (fewest before + the stage's fewest + fewest after)."""
    q = pairs if pairs is not None else Pairs.of(p)
    c, g = _fewest(p, q, bound)
    h = _prefixes(q, c)
    suffix, prefix = np.min(g, axis=1), np.min(h, axis=1)
    any_start = c.small.any(axis=1)  # (m, pairs): m replicas pass from some residue
    least = np.where(any_start.any(axis=0), np.argmax(any_start, axis=0) + 1.0, c.large)
    alive = prefix[q.k] + least + suffix[q.j] <= p.devices
    succ = [
        q.j[q.start[k] : q.start[k + 1]][alive[q.start[k] : q.start[k + 1]]] for k in range(len(g))
    ]
    return Windows(suffix=suffix, prefix=prefix, succ=succ)


def floor_bound(
    p: Problem, ceiling: float = np.inf, *, pairs: Pairs | None = None, tolerance: float = 2e-3
) -> float:
    """A lower bound on the slowest stage of any plan on at most ``p.devices`` devices, within
    ``tolerance`` of the smallest bound the relaxation (module docstring) allows.

    Each relaxation ``d(b)`` (fewest devices under ``b``) falls about as ``1 / b``, so
    ``b d(b) / N`` estimates where it reaches ``N``: while the bracket (a bound that does not fit
    is a lower bound) is wide, the next bound tried is the last one's estimate when it lies
    inside, else the bracket is bisected. The estimates land within a percent or so of the floor
    (``d`` moves in steps), so a few relaxations settle it.
    """
    q = pairs if pairs is not None else Pairs.of(p)
    work = float(p.t.compute_s[-1])
    n = p.devices
    lo = work / n  # no plan beats perfect balance
    if lo <= 0:
        return 0.0

    def fewest(b: float) -> float:
        return float(_fewest(p, q, b)[1][0, 0])

    need = fewest(lo)
    if need <= n:
        return lo
    hi = np.inf
    if np.isfinite(ceiling) and ceiling > lo and fewest(ceiling) <= n:
        hi = ceiling
    estimate = lo * need / n if np.isfinite(need) else 2 * lo
    while hi > lo * (1 + tolerance):
        if not np.isfinite(hi):  # no bound fits yet: look above
            guess = max(estimate, lo * (1 + tolerance))
            if guess >= ceiling or guess > work * 1e3:
                return lo  # nothing fits below the ceiling: every bound tried is a lower bound
        elif hi > lo * (1 + _WIDE * tolerance) and lo < estimate < hi:
            guess = estimate
        else:
            guess = (lo + hi) / 2
        at = fewest(guess)
        if at <= n:
            hi = guess
        else:
            lo = guess
        estimate = guess * at / n if np.isfinite(at) else 2 * guess
    return lo
