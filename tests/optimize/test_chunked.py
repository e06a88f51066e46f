"""The rank schedules' planner: the exact cut, the rank balancing, and the schedule choice."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from bruteforce import chains

from planner.errors import InfeasibleError, PlanError
from planner.optimize.chunked import (
    balance_ranks,
    chunk_costs,
    min_max_cut,
    plan_rank_schedule,
    shapes,
)
from planner.optimize.cost import CostModel, SolverOptions
from planner.optimize.states import build_states
from planner.optimize.synthetic import branched_profile
from planner.optimize.tables import DownsetTables
from planner.plan import Plan
from planner.planning import PlanOptions, make_plan
from planner.profile import LayerProfile, Profile
from planner.rank_schedules import stage_ranks
from planner.schedules import RANK_SCHEDULES, Schedule
from planner.simulate import simulate
from planner.topology import Level, Topology

GIB = 2**30


def chain(times: list[float], *, out_bytes: int = 1000, params: int = 4000) -> Profile:
    layers = tuple(
        LayerProfile(
            name=f"l{i}",
            op="Linear",
            forward_ms=t,
            backward_ms=2 * t,
            output_bytes=(out_bytes,),
            parameter_bytes=params,
            inputs=(i - 1,) if i else (),
        )
        for i, t in enumerate(times)
    )
    return Profile(model="chain", batch_size=4, layers=layers)


def two_levels(n: int) -> Topology:
    return Topology(
        levels=(
            Level(devices=2, bandwidth_bytes_per_s=2e9, latency_s=1e-5),
            Level(devices=n // 2, bandwidth_bytes_per_s=1e8, latency_s=1e-4),
        ),
        memory_bytes=16 * GIB,
    )


def brute_min_max(tables, space, topology, layout) -> float:
    """The slowest chunk of every chain of exactly ``len(layout)`` stages, smallest first."""
    compute, links = chunk_costs(tables, topology, layout)
    best = math.inf
    for path in chains(space, len(layout)):
        if len(path) != len(layout):
            continue
        full = [0, *path]
        worst = 0.0
        for s in range(len(layout)):
            k, j = full[s], full[s + 1]
            lin = links[s - 1][k] if s else 0.0
            worst = max(worst, compute[k, j], lin, links[s][j])
        best = min(best, worst)
    return best


CASES = [
    (seed, schedule, p, v, topo)
    for seed in range(6)
    for (schedule, p, v) in [
        (Schedule.INTERLEAVED_1F1B, 2, 2),
        (Schedule.ZB_H1, 3, 1),
        (Schedule.ZBV, 2, 2),
        (Schedule.INTERLEAVED_1F1B, 2, 3),
    ]
    for topo in ("one", "two")
]


@pytest.mark.parametrize(("seed", "schedule", "p", "v", "topo"), CASES)
def test_min_max_cut_equals_brute_force(
    seed: int, schedule: Schedule, p: int, v: int, topo: str
) -> None:
    profile = branched_profile(9, seed=seed, max_branches=3, max_branch_length=2)
    topology = Topology.from_args(gpus=4, bandwidth_gbps=0.5) if topo == "one" else two_levels(4)
    space = build_states(profile, "all")
    tables = DownsetTables.from_masks(CostModel(profile, topology, SolverOptions()), space.masks)
    layout = stage_ranks(schedule, ranks=p, chunks=v)
    path, value = min_max_cut(tables, space, topology, layout)
    assert value == pytest.approx(brute_min_max(tables, space, topology, layout), rel=1e-12)
    assert len(path) == len(layout) + 1 and path[0] == 0 and path[-1] == len(space) - 1
    assert all(space.includes[a, b] for a, b in itertools.pairwise(path))


def test_min_max_cut_refuses_more_chunks_than_layers() -> None:
    profile = chain([1.0, 1.0, 1.0])
    topology = Topology.from_args(gpus=2)
    space = build_states(profile, "all")
    tables = DownsetTables.from_masks(CostModel(profile, topology, SolverOptions()), space.masks)
    with pytest.raises(PlanError, match="cannot fill 4 stages"):
        min_max_cut(tables, space, topology, stage_ranks(Schedule.ZBV, ranks=2, chunks=2))


def test_balance_ranks_reaches_the_best_rank_loads_on_the_v() -> None:
    # unit layers and a heavy one in the middle, on the V of 2 ranks (stages 0 and 3 on rank 0)
    profile = chain([1.0] * 4 + [6.0] + [1.0] * 7, out_bytes=0)
    topology = Topology.from_args(gpus=2)
    space = build_states(profile, "all")
    tables = DownsetTables.from_masks(CostModel(profile, topology, SolverOptions()), space.masks)
    layout = stage_ranks(Schedule.ZBV, ranks=2, chunks=2)
    path, _ = min_max_cut(tables, space, topology, layout)
    balanced = balance_ranks(tables, space, topology, layout, path)
    compute, _ = chunk_costs(tables, topology, layout)

    def busiest(p: list[int]) -> float:
        loads = [0.0, 0.0]
        for s in range(4):
            loads[layout[s]] += compute[p[s], p[s + 1]]
        return max(loads)

    best = min(busiest([0, *c]) for c in chains(space, 4) if len(c) == 4)
    assert busiest(balanced) == pytest.approx(best)


def test_shapes_halve_the_ranks_and_respect_the_layers() -> None:
    got = shapes([Schedule.ZBV, Schedule.ZB_H1], devices=8, layers=10)
    assert got == [
        (Schedule.ZBV, 5, 2),  # the most ranks 10 layers fill, as torch's even split does
        (Schedule.ZBV, 4, 2),
        (Schedule.ZBV, 2, 2),
        (Schedule.ZB_H1, 8, 1),
        (Schedule.ZB_H1, 4, 1),
        (Schedule.ZB_H1, 2, 1),
    ]
    assert [p for _, p, _ in shapes([Schedule.ZB_H1], devices=64, layers=50)] == [
        50,
        32,
        16,
        8,
        4,
        2,
    ]
    with pytest.raises(PlanError, match="not a rank schedule"):
        shapes([Schedule.ONE_F_ONE_B], devices=8, layers=10)


def _plan(profile: Profile, topology: Topology, **kw: object) -> Plan:
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    path = folder / "p.json"
    profile.save(path)
    return make_plan(profile, path, topology, PlanOptions(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", [*RANK_SCHEDULES, Schedule.ONE_F_ONE_B, Schedule.GPIPE])
def test_the_plan_predicts_what_its_simulator_says(schedule: Schedule) -> None:
    profile = branched_profile(24, seed=3, batch_size=8)
    topology = Topology.from_args(gpus=4, bandwidth_gbps=1)
    plan = _plan(profile, topology, schedule=schedule, minibatch_size=64)
    assert plan.schedule is schedule
    assert plan.predicted.minibatch_s == simulate(plan, profile).minibatch_s
    assert plan.predicted.cost_model_minibatch_s is not None or schedule in RANK_SCHEDULES
    again = Plan.from_json(plan.to_json())
    assert again == plan


def test_auto_is_the_fastest_of_the_schedules_planned_one_by_one() -> None:
    profile = branched_profile(30, seed=5, batch_size=8)
    topology = Topology.from_args(gpus=4, bandwidth_gbps=2)
    auto = _plan(profile, topology, auto_schedule=True, minibatch_size=64)
    each = {}
    for schedule in (*RANK_SCHEDULES, Schedule.ONE_F_ONE_B):
        try:
            each[schedule] = _plan(profile, topology, schedule=schedule, minibatch_size=64)
        except InfeasibleError:
            continue
    fastest = min(p.predicted.minibatch_s for p in each.values())
    assert auto.predicted.minibatch_s == pytest.approx(fastest, rel=1e-12)
    listed = [c.minibatch_s for c in auto.schedules_compared]
    assert listed == sorted(listed) and listed[0] == pytest.approx(fastest, rel=1e-12)
    assert "runner-up" in auto.note


def test_rank_schedules_that_cannot_fit_say_so() -> None:
    profile = chain([1.0] * 8, params=2 * GIB)
    topology = Topology.from_args(gpus=2, memory_gb=4)
    with pytest.raises(InfeasibleError, match="no shape of zbv fits"):
        plan_rank_schedule(
            profile,
            topology,
            schedules=[Schedule.ZBV],
            minibatch_size=16,
            microbatch_counts=[4],
        )


def test_a_rank_plans_baselines_are_simulated_as_a_1f1b_plans_are() -> None:
    # the baselines are 1f1b partitions; their times are the simulator's, not the formula's
    profile = branched_profile(24, seed=3, batch_size=8)
    topology = Topology.from_args(gpus=4, bandwidth_gbps=1)
    rank = _plan(profile, topology, schedule=Schedule.ZBV, minibatch_size=64, microbatches=8)
    one = _plan(profile, topology, schedule=Schedule.ONE_F_ONE_B, minibatch_size=64, microbatches=8)
    times = {b.name: b.minibatch_s for b in one.baselines}
    assert times and {b.name: b.minibatch_s for b in rank.baselines} == pytest.approx(times)
    assert rank.predicted.data_parallel_s == pytest.approx(one.predicted.data_parallel_s)
    assert "baselines (under 1f1b, simulated):" in rank.describe()


def test_more_devices_than_layers_fills_as_many_ranks_as_layers() -> None:
    # 6 equal layers on 8 devices: 6 ranks (torch's even split) beat the 4 a halving gives
    profile = chain([1.0] * 6, out_bytes=0)
    plan = _plan(profile, Topology.from_args(gpus=8), schedule=Schedule.ZB_H1, minibatch_size=24)
    assert plan.num_ranks == 6


def test_refusals_keep_their_reason() -> None:
    # one rank schedule asked for: its own reason, not "nothing fits"; auto: both reasons
    profile = chain([1.0] * 8, params=2 * GIB)
    topology = Topology.from_args(gpus=2, memory_gb=4)
    with pytest.raises(InfeasibleError, match=r"no shape of zbv fits in 4\.00 GiB"):
        _plan(profile, topology, schedule=Schedule.ZBV, minibatch_size=16)
    with pytest.raises(InfeasibleError, match=r"; and no shape of .* fits in 4\.00 GiB"):
        _plan(profile, topology, auto_schedule=True, minibatch_size=16)


def test_the_refusal_names_the_shape_with_the_smallest_peak() -> None:
    # the peaks differ by shape; the message names the smallest by bytes, not by name
    profile = chain([1.0] * 8, out_bytes=64 * 2**20, params=2 * GIB)
    topology = Topology.from_args(gpus=4, memory_gb=4)
    schedules = [Schedule.INTERLEAVED_1F1B, Schedule.ZB_H1, Schedule.ZBV]
    every = plan_rank_schedule(
        profile,
        topology,
        schedules=schedules,
        minibatch_size=16,
        microbatch_counts=[4],
        memory_constraint=False,
    )
    assert every and not any(c.fits for c in every)
    with pytest.raises(InfeasibleError, match="smallest peak") as info:
        plan_rank_schedule(
            profile, topology, schedules=schedules, minibatch_size=16, microbatch_counts=[4]
        )
    found = re.search(
        r"smallest peak: (\S+) x\d+ on \d+ ranks, M=4: ([\d.]+) GiB\)", str(info.value)
    )
    assert found, str(info.value)
    peaks = {str(c.schedule): max(c.peak_bytes) / GIB for c in every}
    assert float(found[2]) <= min(peaks.values()) + 0.005
    assert float(found[2]) <= peaks[found[1]] + 0.005


def test_plans_check_the_rank_layout() -> None:
    profile = chain([1.0] * 8)
    topology = Topology.from_args(gpus=2, bandwidth_gbps=1)
    plan = _plan(profile, topology, schedule=Schedule.ZBV, minibatch_size=16)
    assert plan.chunks == 2 and [s.ranks for s in plan.stages] == [(0,), (1,), (1,), (0,)]
    swapped = [*plan.stages]
    swapped[2], swapped[3] = swapped[3], swapped[2]
    doc = plan.to_dict()
    doc["stages"] = [
        {**st, "ranks": [r]} for st, r in zip(doc["stages"], [0, 1, 0, 1], strict=True)
    ]
    with pytest.raises(PlanError, match="puts it with stage 1 on rank 1"):
        Plan.from_dict(doc)
    doc = plan.to_dict() | {"chunks": 3}
    with pytest.raises(PlanError, match="not 3 chunks"):
        Plan.from_dict(doc)
    doc = plan.to_dict() | {"schedule": "1f1b"}
    with pytest.raises(PlanError, match="one stage per device, not 2 chunks"):
        Plan.from_dict(doc)
    assert np.isfinite(plan.predicted.minibatch_s)
