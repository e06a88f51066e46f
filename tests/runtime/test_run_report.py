"""The run report: JSON round trip, the tables, and calibration from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from planner.profile.format import LayerProfile, Profile
from planner.runtime.calibrate import calibrate, calibration_of, fit_latency
from planner.runtime.config import RunError
from planner.runtime.loops import merge_losses
from planner.runtime.report import (
    Comparison,
    RankStats,
    RunReport,
    StageComparison,
    StageStats,
    StepStats,
)
from planner.topology import Topology


def _rank(rank: int, stage: int, compute_s: float) -> RankStats:
    return RankStats(
        rank=rank,
        stage=stage,
        replica=0,
        microbatches_per_step=4,
        samples_per_step=8,
        steps=2,
        wall_s=1.0,
        compute_s=compute_s,
        wait_s=0.2,
        send_s=0.1,
        sync_s=0.0,
        update_s=0.1,
        bytes_sent=100,
        bytes_received=100,
    )


def _report(comparison: Comparison | None) -> RunReport:
    ranks = (_rank(0, 0, 0.4), _rank(1, 1, 0.6))
    return RunReport(
        plan="p.json",
        model="m",
        schedule="1f1b",
        world_size=2,
        minibatch_size=8,
        microbatches=4,
        steps=3,
        measured_steps=2,
        samples_per_s=16.0,
        losses=(3.0, 2.5, 2.0),
        step_stats=tuple(
            StepStats(step=i, loss=x, wall_s=0.5, samples_per_s=16.0)
            for i, x in enumerate((3.0, 2.5, 2.0))
        ),
        ranks=ranks,
        stages=tuple(StageStats.of(s, [ranks[s]]) for s in (0, 1)),
        backend="gloo",
        threads=1,
        torch_version="2",
        comparison=comparison,
    )


COMPARISON = Comparison(
    stages=(
        StageComparison(
            stage=0,
            predicted_compute_ms=100.0,
            measured_compute_ms=200.0,
            predicted_comm_ms=10.0,
            measured_comm_ms=50.0,
            predicted_idle=0.1,
            measured_idle=0.3,
        ),
        StageComparison(
            stage=1,
            predicted_compute_ms=150.0,
            measured_compute_ms=300.0,
            predicted_comm_ms=10.0,
            measured_comm_ms=50.0,
            predicted_idle=0.2,
            measured_idle=0.4,
        ),
    ),
    predicted_samples_per_s=40.0,
    measured_samples_per_s=16.0,
)


@pytest.mark.parametrize("comparison", [None, COMPARISON])
def test_report_round_trips_through_json(tmp_path: Path, comparison: Comparison | None) -> None:
    report = _report(comparison)
    report.save(tmp_path / "r.json")
    assert RunReport.load(tmp_path / "r.json") == report


def test_tables_name_stages_and_throughput() -> None:
    text = _report(COMPARISON).describe()
    assert "compute ms" in text and "16.0 samples/s" in text
    assert "0.40x the prediction" in COMPARISON.describe()


def test_a_file_that_is_not_a_report_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"format": "planner.plan/1"}')
    with pytest.raises(RunError, match="not a runtime report"):
        RunReport.load(tmp_path / "x.json")


def test_calibration_rescales_compute_and_bandwidth() -> None:
    cal = calibration_of(_report(COMPARISON))
    # (200 + 50 ms optimizer) + (300 + 50) measured over 100 + 150 predicted
    assert cal.compute_scale == pytest.approx(2.4) and cal.comm_scale == pytest.approx(5.0)
    profile = Profile(
        model="m",
        batch_size=2,
        layers=(
            LayerProfile(
                name="a",
                op="x",
                forward_ms=1.0,
                backward_ms=2.0,
                output_bytes=(8,),
                parameter_bytes=4,
            ),
        ),
    )
    topology = Topology.from_args(gpus=2, bandwidth_gbps=10)
    new_profile, new_topology = calibrate(profile, topology, _report(COMPARISON))
    assert new_profile.layers[0].forward_ms == pytest.approx(2.4)
    assert new_profile.layers[0].backward_ms == pytest.approx(4.8)
    assert "calibrated" in (new_profile.calibration or "")
    assert new_topology.levels[0].bandwidth_bytes_per_s == pytest.approx(2e9)
    with pytest.raises(RunError, match="no predicted-vs-measured"):
        calibration_of(_report(None))


def test_pipedream_losses_merge_across_replicas() -> None:
    records = [(0, 1.0, 10.0), (2, 3.0, 10.5), (1, 2.0, 10.2), (3, 4.0, 11.0), (4, 9.0, 12.0)]
    steps = merge_losses(records, microbatches=2, minibatch_size=4)
    assert [s.loss for s in steps] == [1.5, 3.5]  # step 2 is incomplete and left out
    assert steps[1].wall_s == pytest.approx(0.8)
    assert dataclasses.asdict(steps[0])["step"] == 0


def test_latency_is_fitted_to_the_measured_rate(tmp_path: Path) -> None:
    from runtime_helpers import make_plan, with_profile

    from planner.simulate import simulate

    plan = with_profile(make_plan("runtime_models:mlp", cuts=["_3"], replicas=[1, 1]), tmp_path)
    profile = Profile.load(tmp_path / "profile.json")
    fast = simulate(plan, profile).samples_per_s
    topology = fit_latency(plan, profile, plan.topology, fast / 2)
    assert topology.levels[0].latency_s > 0
    fitted = simulate(dataclasses.replace(plan, topology=topology), profile).samples_per_s
    assert fitted == pytest.approx(fast / 2, rel=1e-3)
    assert fit_latency(plan, profile, plan.topology, fast * 2).levels[0].latency_s == 0.0
