"""Calibration: rescale a profile's compute and a topology's bandwidth from what a run measured.

A run's report (with its predicted-vs-measured comparison) says how far the prediction was off:
``compute_scale`` is measured over predicted compute, summed over every replica of every stage
(the layers' forward and backward only: the optimizer step is the topology's);
``comm_scale`` is measured over predicted transfer time likewise (None when the plan predicted no
communication). :func:`calibrate` multiplies every layer's forward and backward time by
``compute_scale``; for communication, given the plan that was run, it fits the topology's
per-message latency so the simulator reproduces the measured samples/s (:func:`fit_latency`:
on loopback and busy hosts, message latency, not bandwidth, is what the run pays), else it
divides every level's bandwidth by ``comm_scale``. Planning again with the results predicts what
this machine does. ``plan --calibrate REPORT.json`` is built on it.

Example:
    >>> report = RunReport.load("plan.report.json")                    # doctest: +SKIP
    >>> profile, topology = calibrate(profile, plan.topology, report)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from planner.plan import Plan
from planner.profile.format import Profile
from planner.runtime.config import RunError
from planner.runtime.report import RunReport
from planner.topology import Topology

__all__ = [
    "Calibration",
    "calibrate",
    "calibration_of",
    "check_report_matches",
    "fit_latency",
]

_NOTE_PREFIX = "calibrated from "


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """How far a run was from its prediction.

    Attributes:
        compute_scale: Measured over predicted compute time.
        comm_scale: Measured over predicted communication time, or None if none was predicted.
    """

    compute_scale: float
    comm_scale: float | None

    def describe(self) -> str:
        comm = "n/a" if self.comm_scale is None else f"{self.comm_scale:.2f}x"
        return f"compute {self.compute_scale:.2f}x the profile, communication {comm} the topology"


def calibration_of(report: RunReport) -> Calibration:
    """The scales a run's report implies.

    Raises:
        RunError: The report has no predicted-vs-measured comparison (the run did not find the
            plan's profile) or predicted no compute.
    """
    if report.comparison is None:
        raise RunError(
            f"report of {report.plan} has no predicted-vs-measured table (the run did not find "
            "the plan's profile); keep the profile where the plan says and run again"
        )
    replicas = {s.stage: len(s.ranks) for s in report.stages}
    update_ms = {s.stage: s.update_s_per_step * 1e3 for s in report.stages}
    rows = report.comparison.stages
    predicted = sum(c.predicted_compute_ms * replicas[c.stage] for c in rows)
    measured = sum((c.measured_compute_ms + update_ms[c.stage]) * replicas[c.stage] for c in rows)
    if predicted <= 0:
        raise RunError("the prediction has no compute time to calibrate; check the profile")
    predicted_comm = sum(c.predicted_comm_ms * replicas[c.stage] for c in rows)
    measured_comm = sum(c.measured_comm_ms * replicas[c.stage] for c in rows)
    comm = measured_comm / predicted_comm if predicted_comm > 0 and measured_comm > 0 else None
    return Calibration(compute_scale=measured / predicted, comm_scale=comm)


def check_report_matches(
    report: RunReport, plan: Plan, profile: Profile, *, report_path: str | None = None
) -> None:
    """Check that ``plan`` (and its ``profile``) is what the run behind ``report`` ran.

    A plan or profile replaced after the run (e.g. by an earlier ``plan --calibrate`` written over
    them) would be rescaled a second time: the scaling would compound without anyone seeing it.

    Raises:
        RunError: The plan's model, schedule or sizes differ from the report's, or the profile was
            already calibrated from this same run.
    """
    what = f"report {report_path or report.plan}"
    mine = (plan.profile.model, str(plan.schedule), plan.minibatch_size, plan.microbatches)
    ran = (report.model, report.schedule, report.minibatch_size, report.microbatches)
    devices = 1 + max(max(stage.ranks) for stage in plan.stages)
    if mine != ran or devices != report.world_size:
        raise RunError(
            f"{what} ran {ran[0]} ({ran[1]}, minibatch {ran[2]} = {ran[3]} microbatches, "
            f"{report.world_size} processes) but {report.plan} now holds {mine[0]} ({mine[1]}, "
            f"minibatch {mine[2]} = {mine[3]} microbatches, {devices} processes): the plan was "
            "replaced after the run; run the plan again and calibrate from the new report"
        )
    if profile.calibration and profile.calibration.startswith(f"{_NOTE_PREFIX}{report.plan}:"):
        raise RunError(
            f"the profile of {report.plan} was already calibrated from this run "
            f"({profile.calibration}); calibrating again would compound the scaling; "
            "run the plan again and calibrate from the new report"
        )


def calibrate(
    profile: Profile, topology: Topology, report: RunReport, *, plan: Plan | None = None
) -> tuple[Profile, Topology]:
    """``profile`` and ``topology`` rescaled to what ``report`` measured.

    Args:
        profile: The profile the run's plan was made from.
        topology: The topology it assumed.
        report: The run's report.
        plan: The plan that was run; given, communication is calibrated by :func:`fit_latency`.
    """
    cal = calibration_of(report)
    k = cal.compute_scale
    layers = tuple(
        dataclasses.replace(
            layer,
            forward_ms=layer.forward_ms * k,
            backward_ms=layer.backward_ms * k,
            forward_samples_ms=(),
            backward_samples_ms=(),
        )
        for layer in profile.layers
    )
    note = f"{_NOTE_PREFIX}{report.plan}: {cal.describe()}"
    if profile.calibration:  # a run of a calibrated plan: scales relative to it, both recorded
        note += f"; before that, {profile.calibration}"
    calibrated = dataclasses.replace(
        profile,
        layers=layers,
        calibration=note,
        whole_step_ms=None if profile.whole_step_ms is None else profile.whole_step_ms * k,
    )
    if plan is not None and len(plan.stages) > 1:
        return calibrated, fit_latency(plan, calibrated, topology, report.samples_per_s)
    if cal.comm_scale is None:
        return calibrated, topology
    levels = tuple(
        dataclasses.replace(
            level, bandwidth_bytes_per_s=level.bandwidth_bytes_per_s / cal.comm_scale
        )
        for level in topology.levels
    )
    return calibrated, dataclasses.replace(topology, levels=levels)


def fit_latency(
    plan: Plan,
    profile: Profile,
    topology: Topology,
    samples_per_s: float,
    *,
    upper_s: float = 0.05,
    iterations: int = 25,
) -> Topology:
    """``topology`` with every level's latency set so that ``plan`` simulates at ``samples_per_s``.

    The simulated rate falls as latency grows, so bisection finds it; 0 when compute alone
    already explains the measured rate, ``upper_s`` at most.
    """
    from planner.simulate import simulate

    def with_latency(latency_s: float) -> Topology:
        levels = tuple(dataclasses.replace(level, latency_s=latency_s) for level in topology.levels)
        return dataclasses.replace(topology, levels=levels)

    def rate(latency_s: float) -> float:
        return simulate(
            dataclasses.replace(plan, topology=with_latency(latency_s)), profile
        ).samples_per_s

    if rate(0.0) <= samples_per_s:
        return with_latency(0.0)
    lo, hi = 0.0, upper_s
    if rate(hi) > samples_per_s:
        return with_latency(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) > samples_per_s else (lo, mid)
    return with_latency((lo + hi) / 2)
