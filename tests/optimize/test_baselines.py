"""Baselines: block partitions, scoring by the shared cost model, memory reporting."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.optimize.baselines import (
    BASELINES,
    all_baselines,
    balanced_blocks,
    baselines,
    data_parallel,
    uniform_blocks,
)
from planner.optimize.cost import CostModel, SolverOptions
from planner.profile import LayerProfile, Profile
from planner.schedules import Schedule
from planner.topology import Topology


def chain(times_ms, params=None, out=1000) -> Profile:
    params = params or [0] * len(times_ms)
    layers = tuple(
        LayerProfile(
            name=f"l{i}",
            op="",
            forward_ms=t,
            backward_ms=2 * t,
            output_bytes=(out,),
            parameter_bytes=p,
            inputs=(i - 1,) if i else (),
        )
        for i, (t, p) in enumerate(zip(times_ms, params, strict=True))
    )
    return Profile(model="chain", batch_size=1, layers=layers)


def _min_max_brute(weights, parts):
    n = len(weights)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=9).flatmap(
        lambda w: st.tuples(st.just(w), st.integers(1, len(w)))
    )
)
def test_balanced_blocks_is_min_max_optimal(case) -> None:
    weights, parts = case
    sizes = balanced_blocks([float(w) for w in weights], parts)
    assert len(sizes) == parts and all(s >= 1 for s in sizes) and sum(sizes) == len(weights)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    largest = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
    assert largest == _min_max_brute(weights, parts)


def test_balanced_blocks_refuses_too_many_parts() -> None:
    with pytest.raises(ValueError, match="3 items into 4"):
        balanced_blocks([1, 2, 3], 4)


@pytest.mark.parametrize(("items", "parts"), [(10, 4), (8, 8), (7, 3), (5, 1), (12, 5)])
def test_uniform_blocks_match_deepspeed(items: int, parts: int) -> None:
    # DeepSpeed partition_uniform: chunk = items // parts, the first (items % parts) get one more
    sizes = uniform_blocks(items, parts)
    assert sum(sizes) == items and len(sizes) == parts
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_every_baseline_is_scored_by_the_cost_model() -> None:
    profile = chain([1, 2, 3, 4, 5, 6], params=[10, 0, 10, 500, 0, 10])
    cost = CostModel(
        profile,
        Topology.from_args(gpus=4, gpus_per_node=2),
        SolverOptions(schedule=Schedule.ONE_F_ONE_B, microbatches=4),
    )
    result = baselines(cost)
    assert list(result) == list(BASELINES)
    for name, part in result.items():
        assert part.solver == f"baseline:{name}"
        assert not part.optimal and part.fits and part.note == ""
        again = cost.evaluate([s.layers for s in part.stages], [s.replicas for s in part.stages])
        assert again.objective_s == part.objective_s
    assert [s.replicas for s in result["data-parallel"].stages] == [4]
    for name in ("gpipe-balanced", "uniform", "parameters"):
        assert [s.replicas for s in result[name].stages] == [1, 1, 1, 1]
    assert [len(s.layers) for s in result["uniform"].stages] == [2, 2, 1, 1]
    # times 3,6,9,12,15,18 ms: best largest block is 18 ms (blocks 1+2+3 | 4 | 5 | 6)
    assert [s.layers for s in result["gpipe-balanced"].stages] == [(0, 1, 2), (3,), (4,), (5,)]
    # parameters 10,0,10,500,0,10: the 500 layer alone, the rest packed front first
    assert [s.layers for s in result["parameters"].stages] == [(0, 1, 2), (3,), (4,), (5,)]


def test_fewer_layers_than_devices() -> None:
    cost = CostModel(chain([1, 1]), Topology.from_args(gpus=8))
    for name in ("gpipe-balanced", "uniform", "parameters"):
        assert len(baselines(cost)[name].stages) == 2


def test_straight_option_does_not_block_data_parallel() -> None:
    cost = CostModel(chain([1, 1]), Topology.from_args(gpus=2), SolverOptions(straight=True))
    assert data_parallel(cost).stages[0].replicas == 2


def test_baseline_that_does_not_fit_is_reported() -> None:
    gib = 1024**3
    profile = chain([1, 1, 1, 1], params=[gib, gib, gib, gib])
    topology = Topology.from_args(gpus=4, memory_gb=4)
    result = all_baselines(profile, topology, schedule=Schedule.ONE_F_ONE_B, microbatches=4)
    dp = result["data-parallel"]
    assert not dp.fits
    assert dp.note.startswith("stage 0 needs 8 GiB but a device has 4 GiB")
    assert result["uniform"].fits  # 1 GiB of weights + 1 of gradients per stage
    assert all(p.num_devices_used == 4 for p in result.values())
