"""The exact ILP: agreement with the oracle on fixed cases, solver status handling, time limits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pulp
import pytest
from bruteforce import brute_force

from planner.errors import InfeasibleError, PlanError
from planner.optimize import dp, ilp, optimize
from planner.optimize.baselines import baselines
from planner.optimize.cost import CostModel, CostModelKind, SolverOptions
from planner.optimize.states import build_states
from planner.profile import LayerProfile, Profile
from planner.profile.pipedream import pipedream_preprocess, read_graph_txt
from planner.schedules import PER_STAGE_SCHEDULES, OptimizerKind, Schedule
from planner.topology import Level, Topology

MB = 1_000_000


def skip_block() -> Profile:
    """a -> b -> c -> e with a skip a -> d -> e, uneven costs, parameters in the middle."""

    def layer(name, fwd, params, out, inputs=()):
        return LayerProfile(
            name=name,
            op="fake",
            forward_ms=fwd,
            backward_ms=2 * fwd,
            output_bytes=(out,),
            parameter_bytes=params,
            inputs=inputs,
        )

    return Profile(
        model="skip",
        batch_size=1,
        layers=(
            layer("a", 2.0, 0, 4 * MB),
            layer("b", 3.0, 8 * MB, 2 * MB, (0,)),
            layer("c", 1.0, 30 * MB, 2 * MB, (1,)),
            layer("d", 4.0, MB, MB, (0,)),
            layer("e", 1.0, 2 * MB, MB, (2, 3)),
            layer("f", 2.0, 60 * MB, MB, (4,)),
        ),
    )


TOPOLOGIES = {
    "one-level": Topology.from_args(gpus=4, bandwidth_gbps=2),
    "two-level": Topology(
        levels=(
            Level(devices=2, bandwidth_bytes_per_s=10e9, latency_s=1e-5),
            Level(devices=2, bandwidth_bytes_per_s=0.5e9, latency_s=1e-4),
        ),
        memory_bytes=1e12,
    ),
}


@pytest.mark.parametrize("topology", list(TOPOLOGIES), ids=str)
@pytest.mark.parametrize("schedule", list(PER_STAGE_SCHEDULES), ids=str)
@pytest.mark.parametrize(
    "variant",
    ["plain", "memory", "straight", "all-devices", "recompute", "pipedream-model"],
)
def test_ilp_equals_brute_force(topology: str, schedule: Schedule, variant: str) -> None:
    options = SolverOptions(schedule=schedule, microbatches=4, optimizer=OptimizerKind.MOMENTUM)
    if variant == "memory":
        options = dataclasses.replace(options, memory_bytes=330e6)
    elif variant == "straight":
        options = dataclasses.replace(options, straight=True)
    elif variant == "all-devices":
        options = dataclasses.replace(options, allow_fewer_devices=False)
    elif variant == "recompute":
        options = dataclasses.replace(options, recompute=True, memory_bytes=330e6)
    elif variant == "pipedream-model":
        options = dataclasses.replace(
            options, cost_model=CostModelKind.PIPEDREAM, activation_compression_ratio=4.0
        )
    cost = CostModel(skip_block(), TOPOLOGIES[topology], options)
    space = build_states(cost.profile, "all")
    oracle = brute_force(cost, space)
    assert oracle is not None
    found = ilp.solve(cost, states=space, time_limit_s=60)
    assert found.solver == "ilp" and found.optimal
    assert found.objective_s == pytest.approx(oracle.objective_s, rel=1e-7)
    assert cost.fits(found)
    assert [s.ranks for s in found.stages] == [
        tuple(
            range(
                sum(m.replicas for m in found.stages[:i]),
                sum(m.replicas for m in found.stages[: i + 1]),
            )
        )
        for i in range(len(found.stages))
    ]


def test_ilp_equals_dp_on_one_level() -> None:
    cost = CostModel(
        skip_block(),
        TOPOLOGIES["one-level"],
        SolverOptions(schedule=Schedule.GPIPE, microbatches=8),
    )
    assert ilp.solve(cost).objective_s == pytest.approx(dp.solve(cost).objective_s, rel=1e-7)


def test_infeasible_is_refused() -> None:
    options = SolverOptions(memory_bytes=10 * MB)
    cost = CostModel(skip_block(), TOPOLOGIES["one-level"], options)
    with pytest.raises(InfeasibleError, match="no partition of 6 layers on 4 devices fits"):
        ilp.solve(cost)


@pytest.mark.parametrize("limit", [0.0, -1.0, float("nan")])
def test_time_limit_must_be_positive(limit: float) -> None:
    cost = CostModel(skip_block(), TOPOLOGIES["one-level"])
    with pytest.raises(PlanError, match="time limit must be positive"):
        ilp.solve(cost, time_limit_s=limit)


def _fake_status(monkeypatch: pytest.MonkeyPatch, status: int, sol_status: int) -> None:
    """Make CBC report ``status``/``sol_status`` after it really solved (as when a limit hits)."""
    real = pulp.LpProblem.solve

    def solve(self, solver=None, **kwargs):
        result = real(self, solver, **kwargs)
        self.status, self.sol_status = status, sol_status
        return result

    monkeypatch.setattr(pulp.LpProblem, "solve", solve)


def test_time_limit_with_a_solution_is_not_optimal(monkeypatch: pytest.MonkeyPatch) -> None:
    # pulp reports LpStatus "Optimal" when CBC stops on its time limit with an incumbent; only
    # sol_status tells them apart
    _fake_status(monkeypatch, pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible)
    found = ilp.solve(CostModel(skip_block(), TOPOLOGIES["one-level"]))
    assert not found.optimal


def test_time_limit_without_a_solution_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_status(monkeypatch, pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound)
    with pytest.raises(PlanError, match=r"no solution within 5 s.*--solver dp"):
        ilp.solve(CostModel(skip_block(), TOPOLOGIES["one-level"]), time_limit_s=5)


def test_proven_infeasible_status_is_infeasible(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_status(monkeypatch, pulp.LpStatusInfeasible, pulp.LpSolutionInfeasible)
    with pytest.raises(InfeasibleError):
        ilp.solve(CostModel(skip_block(), TOPOLOGIES["one-level"]))


def test_warm_start_outside_the_model_is_ignored() -> None:
    cost = CostModel(skip_block(), TOPOLOGIES["one-level"], SolverOptions(straight=True))
    data_parallel = baselines(cost)["data-parallel"]  # 4 replicas: not a straight plan
    found = ilp.solve(cost, warm_start=data_parallel)
    assert found.optimal and all(s.replicas == 1 for s in found.stages)


@pytest.mark.slow
def test_real_time_limit_on_resnet50(shared_dir: Path) -> None:
    """A short real limit: whatever CBC manages in 3 s (proof or not), the answer is never worse
    than its start, and equals the exact DP when CBC calls it optimal. Nothing depends on how
    fast CBC is."""
    profile = pipedream_preprocess(read_graph_txt(shared_dir / "resnet50" / "graph.txt"))
    cost = CostModel(
        profile,
        Topology.from_args(
            gpus=8, gpus_per_node=4, bandwidth_gbps=25, inter_node_bandwidth_gbps=10
        ),
        SolverOptions(memory_constraint=False),
    )
    start = min(baselines(cost).values(), key=lambda p: p.objective_s)
    found = ilp.solve(cost, time_limit_s=3, warm_start=start)
    assert found.objective_s <= start.objective_s * (1 + 1e-9)
    if found.optimal:
        assert found.objective_s == pytest.approx(dp.solve(cost).objective_s, rel=1e-7)


def test_a_cbc_crash_is_one_line_and_optimize_falls_back_to_the_dp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(self, solver=None, **kwargs):
        raise pulp.PulpSolverError("Pulp: Error while executing\n/usr/bin/cbc")

    monkeypatch.setattr(pulp.LpProblem, "solve", crash)
    cost = CostModel(skip_block(), TOPOLOGIES["one-level"])
    with pytest.raises(PlanError, match=r"^the ILP solver \(CBC\) failed: .*--solver dp") as info:
        ilp.solve(cost)
    assert "\n" not in str(info.value)
    part = optimize(skip_block(), TOPOLOGIES["one-level"], solver="ilp")
    assert part.solver == "dp" and part.optimal and "CBC" in part.note
    assert part.objective_s == dp.solve(cost).objective_s


@pytest.mark.parametrize(("model", "gpus"), [("alexnet", 4), ("vgg16", 4)])
def test_shared_profiles_match_dp(shared_dir: Path, model: str, gpus: int) -> None:
    profile = pipedream_preprocess(read_graph_txt(shared_dir / model / "graph.txt"))
    cost = CostModel(profile, Topology.from_args(gpus=gpus, bandwidth_gbps=10))
    found = ilp.solve(cost, time_limit_s=60)
    assert found.optimal
    assert found.objective_s == pytest.approx(dp.solve(cost).objective_s, rel=1e-7)
