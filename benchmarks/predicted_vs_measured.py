"""Predicted against measured throughput, after calibrating on a different run.

For three plans on this machine (different models, stage counts and schedules, at most two ranks
since it has two cores; one thread per rank):

1. profile the model (``planner.profile.measure.profile_model``, one thread);
2. calibration run: a *different* two-stage plan of the same model under ``1f1b``, run with
   ``plan run``'s launcher; its report rescales the profile's compute and the topology's
   bandwidth (:func:`planner.runtime.calibrate.calibrate`);
3. target run: the plan below, predicted by the simulator from the calibrated profile and
   topology, then run; measured samples/s against predicted.

Each run is repeated ``--repeats`` times and the median kept: the host is shared and noisy.

Usage:
    python benchmarks/predicted_vs_measured.py [--steps 12] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from planner.plan import Plan, PlanStage, Prediction, ProfileRef, file_sha256
from planner.profile.format import Profile
from planner.profile.measure import profile_model
from planner.runtime.calibrate import calibrate, calibration_of
from planner.runtime.config import RunConfig
from planner.runtime.launch import launch_local
from planner.runtime.report import RunReport
from planner.schedules import OptimizerKind, Schedule
from planner.simulate import plan_stages, simulate
from planner.topology import Level, Topology

__all__ = ["Target", "build_plan", "main"]

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, kw_only=True)
class Target:
    """One plan to predict and measure."""

    model: str
    input_shape: tuple[int, ...]
    stages: int
    schedule: Schedule
    microbatches: int
    microbatch_size: int


TARGETS = (
    Target(
        model="runtime_throughput:mlp",
        input_shape=(512,),
        stages=2,
        schedule=Schedule.ONE_F_ONE_B,
        microbatches=8,
        microbatch_size=16,
    ),
    Target(
        model="gpt2-tiny",
        input_shape=(32,),
        stages=2,
        schedule=Schedule.GPIPE,
        microbatches=4,
        microbatch_size=4,
    ),
    Target(
        model="resnet18",
        input_shape=(3, 32, 32),
        stages=1,
        schedule=Schedule.PIPEDREAM,
        microbatches=4,
        microbatch_size=8,
    ),
)

# gloo over loopback: a first guess the calibration run corrects
LOOPBACK = Topology(
    levels=(Level(devices=2, bandwidth_bytes_per_s=1e9, latency_s=1e-4),), memory_bytes=16 * 1024**3
)


def _cut(profile: Profile, fraction: float) -> int:
    """The layer index where the running compute first reaches ``fraction`` of the total."""
    total, acc = profile.total_compute_ms, 0.0
    for i, layer in enumerate(profile.layers):
        acc += layer.compute_ms
        if acc >= fraction * total:
            return max(1, min(i + 1, len(profile.layers) - 1))
    return len(profile.layers) - 1


def build_plan(
    profile: Profile,
    profile_path: Path,
    topology: Topology,
    *,
    stages: int,
    fraction: float,
    schedule: Schedule,
    microbatches: int,
    microbatch_size: int,
) -> Plan:
    """A plan of one or two stages (cut at ``fraction`` of the compute), predicted by simulation."""
    names = [layer.name for layer in profile.layers]
    parts = (
        [names]
        if stages == 1
        else [names[: _cut(profile, fraction)], names[_cut(profile, fraction) :]]
    )
    dummy = tuple(
        PlanStage(
            layers=tuple(p),
            replicas=1,
            ranks=(r,),
            compute_s=0.0,
            comm_s=0.0,
            allreduce_s=0.0,
            time_s=0.0,
            memory_bytes=0.0,
        )
        for r, p in enumerate(parts)
    )
    plan = Plan(
        profile=ProfileRef(
            path=str(profile_path),
            sha256=file_sha256(profile_path),
            model=profile.model,
            batch_size=profile.batch_size,
            graph_hash=profile.graph_hash,
            input_shape=profile.input_shape,
        ),
        topology=topology,
        schedule=schedule,
        optimizer=OptimizerKind.SGD,
        minibatch_size=microbatches * microbatch_size,
        microbatch_size=microbatch_size,
        microbatches=microbatches,
        stages=dummy,
        predicted=Prediction(
            bottleneck_s=1, minibatch_s=1, samples_per_s=1, single_device_s=1, data_parallel_s=None
        ),
    )
    sims = plan_stages(plan, profile)
    real = []
    for s, (stage, sim) in enumerate(zip(dummy, sims, strict=True)):
        inbound = sims[s - 1].send_bytes if s > 0 else 0.0
        comm = 2 * (topology.transfer_s(inbound, 0) + topology.transfer_s(sim.send_bytes, 0))
        compute = sim.forward_s + sim.backward_s
        real.append(
            PlanStage(
                layers=stage.layers,
                replicas=1,
                ranks=stage.ranks,
                compute_s=compute,
                comm_s=comm,
                allreduce_s=0.0,
                time_s=max(compute, comm),
                memory_bytes=sim.static_bytes,
            )
        )
    result = simulate(dataclasses.replace(plan, stages=tuple(real)), profile)
    single = sum(s.compute_s for s in real) * microbatches
    return dataclasses.replace(
        plan,
        stages=tuple(real),
        predicted=Prediction(
            bottleneck_s=max(s.time_s for s in real),
            minibatch_s=result.minibatch_s,
            samples_per_s=result.samples_per_s,
            single_device_s=single,
            data_parallel_s=None,
        ),
    )


def _run(plan: Plan, folder: Path, name: str, steps: int) -> RunReport:
    path = folder / f"{name}.json"
    plan.save(path)
    config = RunConfig(plan_path=str(path), steps=steps, timeout_s=60, log_every=0)
    world = 1 + max(r for s in plan.stages for r in s.ranks)
    result = launch_local(config, world_size=world)
    if result.status != 0:
        raise SystemExit(f"run {name} failed: {result.returncodes}")
    return RunReport.load(config.report_file)


def _median_run(plan: Plan, folder: Path, name: str, steps: int, repeats: int) -> RunReport:
    """Run ``repeats`` times; the report with the median samples/s (a busy shared host is noisy)."""
    reports = sorted(
        (_run(plan, folder, f"{name}-{i}", steps) for i in range(repeats)),
        key=lambda r: r.samples_per_s,
    )
    return reports[len(reports) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per plan (median kept)")
    parser.add_argument("--steps", type=int, default=12, help="steps per run (first is warm-up)")
    parser.add_argument("--out", default=None, help="keep profiles, plans and reports here")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="pvm-"))
    rows = []
    for target in TARGETS:
        folder = out / target.model.replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        profile = profile_model(
            target.model,
            batch_size=target.microbatch_size,
            input_shape=target.input_shape,
            threads=1,
            progress=False,
        )
        profile.save(folder / "profile.json")
        raw = build_plan(
            profile,
            folder / "profile.json",
            LOOPBACK,
            stages=target.stages,
            fraction=0.5,
            schedule=target.schedule,
            microbatches=target.microbatches,
            microbatch_size=target.microbatch_size,
        )
        calibration = build_plan(
            profile,
            folder / "profile.json",
            LOOPBACK,
            stages=2,
            fraction=0.3,
            schedule=Schedule.ONE_F_ONE_B,
            microbatches=target.microbatches,
            microbatch_size=target.microbatch_size,
        )
        cal_report = _median_run(calibration, folder, "calibration", args.steps, args.repeats)
        cal = calibration_of(cal_report)
        cal_profile, cal_topology = calibrate(profile, LOOPBACK, cal_report, plan=calibration)
        cal_profile.save(folder / "profile-calibrated.json")
        plan = build_plan(
            cal_profile,
            folder / "profile-calibrated.json",
            cal_topology,
            stages=target.stages,
            fraction=0.5,
            schedule=target.schedule,
            microbatches=target.microbatches,
            microbatch_size=target.microbatch_size,
        )
        report = _median_run(plan, folder, "target", args.steps, args.repeats)
        predicted, measured = plan.predicted.samples_per_s, report.samples_per_s
        rows.append(
            {
                "model": target.model,
                "stages": target.stages,
                "schedule": str(target.schedule),
                "minibatch": f"{target.microbatches}x{target.microbatch_size}",
                "predicted_raw": raw.predicted.samples_per_s,
                "compute_scale": cal.compute_scale,
                "latency_ms": cal_topology.levels[0].latency_s * 1e3,
                "predicted": predicted,
                "measured": measured,
                "error": measured / predicted - 1,
            }
        )
    print(
        f"{datetime.date.today()}  torch {torch.__version__}  this machine, 1 thread per rank, "
        f"{args.steps} steps per run (first left out); calibrated on a different 2-stage 1f1b run"
    )
    print(
        f"{'model':<24} {'stages':>6} {'schedule':<9} {'minibatch':>9} {'compute x':>9} "
        f"{'lat ms':>6} {'raw pred':>9} {'cal pred':>9} {'measured':>9} {'error':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:<24} {r['stages']:>6} {r['schedule']:<9} {r['minibatch']:>9} "
            f"{r['compute_scale']:>9.2f} {r['latency_ms']:>6.2f} {r['predicted_raw']:>9.1f} {r['predicted']:>9.1f} {r['measured']:>9.1f} "
            f"{r['error']:>+7.1%}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"date": str(datetime.date.today()), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
