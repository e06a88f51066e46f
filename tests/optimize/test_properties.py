"""Property tests: the DP and the ILP against the brute-force oracle on random small problems.

Random DAGs of 2-7 layers (skip edges and several sources included), topologies of one, two or
three levels with up to 8 devices, every schedule, optimizer, memory limits that bind or no memory
constraint, recomputation, straight pipelines and using fewer devices. The oracle
(``bruteforce.py``) enumerates every chain of the state space, every replication and the
contiguous ranks, and scores each with ``CostModel.evaluate``: the DP and the ILP must EQUAL it.

Each (levels, schedule, memory) combination gets its own examples: 84 in the slow tier (504 per
level count), 8 in the quick tier.
"""

from __future__ import annotations

import math

import pytest
from bruteforce import brute_force, count_candidates
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from planner.errors import InfeasibleError
from planner.optimize import dp, ilp
from planner.optimize.cost import CostModel, CostModelKind, SolverOptions
from planner.optimize.states import build_states
from planner.profile import LayerProfile, Profile
from planner.schedules import PER_STAGE_SCHEDULES, OptimizerKind, Schedule
from planner.topology import Level, Topology

MB = 1_000_000
# Keep one example's enumeration (and the whole file) quick.
MAX_CANDIDATES = 1500


@st.composite
def profiles(draw: st.DrawFn, max_layers: int = 7) -> Profile:
    """A random layer DAG in topological order with small integer-ish costs."""
    n = draw(st.integers(2, max_layers))
    layers = []
    for i in range(n):
        if i == 0:
            inputs: tuple[int, ...] = ()
        else:
            # mostly the previous layer plus maybe skip edges; sometimes a second source
            extra = draw(st.sets(st.integers(0, i - 1), max_size=2))
            base = set() if draw(st.integers(0, 9)) == 0 else {i - 1}
            inputs = tuple(sorted(base | extra))
        forward = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0]))
        saved = draw(st.one_of(st.none(), st.sampled_from([0, 2 * MB, 10 * MB])))
        layers.append(
            LayerProfile(
                name=f"l{i}",
                op="fake",
                forward_ms=forward,
                backward_ms=draw(st.sampled_from([0.0, 1.0, 2.0, 4.0, 9.0])),
                output_bytes=tuple(
                    draw(
                        st.lists(st.sampled_from([0, MB, 4 * MB, 30 * MB]), min_size=1, max_size=2)
                    )
                ),
                parameter_bytes=draw(st.sampled_from([0, MB, 8 * MB, 60 * MB])),
                buffer_bytes=draw(st.sampled_from([0, 0, MB])),
                saved_bytes=saved,
                inputs=inputs,
            )
        )
    return Profile(model="random", batch_size=1, layers=tuple(layers))


