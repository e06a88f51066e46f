"""The exact MILP: stage boundaries, replicas and rank positions in one model (pulp + CBC).

The same problem as the DP (:mod:`planner.optimize.dp`), scored by the same formulas
(:class:`~planner.optimize.cost.CostModel`): stages are the differences of a chain of downsets
``∅ ⊂ D_0 ⊂ D_1 ⊂ ... ⊂ D_{S-1} = all layers`` taken from a state family (the DP's, by default),
stage ``s`` runs on ``m_s`` replicas, ranks are contiguous (:func:`~planner.optimize.cost.contiguous_ranks`),
at most all devices are used (exactly all unless ``allow_fewer_devices``), and every stage fits in
memory when the memory constraint is on. Used as ``--solver ilp`` and to cross-check the DP.

The DP and this model search the same space on any number of levels (chains of downsets, replicas
on contiguous ranks, every level a boundary or an all-reduce crosses known from the ranks), so
the ILP, the DP and the brute-force oracle agree exactly (``tests/optimize/test_properties.py``).
With the ``pipedream`` cost model this model uses the flat reading of PipeDream's formulas that
:meth:`CostModel.evaluate` implements, not PipeDream's level-by-level program.

Formulation. Stage slots ``s = 0..S_max-1`` (``S_max`` = min(devices, layers)); binaries:

* ``b[s, k]``: slot ``s`` ends at downset ``D_k``; ``u[s, i] = Σ_k b[s, k] mask[k, i]`` says
  whether layer ``i`` is in stages ``0..s``, and ``u[s] <= u[s+1]`` makes the chain nested;
* ``q[s, d, m]``: slot ``s`` runs on ranks ``d..d+m-1``; these form a path over rank offsets
  (flow conservation), so the position of every stage, hence every link level, is known;
* ``f[s, T]``: the pipeline ends after slot ``s`` having used ``T`` devices (memory depends on
  the devices from a stage on, ``T - d``; the objective on the stage count ``S``).

Stage sums (compute, parameters, saved bytes, ...) are linear in ``u``; the cut after a slot is
linear in ``b``. Every formula is linear once ``(d, m)``, the neighbour's ``m'`` or ``T`` are fixed,
so each becomes a constraint switched on by the binaries that fix them (big-M with bounds
computed per constraint). The bottleneck ``B`` bounds every stage's time and every link divided by
the smaller replica count of its two stages (``max(L/m_a, L/m_b)``); for ``1f1b``/``gpipe`` a
replica's share is ``ceil(M/m)/M`` instead of ``1/m`` (round-robin: the busiest replica runs
``ceil(M/m)`` microbatches; :func:`~planner.optimize.cost.replica_share`), a constant once ``m`` is
fixed, so the model stays linear; the objective ``(M + S - 1) B + max_s A_s`` is linearised over the possible ``S``. Times are scaled to
the model's total compute and memory to the device memory so that CBC's tolerances are relative.

The model has ``O(S_max (K + N^2))`` binaries and ``O(S_max N^3)`` link constraints for ``K``
states and ``N`` devices: exact and fast for small and medium problems, a cross-check and a
certificate (``optimal=True`` only when CBC proves optimality within the time limit) rather than
a replacement for the DP on thousands of layers or devices.

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> from planner.topology import Topology
    >>> from planner.optimize.cost import CostModel, SolverOptions
    >>> layers = tuple(
    ...     LayerProfile(name=f"l{i}", op="Linear", forward_ms=t, backward_ms=2 * t,
    ...                  output_bytes=(1000,), parameter_bytes=4000, inputs=(i - 1,) if i else ())
    ...     for i, t in enumerate([1.0, 3.0, 1.0, 1.0]))
    >>> cost = CostModel(Profile(model="mlp", batch_size=8, layers=layers),
    ...                  Topology.from_args(gpus=2), SolverOptions(straight=True))
    >>> p = solve(cost, time_limit_s=20)
    >>> [s.layers for s in p.stages], p.optimal, p.solver
    ([(0, 1), (2, 3)], True, 'ilp')
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pulp

from planner.errors import InfeasibleError, PlanError
from planner.optimize.cost import (
    CostModel,
    CostModelKind,
    DownsetTables,
    allreduce_s,
    boundary_link_level,
    in_flight,
    link_s,
    replica_share,
)
from planner.optimize.result import Partition
from planner.optimize.states import StateSpace, build_states
from planner.schedules import Schedule

__all__ = ["DEFAULT_TIME_LIMIT_S", "solve"]

DEFAULT_TIME_LIMIT_S = 60.0


def solve(
    cost: CostModel,
    *,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    states: StateSpace | None = None,
    warm_start: Partition | None = None,
    threads: int = 1,
    verbose: bool = False,
) -> Partition:
    """Solve the partitioning problem of ``cost`` exactly with CBC.

    Args:
        cost: The profile, topology and options (schedule, microbatches, memory, ...).
        time_limit_s: CBC's wall-clock limit. A solution found but not proven optimal by then is
            returned with ``optimal=False``.
        states: The downsets stage boundaries are chosen from, and which may follow which.
            Default: the DP's, :func:`~planner.optimize.states.build_states` of the profile for
            ``cost.options.state_space``.
        warm_start: A partition to start from (e.g. the DP's). Its stages and replicas, on
            contiguous ranks, and the baselines (:mod:`planner.optimize.baselines`) are the
            candidates; the best that fits and lies in the model's space is CBC's first
            incumbent, so the result is never worse than it.
        threads: CBC threads.
        verbose: Print CBC's log.

    Returns:
        The best partition found, scored by :meth:`CostModel.evaluate` (``solver="ilp"``).

    Raises:
        InfeasibleError: CBC proved that no partition fits (usually memory).
        PlanError: No solution was found within the time limit, or CBC failed
            (``pulp.PulpSolverError``); raise the limit or use the DP.

    Example:
        >>> from planner.profile import LayerProfile, Profile
        >>> from planner.topology import Topology
        >>> la = LayerProfile(name="a", op="", forward_ms=5, backward_ms=5, output_bytes=(4,),
        ...                   parameter_bytes=0)
        >>> cost = CostModel(Profile(model="m", batch_size=1, layers=(la,)), Topology.from_args(gpus=2))
        >>> solve(cost).stages[0].replicas   # one layer: data parallel on both devices
        2
    """
    if not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise PlanError(f"ILP time limit must be positive, got {time_limit_s!r} s")
    if states is None:
        states = build_states(cost.profile, cost.options.state_space)
    model = _Model(cost, states)
    started = any(model.warm_start(p) for p in _starts(cost, warm_start))
    with warnings.catch_warnings():  # pulp 3.3 deprecates the bundled CBC's class name only
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(
            msg=verbose,
            timeLimit=time_limit_s,
            threads=threads,
            gapRel=0.0,
            gapAbs=0.0,
            warmStart=started,
        )
    try:
        model.prob.solve(solver)
    except pulp.PulpSolverError as exc:  # CBC crashed or could not run: one line, not a traceback
        detail = " ".join(str(exc).split())[:200]
        raise PlanError(
            f"the ILP solver (CBC) failed: {detail}; use --solver dp (exact on the same plan space)"
        ) from None
    status = model.prob.sol_status
    if status == pulp.LpSolutionInfeasible or (
        status == pulp.LpSolutionNoSolutionFound and model.prob.status == pulp.LpStatusInfeasible
    ):
        raise InfeasibleError(
            f"no partition of {cost.num_layers} layers on {cost.topology.num_devices} devices fits "
            f"in {cost.memory_limit_bytes / 1024**3:.3g} GiB under the {cost.options.schedule} "
            "schedule; use more devices, --recompute or another schedule"
        )
    if status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise PlanError(
            f"the ILP found no solution within {time_limit_s:g} s "
            f"(CBC: {pulp.LpStatus[model.prob.status]}); raise the time limit or use --solver dp"
        )
    stages, replicas = model.solution()
    return cost.evaluate(stages, replicas, solver="ilp", optimal=status == pulp.LpSolutionOptimal)


def _starts(cost: CostModel, given: Partition | None) -> list[Partition]:
    """Candidate incumbents, best first: ``given`` and the baselines, each re-scored on the
    contiguous ranks the model uses (a DP plan on nested ranks keeps its stages and replicas)."""
    from planner.optimize.baselines import baselines

    candidates = [] if given is None else [given]
    candidates += baselines(cost).values()
    out = []
    for p in candidates:
        try:
            again = cost.evaluate([s.layers for s in p.stages], [s.replicas for s in p.stages])
        except PlanError:  # e.g. replicated while the options ask for a straight pipeline
            continue
        if cost.fits(again):
            out.append(again)
    return sorted(out, key=lambda p: p.objective_s)


def _offsets(replicas: list[int]) -> list[int]:
    """First rank of each stage under contiguous ranks."""
    return [int(x) for x in np.cumsum([0, *replicas[:-1]])]


@dataclass(frozen=True)
class _Level:
    bandwidth: float
    latency: float
    ring_bandwidth: float  # of one all-reduce step (Level.ring_bandwidth_bytes_per_s)
    ring_latency: float


class _Model:
    """The pulp problem for one cost model and state family, and reading its solution."""

    def __init__(self, cost: CostModel, states: StateSpace) -> None:
        self.cost = cost
        o = cost.options
        n, num_devices = cost.num_layers, cost.topology.num_devices
        self.n = n
        # row 0 of a state space is the empty set, implicit before slot 0; the last is all layers
        masks, includes = states.masks[1:], states.includes
        self.masks = masks
        full = len(masks) - 1
        cuts = DownsetTables.from_masks(cost, masks).cut_bytes
        self.pipedream = o.cost_model is CostModelKind.PIPEDREAM
        self.levels = [
            _Level(
                lv.bandwidth_bytes_per_s,
                lv.latency_s,
                lv.ring_bandwidth_bytes_per_s,
                lv.ring_latency_s,
            )
            for lv in cost.topology.levels
        ]

        # units: time relative to total compute, memory relative to the device memory
        t_unit = max(float(cost.compute_s.sum()), 1e-12)
        mem_unit = cost.memory_limit_bytes

        slots = min(num_devices, n, len(masks))
        totals = list(range(1, num_devices + 1)) if o.allow_fewer_devices else [num_devices]
        reps = [1] if o.straight else list(range(1, num_devices + 1))
        prob = pulp.LpProblem("partition", pulp.LpMinimize)
        self.prob = prob
        S, K = range(slots), range(len(masks))

        b = {(s, k): prob.add_variable(f"b_{s}_{k}", cat="Binary") for s in S for k in K}
        q = {
            (s, d, m): prob.add_variable(f"q_{s}_{d}_{m}", cat="Binary")
            for s in S
            for d in (range(1) if s == 0 else range(s, num_devices))
            for m in reps
            if d + m <= num_devices
        }
        f = {(s, e): prob.add_variable(f"f_{s}_{e}", cat="Binary") for s in S for e in totals}
        act = [pulp.lpSum(v for (s2, _, _), v in q.items() if s2 == s) for s in S]
        self.b, self.q, self.f = b, q, f
        self.slots, self.totals = slots, totals

        # --- the chain of downsets --------------------------------------------------------
        for s in S:
            prob += pulp.lpSum(b[s, k] for k in K) == 1
        prob += b[slots - 1, full] == 1
        u = [[pulp.lpSum(b[s, k] for k in K if masks[k, i]) for i in range(n)] for s in S]
        # Which state may follow which: set inclusion (enforced through u below), and for
        # PipeDream's antichain states, its DAG's reachability on top.
        f32 = masks.astype(np.float32)
        subset = (f32 @ (~masks).T.astype(np.float32)) == 0
        np.fill_diagonal(subset, False)
        for k in K:
            if not includes[0, k + 1]:
                prob += b[0, k] == 0
        if not np.array_equal(subset, includes[1:, 1:]):
            for s in range(1, slots):
                for j in K:
                    before = [b[s - 1, k] for k in K if includes[k + 1, j + 1]]
                    prob += b[s, j] <= b[s - 1, j] + pulp.lpSum(before)
        for s in S:
            size_s = pulp.lpSum(u[s])
            prev = pulp.lpSum(u[s - 1]) if s else 0
            prob += size_s - prev >= act[s]  # an active slot holds a layer
            prob += size_s - prev <= n * act[s]  # an inactive one none
            if s:
                prob += act[s] <= act[s - 1]
                for i in range(n):
                    prob += u[s - 1][i] <= u[s][i]

        # --- the path over rank offsets ---------------------------------------------------
        prob += act[0] == 1

        def starts(s: int, d: int) -> pulp.LpAffineExpression:
            return pulp.lpSum(v for (s2, d2, _), v in q.items() if s2 == s and d2 == d)

        for s in S:
            for e in range(1, num_devices + 1):
                ends = pulp.lpSum(v for (s2, d, m), v in q.items() if s2 == s and d + m == e)
                nxt = starts(s + 1, e) if s + 1 < slots else 0
                prob += ends == nxt + (f[s, e] if e in totals else 0)

        # --- linear stage sums -----------------------------------------------------------
        def stage_sum(values: np.ndarray, s: int) -> pulp.LpAffineExpression:
            return pulp.lpSum(
                float(values[i]) * (u[s][i] - (u[s - 1][i] if s else 0))
                for i in range(n)
                if values[i]
            )

        compute = [stage_sum(cost.compute_s / t_unit, s) for s in S]
        params = [stage_sum(cost.parameter_bytes, s) for s in S]
        cut = [pulp.lpSum(float(cuts[k]) * b[s, k] for k in K if cuts[k]) for s in S]
        cut_on = [pulp.lpSum(b[s, k] for k in K if cuts[k] > 0) for s in S]
        p_tot, c_tot = float(cost.parameter_bytes.sum()), float(cost.compute_s.sum()) / t_unit
        x_max = float(cuts.max(initial=0.0))

        # has_p[s] = 1 when the stage owns parameters: only then does an all-reduce pay latency
        has_p: list[pulp.LpVariable | float] = [0.0] * slots
        if p_tot > 0 and any(lv.ring_latency > 0 for lv in self.levels):
            has_p = [prob.add_variable(f"p_{s}", cat="Binary") for s in S]
            for s in S:
                prob += (1.0 / p_tot) * params[s] <= has_p[s]
        self.has_p = has_p

        bottleneck = prob.add_variable("B", lowBound=0)
        sync = prob.add_variable("Y", lowBound=0)
        self.topology = cost.topology

        def allreduce_terms(level: int, m: int) -> tuple[float, float]:
            """(seconds per parameter byte, latency seconds) of the planner's all-reduce."""
            if level < 0 or m <= 1:
                return 0.0, 0.0
            lv = self.levels[level]
            return allreduce_s(1.0, m, lv.ring_bandwidth, 0.0), allreduce_s(
                1.0, m, 1.0, lv.ring_latency
            ) - (allreduce_s(1.0, m, 1.0, 0.0))

        # Stage work, disaggregated by placement (no big-M on B): yc[s, d, m] carries slot s's
        # compute and yp[s, d, m] its share of the parameters when it runs on ranks d..d+m-1, so
        # B >= sum over placements of (yc + all-reduce(yp)) / m is exact for an integer q and
        # much tighter than switching one constraint per placement on and off.
        time_bound = 0.0
        work: dict[int, list[pulp.LpAffineExpression]] = {s: [] for s in S}
        device_work: list[pulp.LpAffineExpression] = []  # replicas x stage time, summed
        syncs: dict[int, list[pulp.LpAffineExpression]] = {s: [] for s in S}
        yc_of: dict[int, list[pulp.LpVariable]] = {s: [] for s in S}
        yp_of: dict[int, list[pulp.LpVariable]] = {s: [] for s in S}
        for (s, d, m), var in q.items():
            level = cost.topology.span_level(range(d, d + m))
            yc = prob.add_variable(f"yc_{s}_{d}_{m}", lowBound=0)
            yp = prob.add_variable(f"yp_{s}_{d}_{m}", lowBound=0)
            prob += yc <= c_tot * var
            prob += yp <= var
            yc_of[s].append(yc)
            yp_of[s].append(yp)
            if self.pipedream:
                lv = self.levels[max(level, 0)]
                per_p = 4.0 * (m - 1) / (lv.bandwidth * m) / t_unit * p_tot
                work[s].append((1.0 / m) * (yc + per_p * yp))
                device_work.append(per_p * yp)
                time_bound = max(time_bound, (c_tot + per_p) / m)
                ratio = o.activation_compression_ratio
                if ratio is not None:
                    per_x = 2.0 / (lv.bandwidth * m * ratio) / t_unit
                    for x in [cut[s]] + ([cut[s - 1]] if s else []):
                        prob += bottleneck >= per_x * x - per_x * x_max * (1 - var)
                    time_bound = max(time_bound, per_x * x_max)
                continue
            per_p, lat = allreduce_terms(level, m)
            per_p, lat = per_p / t_unit * p_tot, lat / t_unit
            ar: pulp.LpAffineExpression = per_p * yp
            if lat > 0 and p_tot > 0:
                hp = prob.add_variable(f"hp_{s}_{d}_{m}", lowBound=0)
                prob += hp >= var + has_p[s] - 1
                ar = ar + lat * hp
            if o.schedule is Schedule.PIPEDREAM:
                work[s].append((1.0 / m) * (yc + ar))
                device_work.append(ar)
                time_bound = max(time_bound, (c_tot + per_p + lat) / m)
            else:
                # a constant for a placement: the busiest of m round-robin replicas runs
                # ceil(M / m) of the M microbatches (cost.replica_share)
                share = replica_share(o.schedule, m, o.microbatches)
                work[s].append(share * yc)
                syncs[s].append(ar)
                time_bound = max(time_bound, c_tot * share)
        for s in S:
            prob += pulp.lpSum(yc_of[s]) == compute[s]
            prob += pulp.lpSum(yp_of[s]) == (1.0 / max(p_tot, 1.0)) * params[s]
            prob += bottleneck >= pulp.lpSum(work[s])
            if syncs[s]:
                prob += sync >= pulp.lpSum(syncs[s])
        # A valid cut that the relaxation misses: the devices' busy time covers all the work,
        # N B >= sum_s m_s time_s >= total compute + all-reduce work (tight for balanced plans).
        prob += num_devices * bottleneck >= c_tot + pulp.lpSum(device_work)

        # links between consecutive slots (planner model): max(L share(m_a), L share(m_b)) <= B
        if not self.pipedream:
            for (s, d, m), var in q.items():
                e = d + m
                for m2 in reps:
                    nxt = q.get((s + 1, e, m2))
                    if nxt is None:
                        continue
                    level = boundary_link_level(cost.topology, range(d, e), range(e, e + m2))
                    if level < 0:
                        continue
                    lv = self.levels[level]
                    # link_s is affine in the bytes when they are positive: per byte, fixed part
                    per_x = link_s(1.0, lv.bandwidth, 0.0)
                    lat = (link_s(1.0, lv.bandwidth, lv.latency) - per_x) / t_unit
                    per_x /= t_unit
                    # the narrower side's share (cost.replica_share is non-increasing in m)
                    scale = replica_share(o.schedule, min(m, m2), o.microbatches)
                    big = scale * (per_x * x_max + lat)
                    prob += bottleneck >= scale * (per_x * cut[s] + lat * cut_on[s]) - big * (
                        2 - var - nxt
                    )
                    time_bound = max(time_bound, big)

        # --- memory ------------------------------------------------------------------------
        if o.memory_constraint:
            self._memory(q, f, totals, params, cut, stage_sum, mem_unit, x_max, p_tot)

        # --- objective ---------------------------------------------------------------------
        if o.schedule is Schedule.PIPEDREAM:
            prob += bottleneck
        else:
            z = prob.add_variable("Z", lowBound=0)
            microbatches = o.microbatches
            y_bound = (
                0.0
                if self.pipedream
                else max(
                    (
                        allreduce_s(p_tot, m, lv.ring_bandwidth, lv.ring_latency)
                        for lv in self.levels
                        for m in reps
                    ),
                    default=0.0,
                )
                / t_unit
            )
            for s in S:
                stages_here = pulp.lpSum(f[s, e] for e in totals)  # S = s + 1 stages
                big = (microbatches + slots - 1) * time_bound + y_bound
                prob += z >= (microbatches + s) * bottleneck + sync - big * (1 - stages_here)
            prob += z
        prob += bottleneck <= time_bound

    def _memory(self, q, f, totals, params, cut, stage_sum, mem_unit, x_max, p_tot) -> None:  # type: ignore[no-untyped-def]
        cost, o, prob = self.cost, self.cost.options, self.prob
        buffers = [stage_sum(cost.buffer_bytes / mem_unit, s) for s in range(len(params))]
        saved = [stage_sum(cost.saved_bytes / mem_unit, s) for s in range(len(params))]
        outputs = [stage_sum(cost.output_bytes / mem_unit, s) for s in range(len(params))]
        b_tot = float(cost.buffer_bytes.sum()) / mem_unit
        s_tot = float(cost.saved_bytes.sum()) / mem_unit
        o_tot = float(cost.output_bytes.sum()) / mem_unit
        p_rel = [p * (1.0 / mem_unit) for p in params]
        p_tot_rel = p_tot / mem_unit
        x_rel = x_max / mem_unit
        for (s, d, m), var in q.items():
            for total in totals:
                if total < d + m:
                    continue
                t_var = pulp.lpSum(f[s2, total] for s2 in range(s, len(params)))
                if self.pipedream:
                    copies = -(-(total - d - m) // m)
                    mem = copies * (outputs[s] + p_rel[s])
                    big = copies * (o_tot + p_tot_rel)
                else:
                    flight = in_flight(o.schedule, total - d, m, o.microbatches)
                    versions = flight if o.schedule is Schedule.PIPEDREAM else 1
                    weights = (versions + 1 + cost.optimizer_factor) * p_rel[s] + buffers[s]
                    big = (versions + 1 + cost.optimizer_factor) * p_tot_rel + b_tot
                    if o.recompute:
                        inp = cut[s - 1] * (1.0 / mem_unit) if s else 0
                        mem = weights + flight * inp + saved[s]
                        big += flight * x_rel + s_tot
                    else:
                        mem = weights + flight * saved[s]
                        big += flight * s_tot
                if big <= 1.0:
                    continue
                prob += mem <= 1.0 + (big - 1.0) * (2 - var - t_var)

    def warm_start(self, partition: Partition) -> bool:
        """Set ``partition``'s stages and replicas (on contiguous ranks) as CBC's initial
        solution; False if they are not a solution of this model."""
        o, n = self.cost.options, self.cost.topology.num_devices
        replicas = [st.replicas for st in partition.stages]
        total, stages = sum(replicas), len(replicas)
        if (
            stages > self.slots
            or total > n
            or (not o.allow_fewer_devices and total != n)
            or (o.straight and any(m != 1 for m in replicas))
        ):
            return False
        row_of = {mask.tobytes(): k for k, mask in enumerate(self.masks)}
        mask = np.zeros(self.n, dtype=bool)
        chosen: list[int] = []
        for st in partition.stages:
            mask[list(st.layers)] = True
            k = row_of.get(mask.tobytes())
            if k is None:
                return False
            chosen.append(k)
        chosen += [chosen[-1]] * (self.slots - stages)
        values: dict[pulp.LpVariable, float] = {}
        for (s, k), var in self.b.items():
            values[var] = float(chosen[s] == k)
        starts = _offsets(replicas)
        for (s, d, m), var in self.q.items():
            values[var] = float(s < stages and starts[s] == d and replicas[s] == m)
        for (s, e), var in self.f.items():
            values[var] = float(s == stages - 1 and e == total)
        for s, var in enumerate(self.has_p):
            if isinstance(var, pulp.LpVariable):
                layers = partition.stages[s].layers if s < stages else ()
                values[var] = float(any(self.cost.parameter_bytes[i] > 0 for i in layers))
        for var, value in values.items():
            var.setInitialValue(value)
        return True

    def solution(self) -> tuple[list[list[int]], list[int]]:
        """(stages, replicas) of the solved model."""
        chosen = sorted((s, d, m) for (s, d, m), v in self.q.items() if (v.value() or 0.0) > 0.5)
        stages, replicas = [], []
        prev = np.zeros(self.n, dtype=bool)
        for s, _, m in chosen:
            k = max(
                (k for (s2, k) in self.b if s2 == s),
                key=lambda k: self.b[s, k].value() or 0.0,
            )
            mask = self.masks[k]
            stages.append([int(i) for i in np.flatnonzero(mask & ~prev)])
            replicas.append(m)
            prev = mask
        return stages, replicas
