"""The DP's kernel: a table updated under a lower all-reduce cap equals one filled from scratch."""

from __future__ import annotations

import numpy as np
import pytest

from planner.optimize.cost import CostModel, SolverOptions
from planner.optimize.dp_kernel import build_problem, kernel, kernel_work, lower_cap
from planner.optimize.states import build_states
from planner.optimize.synthetic import branched_profile
from planner.schedules import Schedule
from planner.topology import Level, Topology


def _topology(sizes: tuple[int, ...], memory_gb: float) -> Topology:
    """Levels of ``sizes`` devices (innermost first), each ten times slower than the one inside."""
    return Topology(
        levels=tuple(
            Level(devices=size, bandwidth_bytes_per_s=1e9 / 10**i, latency_s=1e-5 * i)
            for i, size in enumerate(sizes)
        ),
        memory_bytes=memory_gb * 2**30,
    )


def _caps(p, total: int, bound: float, counts: int) -> list[float]:
    """Distinct all-reduce values of the table's chosen suffixes, largest first: each one, as a
    cap, removes at least the suffix that has it."""
    tab = kernel(p, total, bound, counts, np.inf)
    ys = np.unique(tab.path_y[np.isfinite(tab.value) & (tab.path_y > 0)])
    return [float(y) for y in ys[::-1]]


@pytest.mark.parametrize(
    ("layers", "seed", "sizes", "schedule", "memory_gb"),
    [
        (40, 1, (8,), Schedule.ONE_F_ONE_B, 16),
        pytest.param(40, 2, (4, 2), Schedule.GPIPE, 16, marks=pytest.mark.slow),
        # memory binds: it depends on the devices after a stage
        pytest.param(30, 3, (4, 3), Schedule.ONE_F_ONE_B, 0.02, marks=pytest.mark.slow),
        pytest.param(30, 4, (2, 2, 2), Schedule.GPIPE, 16, marks=pytest.mark.slow),
    ],
)
def test_lower_cap_equals_a_fresh_table(layers, seed, sizes, schedule, memory_gb):
    profile = branched_profile(layers, seed=seed)
    topo = _topology(sizes, memory_gb)
    gpus = topo.num_devices
    cost = CostModel(profile, topo, SolverOptions(schedule=schedule, microbatches=gpus))
    p = build_problem(cost, build_states(profile))
    work = float(p.t.compute_s[-1])
    counts = min(gpus, len(p.t.compute_s) - 1)
    checked = 0
    for total in (gpus, gpus - 1):
        bound = 2.0 * work / total
        tab = kernel(p, total, bound, counts, np.inf)
        for cap in _caps(p, total, bound, counts)[:4]:
            tab = lower_cap(p, tab, cap)
            fresh = kernel(p, total, bound, counts, cap)
            np.testing.assert_array_equal(tab.value, fresh.value)
            finite = np.isfinite(fresh.value)
            assert (tab.path_y[finite] < cap).all()
            checked += 1
    assert checked >= 2


def test_lower_cap_with_a_lower_bound_and_fewer_stage_counts_equals_a_fresh_table():
    """When the best plan improves, lower_cap also drops cells above the new bound and stage
    counts above the new limit: every cell a fresh table has, it has with the same value."""
    profile = branched_profile(40, seed=5)
    topo = _topology((4, 2), 16)
    cost = CostModel(profile, topo, SolverOptions(schedule=Schedule.ONE_F_ONE_B, microbatches=8))
    p = build_problem(cost, build_states(profile))
    work = float(p.t.compute_s[-1])
    tab = kernel(p, 8, 2.0 * work / 8, 6, np.inf)
    cap = _caps(p, 8, 2.0 * work / 8, 6)[1]
    bound, counts = 1.5 * work / 8, 4
    tab = lower_cap(p, tab, cap, bound=bound, counts=counts)
    fresh = kernel(p, 8, bound, counts, cap)
    for k in range(len(p.t.compute_s)):
        for r in range(int(fresh.lo[k]), int(fresh.hi[k]) + 1):
            mine = tab.value[tab.offset[k] + r - tab.lo[k], :, : counts + 1]
            theirs = fresh.value[fresh.offset[k] + r - fresh.lo[k]]
            np.testing.assert_array_equal(mine, theirs)
    assert np.isinf(tab.value[:, :, counts + 1 :]).all()


@pytest.mark.parametrize(
    ("sizes", "counts", "memory_gb"),
    [((8,), 0, 16), ((8,), 6, 16), ((4, 2), 6, 16), ((4, 2), 0, 0.02), ((2, 2, 2), 5, 16)],
)
def test_kernel_work_is_what_the_kernel_computes(sizes, counts, memory_gb):
    """The search's work budget reads kernel_work before it fills a table: it must be the
    candidate cells the fill then counts, exactly."""
    profile = branched_profile(30, seed=6)
    topo = _topology(sizes, memory_gb)
    gpus = topo.num_devices
    schedule = Schedule.GPIPE if counts else Schedule.PIPEDREAM
    cost = CostModel(profile, topo, SolverOptions(schedule=schedule, microbatches=gpus))
    p = build_problem(cost, build_states(profile))
    work = float(p.t.compute_s[-1])
    seen = set()
    for scale in (1.2, 2.0, 4.0):
        bound = scale * work / gpus
        tab = kernel(p, gpus, bound, counts, np.inf)
        assert kernel_work(p, gpus, bound, counts) == tab.work
        seen.add(tab.work)
    assert len(seen) == 3 and min(seen) > 0  # the bounds give different tables
