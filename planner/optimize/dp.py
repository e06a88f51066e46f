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
cap; the optimum's largest all-reduce is below every earlier cap). The next cap is also at most
``F - g`` (``F`` the best objective so far, ``g`` the last plan's objective without its
all-reduce: a plan with a larger all-reduce cannot beat ``F``). Solving again does not start
over: each cell records the largest all-reduce along its chosen suffix, and only the cells whose
suffix the new cap removes are computed again
(:func:`~planner.optimize.dp_kernel.lower_cap`).

Speed: the search is *bounded*. For a trial bound ``b`` on the slowest stage, a stage of compute
``C`` needs ``m >= C / b`` devices, so the devices a suffix can use lie in the window
``[work after / b, T - work before / b]`` and only those cells are stored (flat, per state).
From :data:`WINDOWS_FROM` devices on the windows are narrowed to ``[g, T - h]``, the fewest
devices any suffix (prefix) under ``b`` needs by a shortest path over the states that relaxes
only where a stage's links lie (:mod:`planner.optimize.windows`), and the first trial bound is
1% above the *floor*, the smallest bound whose fewest devices fit (bisected); bounds then grow
in doubling steps (1%, 2%, 4%, ... at most 25%): near the optimum the windows are a few devices
wide. Below, ``b`` starts at 1.1 x the perfect balance ``total work / N`` and grows by 1.25x.
``pipedream``: the first plan found is optimal (every plan not searched has a stage slower than
``b``). ``1f1b``/``gpipe``: a plan of objective ``F`` found under ``b`` is optimal once
``F <= M b`` (a plan with a stage slower than ``b`` costs more than ``M b``), or once
``F <= (M + 1) b`` when no one-stage plan costs less than ``F`` (a plan of two stages or more
with a stage slower than ``b`` costs more than ``(M + 1) b``); otherwise ``b`` becomes ``F / M``
(or ``F / (M + 1)``, or the next step if that is lower, unless the tables there cost more than
twice the step's: :func:`~planner.optimize.dp_kernel.kernel_work`) and one more search certifies
it. Stage counts that cannot beat the best objective found (or reach the best baseline's),
``(M + S - 1) x floor > F``, are not tracked, and neither are all-reduces of ``F - M x floor`` or
more (``floor``: the larger of the floor and ``total work / N``); the first table of a total
tracks 16 stage counts, doubled while the best plan allows more. With idle devices allowed a
flushed stage takes at most ``M + P - 1`` replicas (``P`` devices per outermost unit; past ``M``
a replica adds only all-reduce, :func:`~planner.optimize.dp_kernel.build_problem`).

Budget: a solve computes at most :data:`WORK_BUDGET` candidate cells once it holds a plan; past
that it returns its best plan with ``optimal`` false and a note, and the certificate
(:mod:`planner.optimize.bounds`) says how far it may be from the best.

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

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from planner.errors import PlanError
from planner.optimize.cost import CostModel, CostModelKind
from planner.optimize.dp_kernel import (
    REL,
    Problem,
    Tables,
    Windows,
    allreduce_seconds,
    build_problem,
    exact_variant,
    kernel,
    kernel_work,
    link_level,
    loose_variant,
    lower_cap,
)
from planner.optimize.dp_pipedream import solve_pipedream
from planner.optimize.feasibility import LazyInfeasibleError, check_fits, explain_infeasible
from planner.optimize.refine import NARROW, WIDE, band_space
from planner.optimize.result import Partition
from planner.optimize.states import StateSpace, build_states
from planner.optimize.windows import Pairs, fewest_devices, floor_bound
from planner.schedules import Schedule

__all__ = ["MAX_DEVICES", "WINDOWS_FROM", "WORK_BUDGET", "Found", "search", "solve"]

#: Devices the DP plans for at most; beyond, its tables would not fit in memory anyway.
MAX_DEVICES = 65_536
#: From this many devices on, the search starts just above the floor and keeps only the cells
#: inside the fewest-devices windows (:mod:`planner.optimize.windows`); below, the tables are
#: small and the windows would cost more than they save.
WINDOWS_FROM = 32
#: Candidate cells (:func:`~planner.optimize.dp_kernel.kernel_work`) one :func:`solve` computes
#: at most once it holds a plan, refinement included (7-14 s here, by case). Past it the search
#: returns its best plan unproven, with a note (the certificate, :mod:`planner.optimize.bounds`,
#: gives its gap); below it every answer is exact for its space. Flushed schedules reach it on
#: 1,024 devices with 1,024 microbatches (well before the proof) and on GNMT at 2x8; NASNet-like
#: cells on 8x8 stay below it (4.3e8).
WORK_BUDGET = 6e8


def solve(cost: CostModel, *, states: StateSpace | None = None) -> Partition:
    """The best partition for ``cost`` (its profile, topology and options).

    Args:
        cost: The cost model; its options select schedule, memory constraint, cost model, ...
        states: A state space to search; default :func:`build_states` of ``options.state_space``
            (``auto``, or PipeDream's antichains for the ``pipedream`` cost model).

    Returns:
        The optimum over the state space and contiguous ranks, scored by
        :meth:`CostModel.evaluate` (``solver="dp"``, ``optimal=True``); on a thinned space,
        then improved over the states thinning dropped near its boundaries (:func:`_refine`).

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
    budget = _Budget(WORK_BUDGET)
    found = search(cost, space, budget=budget)
    if found is None:
        raise LazyInfeasibleError(
            lambda: explain_infeasible(cost, lambda c: search(c, space) is not None)
        )
    path, proven = found.path, found.proven
    if space.pool is not None and n <= _REFINE_DEVICES:  # thinned: move the boundaries finely
        space, path, refined = _refine(cost, space, path, found.objective, budget)
        proven = proven and refined
    stages = [space.stage(k, j).tolist() for k, j, _ in path]
    replicas = [m for _, _, m in path]
    part = cost.evaluate(stages, replicas, solver="dp", optimal=proven)
    if proven:
        return part
    note = (
        "the DP stopped at its work limit with this plan (its gap is to the lower bound over "
        "every partition)"
    )
    return dataclasses.replace(part, note=f"{part.note}; {note}" if part.note else note)


# --- the search ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """A plan the search found: stages ``[(start state, end state, replicas), ...]`` on
    contiguous ranks from rank 0, and its objective; ``proven``: optimal over the space (false
    when the search stopped at :data:`WORK_BUDGET`)."""

    objective: float
    path: list[tuple[int, int, int]]
    proven: bool = True


def search(
    cost: CostModel,
    space: StateSpace,
    *,
    incumbent: float | None = None,
    budget: _Budget | None = None,
) -> Found | None:
    """The optimal plan over ``space`` (:class:`Found`), or None when nothing fits.

    Stages take contiguous ranks in order from rank 0 (module docstring). ``incumbent``: the
    objective of a plan known to be in the space (default: the best fitting baseline's); when
    given, it is taken to be near the optimum: trial bounds stay below what it implies, and no
    fewest-devices windows are computed (local refinement's dense bands: they cost more there
    than they save).
    ``budget``: the work left (default: a fresh :data:`WORK_BUDGET`).
    """
    p = build_problem(cost, space)
    near = incumbent is not None
    budget = budget if budget is not None else _Budget(WORK_BUDGET)
    return _search(p, _incumbent(cost) if incumbent is None else incumbent, budget, near=near)


#: Rounds of local refinement at most (each one a DP over the bands around the boundaries).
_REFINE_ROUNDS = 4
#: Refinement runs up to this many devices: beyond, plans have so many stages that the bands
#: hold millions of stages (1,024 devices: minutes); the plan on the thinned space stands, and
#: its certificate (:mod:`planner.optimize.bounds`) says how far from the bound it may be.
_REFINE_DEVICES = 256


def _refine(
    cost: CostModel,
    space: StateSpace,
    path: list[tuple[int, int, int]],
    objective: float,
    budget: _Budget,
) -> tuple[StateSpace, list[tuple[int, int, int]], bool]:
    """The plan ``path`` on the thinned ``space``, improved over the states thinning dropped
    near its boundaries (:mod:`planner.optimize.refine`); the space its path indexes; whether
    every round finished within the budget (no round starts once it is spent)."""
    compute = np.asarray(cost.compute_s, dtype=float)
    p_dream = cost.options.schedule is Schedule.PIPEDREAM  # many stages: wide bands pay off
    current = space
    proven = True
    for _ in range(_REFINE_ROUNDS):
        boundaries = [current.masks[j] for _, j, _ in path[:-1]]
        if not boundaries or budget.left <= 0:
            break
        bands = band_space(space, boundaries, compute, WIDE if p_dream else NARROW)
        found = search(cost, bands, incumbent=objective, budget=budget)
        if found is not None and not found.proven:
            proven = False
        if found is None or found.objective >= objective * (1 - 1e-9):
            break
        current, path, objective = bands, found.path, found.objective
    return current, path, proven


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


def _search(p: Problem, incumbent: float, budget: _Budget, *, near: bool = False) -> Found | None:
    work = float(p.t.compute_s[-1])
    n = p.devices
    per_bound = 1 if p.pipedream else p.microbatches  # objective >= per_bound x slowest stage
    # Positions matter modulo the devices of one outermost unit only (levels are translation
    # invariant by whole units), so one run per residue of the total covers every total.
    period = p.blocks[-1] if p.blocks else 1
    totals = list(range(n, max(n - period, 0), -1)) if p.allow_fewer else [n]
    ceiling = incumbent / per_bound * (1 + 1e-6) if np.isfinite(incumbent) else np.inf
    # no plan's slowest stage is below ``floor``; the first trial bound sits just above it
    # with an incumbent close to the optimum (local refinement over bands) windows on the
    # bands' dense state graph cost more than they save
    pairs = Pairs.of(p) if n >= WINDOWS_FROM and not near else None
    if pairs is None:  # few devices: the kernel is cheap without windows
        floor = 0.0
        bound = min(1.1 * work / n, ceiling) if work > 0 else ceiling
    else:
        # to about half a device of slack in the windows: coarse on few devices, fine on many
        tolerance = max(_FLOOR_TOLERANCE, 0.5 / n)
        floor = floor_bound(p, ceiling, pairs=pairs, tolerance=tolerance) if work > 0 else 0.0
        bound = min(floor * (1 + _FIRST_STEP), ceiling) if work > 0 else ceiling
    step = _FIRST_STEP
    windows = _WindowsOf(p, pairs)
    best: Found | None = None
    if pairs is not None and not p.pipedream and work > 0:
        # a good plan first, so that few stage counts and all-reduces are tracked
        best = _quick_plan(p, floor, totals[0], windows, ceiling, budget)
        if best is not None and best.objective < incumbent:
            incumbent = best.objective
            ceiling = min(ceiling, incumbent / per_bound * (1 + 1e-6))
            bound = min(bound, ceiling)
    single = np.inf if p.pipedream else _one_stage_floor(p)
    # with windows the next bound's tables are much larger: finish this one (its best plan
    # bounds the stage counts and all-reduces there) rather than leave as soon as it cannot
    # certify
    early = pairs is None
    while True:
        cert = _certifies(p, bound, single)
        best = _under(
            p, bound, totals, best, ceiling * per_bound, cert, floor, windows, budget, early
        )
        if best is not None and (not best.proven or best.objective <= cert * (1 + REL)):
            return best
        step = min(2 * step, 0.25)
        if best is not None:  # anything better has every stage faster than F (1f1b/gpipe: F / M)
            enough = best.objective / per_bound
            if not p.pipedream and single >= best.objective:  # ... or F / (M + 1)
                enough = best.objective / (per_bound + 1)
            # a plan found under a tight bound may be far from the best (a large all-reduce):
            # growing the bound step by step keeps the windows narrow until F certifies, unless
            # the bound that certifies costs about as little
            step_bound = bound * (1 + step)
            if step_bound < enough and not _much_wider(p, totals[0], step_bound, enough, windows):
                step_bound = enough
            bound = min(enough, step_bound)
            continue
        if not np.isfinite(bound):
            return None
        if bound >= ceiling:  # the incumbent lies outside the space searched: search everything
            ceiling = np.inf
        # the windows of a bound just above the optimum are narrow, those far above it wide:
        # small steps first, doubling (a failed search near the optimum costs little)
        bound = min(bound * (1 + step) if bound > 0 else np.inf, ceiling)
        if bound > max(work, 1e-300) * 1e3:  # links can be slower than all compute: no bound
            bound = np.inf


class _WindowsOf:
    """The fewest-devices windows of each trial bound, computed once per search (None without
    ``pairs``: few devices)."""

    def __init__(self, p: Problem, pairs: Pairs | None) -> None:
        self.p, self.pairs = p, pairs
        self.known: dict[float, Windows] = {}

    def __call__(self, bound: float) -> Windows | None:
        if self.pairs is None:
            return None
        if bound not in self.known:
            self.known[bound] = fewest_devices(self.p, bound, self.pairs)
        return self.known[bound]


def _much_wider(p: Problem, total: int, near: float, far: float, windows: _WindowsOf) -> bool:
    """Whether the tables under bound ``far`` would cost more than twice those under ``near``
    (always, without windows: few devices, where the steps are cheap anyway)."""
    if windows.pairs is None:
        return True
    return kernel_work(p, total, far, 0, windows(far)) > 2 * kernel_work(
        p, total, near, 0, windows(near)
    )


class _Budget:
    """What is left of a search's :data:`WORK_BUDGET` (candidate cells)."""

    def __init__(self, cells: float) -> None:
        self.left = cells

    def spend(self, tab: Tables, before: float = 0.0) -> None:
        self.left -= tab.work - before


def _quick_plan(
    p: Problem, floor: float, total: int, windows: _WindowsOf, ceiling: float, budget: _Budget
) -> Found | None:
    """``1f1b``/``gpipe``: the plan with the fastest slowest stage (the kernel without stage
    counts or all-reduce cap, its bound grown as in :func:`_search`), or None: a plan of the
    space, so an incumbent; on many microbatches usually close to the optimum."""
    period = p.blocks[-1] if p.blocks else 1
    bound, step = floor * (1 + _FIRST_STEP), _FIRST_STEP
    while bound < ceiling * (1 + REL):
        tab = kernel(p, total, bound, 0, np.inf, windows(bound))
        budget.spend(tab)
        root = _root(p, tab, total, 0, period)
        if root is not None:
            g, r, _ = root
            path = _walk(p, tab, total, r, 0, 0)
            slots = p.microbatches + len(path) - 1
            return Found(slots * g + max(_syncs(p, path, total - r), default=0.0), path)
        step = min(2 * step, 0.25)
        bound *= 1 + step
    return None


#: The first trial bound is this much above the floor (:func:`~planner.optimize.windows.floor_bound`).
_FIRST_STEP = 0.01
#: The floor's relative precision at most (on many devices).
_FLOOR_TOLERANCE = 2e-3


def _certifies(p: Problem, bound: float, single: float) -> float:
    """The objective up to which the best plan with every stage at most ``bound`` is optimal.

    A plan not searched has a stage slower than ``bound``: ``pipedream`` costs more than
    ``bound``; ``1f1b``/``gpipe`` more than ``(M + S - 1) x bound``, so more than
    ``(M + 1) x bound`` with two stages or more, and one stage costs at least ``single``
    (:func:`_one_stage_floor`) and more than ``M x bound``.
    """
    if p.pipedream:
        return bound
    m_count = p.microbatches
    return min((m_count + 1) * bound, max(single, m_count * bound))


def _one_stage_floor(p: Problem) -> float:
    """No one-stage plan costs less (``1f1b``/``gpipe``): ``M`` microbatches of the whole model
    on ``m`` replicas plus their all-reduce, at the best position, memory ignored."""
    work = float(p.t.compute_s[-1])
    params = float(p.t.parameter_bytes[-1])
    reps = np.arange(1, min(p.devices, p.max_replicas) + 1)[:, None]
    # positions modulo one outermost unit are all the all-reduce can see
    first = np.arange(p.blocks[-1] if p.blocks else 1)[None, :]
    ar = allreduce_seconds(p, np.array([[params]]), reps, first, first + reps - 1)
    share = (-(-p.microbatches // reps[:, 0])) / p.microbatches
    return float(np.min(p.microbatches * work * share + np.min(ar, axis=1)))


def _under(
    p: Problem,
    bound: float,
    totals: list[int],
    best: Found | None,
    cutoff: float,
    cert: float,
    least: float,
    windows: _WindowsOf,
    budget: _Budget,
    early: bool,
) -> Found | None:
    """The best plan with every stage at most ``bound`` (or ``best`` if that is better).

    ``cutoff``: an objective some plan of the space reaches (a baseline's, with slack), or inf;
    plans above it are not searched. ``cert``: what :func:`_certifies` allows under ``bound``.
    ``least``: a lower bound on every plan's slowest stage (:func:`floor_bound`). ``windows``:
    the fewest-devices windows by bound (they give None with few devices: the kernel's own).
    ``budget``: once it is spent (and a plan is known), the best plan so far is returned with
    ``proven`` false.

    ``1f1b``/``gpipe``: one table per total, filled once and then updated in place under each
    lower all-reduce cap (:func:`~planner.optimize.dp_kernel.lower_cap`). With ``early``, returns
    after the first cap when the plan found already shows that ``bound`` cannot certify
    (objective above ``M x bound``); the caller then searches again under ``objective / M``,
    which certifies in one round.
    """
    work = float(p.t.compute_s[-1])
    m_count = p.microbatches
    n_states = len(p.t.compute_s)
    for total in totals:
        # the slowest stage of any plan on ``total`` devices or fewer is at least this
        floor = max(work / total, least)
        if floor > bound * (1 + REL):
            break
        # what a plan must beat (``best``) or reach (``cutoff``) to matter
        target = min(best.objective if best is not None else np.inf, cutoff)
        if floor * (1 if p.pipedream else m_count) >= target:
            break
        counts, limit, sync_cap = 0, bound, np.inf
        if not p.pipedream and np.isfinite(target):
            # (M + S - 1) x slowest <= target: at most target / floor - M + 1 stages, each at most
            # target / M; and its largest all-reduce is below target - M x floor
            counts = max(1, math.floor(target / floor) - m_count + 1) if floor > 0 else n_states
            limit = min(bound, target / m_count)
            sync_cap = target * (1 + REL) - m_count * floor
        if not p.pipedream:
            counts = min(counts or n_states, total, n_states - 1)
        fewest = windows(limit)
        # many stage counts (many microbatches): fewer first; the plan they give bounds the
        # counts worth tracking, usually below what was tried
        tried = counts if p.pipedream else min(counts, _FIRST_COUNTS)
        while True:
            best, status = _one_total(
                p, total, limit, tried, sync_cap, fewest, best, cert, floor, budget, early
            )
            if status != "done":
                return best
            needed = counts  # no plan yet: any count may hold one
            if best is not None and floor > 0:
                needed = min(counts, max(1, math.floor(best.objective / floor) - m_count + 1))
            if p.pipedream or needed <= tried:
                break
            tried = min(needed, 2 * tried)
    return best


#: Stage counts the first table of a total tracks (``1f1b``/``gpipe``); doubled until the best
#: plan found shows that more stages cannot beat it.
_FIRST_COUNTS = 16


def _one_total(
    p: Problem,
    total: int,
    limit: float,
    counts: int,
    sync_cap: float,
    fewest: Windows | None,
    best: Found | None,
    cert: float,
    floor: float,
    budget: _Budget,
    early: bool,
) -> tuple[Found | None, str]:
    """The best plan on ``total`` devices with at most ``counts`` stages (``1f1b``/``gpipe``)
    under ``limit`` and the all-reduce caps (or ``best``), and how the search ended: ``done``,
    ``early`` (the bound cannot certify; :func:`_under`) or ``budget`` (``proven`` now false)."""
    m_count = p.microbatches
    period = p.blocks[-1] if p.blocks else 1
    if best is not None and kernel_work(p, total, limit, counts, fewest) > budget.left:
        return dataclasses.replace(best, proven=False), "budget"
    tab = kernel(p, total, limit, counts, sync_cap, fewest)
    budget.spend(tab)
    while True:
        root = _root(p, tab, total, counts, period)
        if root is None:
            break
        g, r, c = root
        path = _walk(p, tab, total, r, c, counts)
        syncs = [] if p.pipedream else _syncs(p, path, total - r)
        y = max(syncs, default=0.0)
        if best is None or g + y < best.objective:
            best = Found(g + y, path)
        if p.pipedream or y <= 0 or g >= best.objective:
            break
        if early and g > cert * (1 + REL):
            # every plan left under this bound and cap costs more than g: none certifies,
            # so the caller raises the bound at once
            return best, "early"
        # a plan whose largest all-reduce is at least F - g has objective at least F (it has
        # g or more before it): the next cap is the lower of that and this plan's all-reduce
        f = best.objective  # as for the first fill: stage counts and stages that can beat F
        fewer = max(1, math.floor(f / floor) - m_count + 1) if floor > 0 else counts
        if budget.left <= 0:
            return dataclasses.replace(best, proven=False), "budget"
        before = tab.work
        tab = lower_cap(p, tab, min(y, f - g), bound=f / m_count, counts=min(counts, fewer))
        budget.spend(tab, before)
    return best, "done"


def _root(
    p: Problem, tab: Tables, total: int, counts: int, period: int
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


def _walk(p: Problem, tab: Tables, total: int, r: int, c: int, counts: int):
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
            alpha = int(link_level(first, first + m, p.blocks))
            v = exact_variant(p, lv) if lv == alpha else loose_variant(lv)
        k, r, c = j, r - m, c - 1
    return out


def _syncs(p: Problem, path: list[tuple[int, int, int]], first: int) -> list[float]:
    """Each stage's all-reduce, computed as the kernel does (same floats for the cap)."""
    out = []
    for k, j, m in path:
        params = np.array([p.t.parameter_bytes[j] - p.t.parameter_bytes[k]])[:, None, None]
        reps = np.array([[[m]]])
        out.append(
            float(allreduce_seconds(p, params, reps, np.array([first]), first + reps - 1)[0, 0, 0])
        )
        first += m
    return out
