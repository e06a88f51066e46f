"""Predicted against measured: the simulator's view of a plan beside what a run measured.

The prediction comes from :func:`planner.simulate.simulate` on the plan's profile (found at the
path the plan records, as given or relative to the plan file, and checked by sha256). Per stage
and per step of one replica: compute (forwards and backwards), communication (the plan's
transfer time per microbatch), and the idle share (the bubble); for the run, samples/s.

Example:
    >>> comparison = compare_run(report, plan, "plan.json")        # doctest: +SKIP
    >>> print(comparison.describe())                               # doctest: +SKIP
"""

from __future__ import annotations

import os

from planner.errors import PlanError
from planner.plan import Plan, file_sha256, find_profile_file
from planner.profile.format import Profile
from planner.runtime.report import Comparison, RunReport, StageComparison

__all__ = ["compare_run", "find_profile"]


def find_profile(plan: Plan, plan_path: str | os.PathLike[str]) -> Profile | None:
    """The plan's profile if it is where the plan says (or beside the plan) and unchanged."""
    try:
        candidate = find_profile_file(plan, plan_path)
    except PlanError:
        return None
    return Profile.load(candidate) if file_sha256(candidate) == plan.profile.sha256 else None


def compare_run(
    report: RunReport, plan: Plan, plan_path: str | os.PathLike[str], profile: Profile | None = None
) -> Comparison | None:
    """Predicted against measured for a finished run; None when the profile is not found."""
    from planner.simulate import plan_stages, simulate

    profile = profile if profile is not None else find_profile(plan, plan_path)
    if profile is None:
        return None
    simulation = simulate(plan, profile)
    sim_stages = plan_stages(plan, profile)
    rows = []
    for s, (stage, sim) in enumerate(zip(plan.stages, sim_stages, strict=True)):
        per_replica = plan.microbatches / stage.replicas
        devices = [d for d in simulation.devices if d.stage == s]
        ranks = [r for r in report.ranks if r.stage == s]
        steps = [max(r.steps, 1) for r in ranks]
        walls = [r.wall_s / n for r, n in zip(ranks, steps, strict=True)]
        busy = [
            (r.compute_s + r.sync_s + r.update_s) / n for r, n in zip(ranks, steps, strict=True)
        ]
        rows.append(
            StageComparison(
                stage=s,
                predicted_compute_ms=(sim.forward_s + sim.backward_s) * per_replica * 1e3,
                measured_compute_ms=_mean(
                    [r.compute_s / n for r, n in zip(ranks, steps, strict=True)]
                )
                * 1e3,
                predicted_comm_ms=stage.comm_s * per_replica * 1e3,
                measured_comm_ms=_mean([r.send_s / n for r, n in zip(ranks, steps, strict=True)])
                * 1e3,
                predicted_idle=_mean([d.idle_fraction for d in devices]),
                measured_idle=_mean(
                    [1 - b / w if w > 0 else 0.0 for b, w in zip(busy, walls, strict=True)]
                ),
            )
        )
    return Comparison(
        stages=tuple(rows),
        predicted_samples_per_s=simulation.samples_per_s,
        measured_samples_per_s=report.samples_per_s,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
