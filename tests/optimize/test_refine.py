"""Local refinement: bands of downsets around a plan's boundaries, and a plan never worse."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from planner.optimize import dp
from planner.optimize.cost import CostModel, SolverOptions
from planner.optimize.refine import band_space
from planner.optimize.states import build_states
from planner.optimize.synthetic import nasnet_profile
from planner.profile import Profile
from planner.schedules import Schedule
from planner.topology import Topology


@functools.cache
def _nasnet() -> Profile:
    return nasnet_profile(cells=14, seed=2)


def test_bands_are_downsets_in_order_around_the_boundaries():
    profile = _nasnet()
    space = build_states(profile)
    assert space.pool is not None and len(space.pool) > len(space)  # thinned
    compute = np.array([la.compute_ms for la in profile.layers])
    picks = [len(space) // 4, len(space) // 2, 3 * len(space) // 4]
    boundaries = [space.masks[i] for i in picks]
    bands = band_space(space, boundaries, compute)
    masks = bands.masks
    assert not masks[0].any() and masks[-1].all()
    for mask in masks:  # every state is down-closed
        for i in np.flatnonzero(mask):
            assert all(mask[j] for j in profile.layers[i].inputs)
    for b in boundaries:  # every boundary is a state
        assert any((m == b).all() for m in masks)
    k, j = np.nonzero(bands.includes)
    assert (k < j).all()  # forward only: the DP's order
    assert all(
        (masks[a] <= masks[b]).all() and masks[b].sum() > masks[a].sum()
        for a, b in zip(k, j, strict=True)
    )
    assert not bands.includes[0, -1]  # three boundaries: at least two stages
    assert len(bands) < len(space.pool)


@pytest.mark.parametrize("schedule", [Schedule.PIPEDREAM, Schedule.ONE_F_ONE_B])
def test_refined_plan_is_never_worse_and_scored_by_the_cost_model(schedule):
    profile = _nasnet()
    cost = CostModel(
        profile,
        Topology.from_args(gpus=16),
        SolverOptions(schedule=schedule, microbatches=1 if schedule is Schedule.PIPEDREAM else 16),
    )
    space = build_states(profile)
    found = dp.search(cost, space)
    assert found is not None
    part = dp.solve(cost, states=space)
    assert part.objective_s <= found.objective * (1 + 1e-9)
    again = cost.evaluate(
        [s.layers for s in part.stages],
        [s.replicas for s in part.stages],
        solver="dp",
        optimal=True,
    )
    assert again == part and cost.fits(part)
