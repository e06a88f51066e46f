"""The fewest-devices relaxation behind the DP's windows and floor (planner.optimize.windows).

Checked against brute force: the optimal plan's every cell lies inside the windows and its every
stage is among those tried (on one, two and three levels, memory limited or not), and on one level without a memory limit, where the
relaxation is exact, the floor brackets the optimum within its tolerance and the suffix count
from state 0 equals the fewest devices any plan under the bound uses.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from bruteforce import brute_force, chains, replica_vectors
from hypothesis import HealthCheck, assume, given, settings
from test_properties import options, profiles, topologies

from planner.optimize.cost import CostModel
from planner.optimize.dp_kernel import build_problem
from planner.optimize.states import build_states
from planner.optimize.windows import Pairs, fewest_devices, floor_bound
from planner.schedules import PER_STAGE_SCHEDULES, Schedule

_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}


def _slowest(part) -> float:
    """The slowest stage as the DP bounds it (1f1b/gpipe: without the all-reduce)."""
    return max(s.time_s for s in part.stages)


def _solved(profile, topology, opts):
    """The state space, the brute-force optimum (or None) and the DP's problem."""
    cost = CostModel(profile, topology, opts)
    space = build_states(profile, opts.state_space)
    return space, brute_force(cost, space), build_problem(cost, space)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("schedule", PER_STAGE_SCHEDULES)
def test_the_optimal_plan_lies_inside_the_windows(levels: int, schedule: Schedule) -> None:
    @settings(max_examples=12, **_SETTINGS)
    @given(
        profiles(max_layers=6),
        topologies(levels=(levels,)),
        options(schedules=(schedule,), memory=(True, False)),
    )
    def check(profile, topology, opts) -> None:
        space, best, p = _solved(profile, topology, opts)
        if best is None:
            return
        bound = _slowest(best)
        w = fewest_devices(p, bound)
        g, h = w.suffix, w.prefix
        # walk the plan's states: devices before and after each boundary
        masks = [frozenset(s.layers) for s in best.stages]
        done: set[int] = set()
        used = 0
        for stage, layers in zip(best.stages, masks, strict=True):
            k = _state_of(space, done)
            after = best.num_devices_used - used
            assert g[k] <= after, (k, g[k], after)
            assert h[k] <= used, (k, h[k], used)
            done |= layers
            used += stage.replicas
            assert _state_of(space, done) in w.succ[k]  # the stage is tried

    check()


def _state_of(space, layers: set[int]) -> int:
    mask = np.zeros(space.masks.shape[1], dtype=bool)
    mask[list(layers)] = True
    hits = np.flatnonzero((space.masks == mask).all(axis=1))
    assert len(hits) == 1
    return int(hits[0])


@given(
    profiles(max_layers=6),
    topologies(levels=(1,)),
    options(schedules=(Schedule.PIPEDREAM,), memory=(False,)),
)
@settings(max_examples=40, **_SETTINGS)
def test_on_one_level_the_floor_brackets_the_optimum(profile, topology, opts) -> None:
    _, best, p = _solved(profile, topology, opts)
    if best is None:
        return
    assume(p.t.compute_s[-1] > 0)  # without compute the floor is 0 (the DP does not use it)
    assume(opts.allow_fewer_devices)  # else a plan must use every device: more than the fewest
    tolerance = 1e-3
    floor = floor_bound(p, pairs=Pairs.of(p), tolerance=tolerance)
    assert floor <= _slowest(best) * (1 + 1e-9)
    assert _slowest(best) <= floor * (1 + tolerance) * (1 + 1e-9)


@given(
    profiles(max_layers=5),
    topologies(levels=(1,)),
    options(schedules=(Schedule.PIPEDREAM, Schedule.GPIPE), memory=(False,)),
)
@settings(max_examples=30, **_SETTINGS)
def test_on_one_level_the_suffix_count_is_the_fewest_devices(profile, topology, opts) -> None:
    """Equality with an enumeration of every plan (chain of states x replica counts)."""
    cost = CostModel(profile, topology, opts)
    space = build_states(profile, opts.state_space)
    p = build_problem(cost, space)
    n = topology.num_devices
    plans = []
    for path in chains(space, n):
        stages = [space.stage(a, b).tolist() for a, b in itertools.pairwise([0, *path])]
        for reps in replica_vectors(len(stages), n, straight=opts.straight, all_devices=False):
            part = cost.evaluate(stages, list(reps))
            plans.append((_slowest(part), sum(reps)))
    for bound in sorted({b for b, _ in plans})[:6]:
        fewest = min(d for b, d in plans if b <= bound * (1 + 1e-9))
        assert fewest_devices(p, bound).suffix[0] == fewest