@st.composite
def topologies(draw: st.DrawFn, levels: tuple[int, ...] = (1, 2)) -> Topology:
    """One, two or three levels, at most 8 devices, sometimes with latency (inner levels are not
    always the faster ones), memory from tight to ample."""
    count = draw(st.sampled_from(levels))
    if count == 1:
        sizes = [draw(st.integers(1, 6))]
    elif count == 2:
        inner = draw(st.integers(2, 3))
        sizes = [inner, draw(st.integers(2, 6 // inner))]
    else:
        sizes = [2, 2, draw(st.integers(1, 2))]
    bandwidths = ([1e9, 1e10, 1e11], [1e8, 1e9], [1e7, 1e8, 1e9])
    latencies = ([0.0, 0.0, 1e-4], [0.0, 1e-3], [0.0, 1e-4, 1e-3])
    tiers = [
        Level(
            devices=size,
            bandwidth_bytes_per_s=draw(st.sampled_from(bandwidths[i])),
            latency_s=draw(st.sampled_from(latencies[i])),
        )
        for i, size in enumerate(sizes)
    ]
    memory = draw(st.sampled_from([60e6, 150e6, 400e6, 1e9, 1e12]))
    return Topology(levels=tuple(tiers), memory_bytes=memory)


@st.composite
def options(
    draw: st.DrawFn,
    cost_models: tuple[CostModelKind, ...] = (CostModelKind.PLANNER,),
    schedules: tuple[Schedule, ...] = tuple(Schedule),
    memory: tuple[bool, ...] = (True, True, True, False),
) -> SolverOptions:
    return SolverOptions(
        schedule=draw(st.sampled_from(schedules)),
        microbatches=draw(st.integers(1, 8)),
        optimizer=draw(st.sampled_from(list(OptimizerKind))),
        straight=draw(st.integers(0, 5)) == 0,
        allow_fewer_devices=draw(st.booleans()),
        memory_constraint=draw(st.sampled_from(memory)),
        recompute=draw(st.integers(0, 3)) == 0,
        cost_model=draw(st.sampled_from(cost_models)),
    )


def _problem(profile: Profile, topology: Topology, opts: SolverOptions, *, all_placements=False):
    cost = CostModel(profile, topology, opts)
    space = build_states(profile, opts.state_space)
    assume(count_candidates(cost, space, all_placements=all_placements) <= MAX_CANDIDATES)
    return cost, space


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a.objective_s, b.objective_s, rel_tol=1e-7, abs_tol=1e-12)


def _describe(p) -> str:
    if p is None:
        return "infeasible"
    return (
        f"{p.objective_s!r} {[s.layers for s in p.stages]} x {[s.replicas for s in p.stages]} "
        f"on {[s.ranks for s in p.stages]}"
    )


def _solve_or_none(solver, cost, space, **kwargs):
    try:
        return solver(cost, states=space, **kwargs)
    except InfeasibleError:
        return None


def _consistent(cost: CostModel, p) -> None:
    """A solver's partition is the cost model's score of its own stages, replicas and ranks."""
    again = cost.evaluate(
        [s.layers for s in p.stages], [s.replicas for s in p.stages], [s.ranks for s in p.stages]
    )
    assert again.objective_s == p.objective_s
    assert cost.fits(p)


_SETTINGS = {
    "deadline": None,
    "derandomize": True,  # the same examples on every run: CI stays deterministic
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}


# Found by this test: a stage without parameters has nothing to all-reduce, so its replicas
# must not pay the ring's latency (cost.allreduce_s is 0 for 0 bytes).
_NO_PARAMETERS = (
    Profile(
        model="random",
        batch_size=1,
        layers=(
            LayerProfile(
                name="l0",
                op="fake",
                forward_ms=1.0,
                backward_ms=2.0,
                output_bytes=(3 * MB,),
                parameter_bytes=0,
            ),
            LayerProfile(
                name="l1",
                op="fake",
                forward_ms=1.0,
                backward_ms=0.0,
                output_bytes=(0,),
                parameter_bytes=MB,
                inputs=(0,),
            ),
        ),
    ),
    Topology(
        levels=(Level(devices=3, bandwidth_bytes_per_s=1e10, latency_s=1e-4),), memory_bytes=3e8
    ),
    SolverOptions(
        schedule=Schedule.PIPEDREAM,
        microbatches=6,
        optimizer=OptimizerKind.ADAM,
        allow_fewer_devices=False,
        memory_constraint=False,
    ),
)


def test_dp_parameter_free_stage_pays_no_allreduce() -> None:
    profile, topology, opts = _NO_PARAMETERS
    cost = CostModel(profile, topology, opts)
    space = build_states(profile, opts.state_space)
    assert _same(dp.solve(cost, states=space), brute_force(cost, space))


def _dp_equals_brute_force(profile: Profile, topology: Topology, opts: SolverOptions) -> None:
    cost, space = _problem(profile, topology, opts)
    oracle = brute_force(cost, space)
    found = _solve_or_none(dp.solve, cost, space)
    assert _same(found, oracle), f"dp {_describe(found)} vs brute force {_describe(oracle)}"
    if found is not None:
        assert found.solver == "dp" and found.optimal
        _consistent(cost, found)


_COMBINATIONS = [
    pytest.param(levels, schedule, memory, id=f"{levels}-level-{schedule}-{memory}")
    for levels in (1, 2, 3)
    for schedule in PER_STAGE_SCHEDULES
    for memory in ("limited", "unlimited")
]


@pytest.mark.parametrize(("levels", "schedule", "memory"), _COMBINATIONS)
def test_dp_equals_brute_force(levels: int, schedule: Schedule, memory: str) -> None:
    """The DP is exact over its state space and contiguous ranks, on every topology (quick tier)."""
    _check_combination(levels, schedule, memory, examples=8)


@pytest.mark.slow
@pytest.mark.parametrize(("levels", "schedule", "memory"), _COMBINATIONS)
def test_dp_equals_brute_force_many(levels: int, schedule: Schedule, memory: str) -> None:
    """As above, 84 examples per combination: 504 per level count."""
    _check_combination(levels, schedule, memory, examples=84)


@pytest.mark.parametrize(("levels", "schedule", "memory"), _COMBINATIONS)
def test_dp_with_device_windows_equals_brute_force(
    levels: int, schedule: Schedule, memory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search plans of 32 devices or more take (a floor, fewest-devices windows,
    :mod:`planner.optimize.windows`), forced on small problems: still exact (quick tier)."""
    monkeypatch.setattr(dp, "WINDOWS_FROM", 1)
    _check_combination(levels, schedule, memory, examples=8)


@pytest.mark.slow
@pytest.mark.parametrize(("levels", "schedule", "memory"), _COMBINATIONS)
def test_dp_with_device_windows_equals_brute_force_many(
    levels: int, schedule: Schedule, memory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, 28 examples per combination: 168 per level count (the unwindowed search has
    its 504 above)."""
    monkeypatch.setattr(dp, "WINDOWS_FROM", 1)
    _check_combination(levels, schedule, memory, examples=28)


def _check_combination(levels: int, schedule: Schedule, memory: str, *, examples: int) -> None:
    limited = memory == "limited"

    @settings(max_examples=examples, **_SETTINGS)
    @given(
        profiles(max_layers=7 if levels == 1 else 6),
        topologies(levels=(levels,)),
        options(schedules=(schedule,), memory=(limited,)),
    )
    def check(profile: Profile, topology: Topology, opts: SolverOptions) -> None:
        _dp_equals_brute_force(profile, topology, opts)

    check()


@pytest.mark.slow
@settings(max_examples=60, **_SETTINGS)
@given(
    profiles(max_layers=6),
    topologies(levels=(1, 2, 3)),
    options((CostModelKind.PLANNER, CostModelKind.PIPEDREAM)),
)
def test_ilp_equals_brute_force_and_dp(
    profile: Profile, topology: Topology, opts: SolverOptions
) -> None:
    """The ILP is exact over its space (the state space, contiguous ranks) for both cost models,
    and equals the DP (planner cost model) on one, two and three levels."""
    cost, space = _problem(profile, topology, opts)
    oracle = brute_force(cost, space)
    found = _solve_or_none(ilp.solve, cost, space, time_limit_s=60)
    assert _same(found, oracle), f"ilp {_describe(found)} vs brute force {_describe(oracle)}"
    if found is not None:
        assert found.solver == "ilp" and found.optimal
        _consistent(cost, found)
    if opts.cost_model is CostModelKind.PLANNER:
        planned = _solve_or_none(dp.solve, cost, space)
        assert _same(planned, found), f"dp {_describe(planned)} vs ilp {_describe(found)}"
