"""How fast the simulator is: 100 minibatches of a 16-stage plan, every schedule.

Goal (issue 5): under 2 s each on this machine. Run from the repository root:

    python benchmarks/simulate_speed.py

The plan is synthetic (160 layers with uneven costs, 16 stages on 2 x 8 devices, 16 microbatches
per minibatch), so the benchmark needs no profile file; the time includes building the events
and memory DataFrames, not drawing.
"""

from __future__ import annotations

import argparse
import platform
import time

from planner.plan import Plan, PlanStage, Prediction, ProfileRef
from planner.profile.format import LayerProfile, Profile
from planner.schedules import PER_STAGE_SCHEDULES, OptimizerKind, Schedule
from planner.simulate import simulate
from planner.topology import Topology

GOAL_S = 2.0


def synthetic(stages: int, microbatches: int, schedule: Schedule) -> tuple[Plan, Profile]:
    """A 10-layers-per-stage chain with skip connections over every other layer."""
    count = 10 * stages
    layers = tuple(
        LayerProfile(
            name=f"l{i}",
            op="Conv2d",
            forward_ms=1.0 + (i * 7) % 5,
            backward_ms=2.0 + (i * 3) % 4,
            output_bytes=(4_000_000,),
            parameter_bytes=2_000_000,
            inputs=tuple(j for j in (i - 1, i - 2) if j >= 0 and (j == i - 1 or i % 2 == 0)),
        )
        for i in range(count)
    )
    profile = Profile(model="synthetic", batch_size=32, layers=layers)
    plan_stages = tuple(
        PlanStage(
            layers=tuple(f"l{i}" for i in range(10 * s, 10 * s + 10)),
            replicas=1,
            ranks=(s,),
            compute_s=0.0,
            comm_s=0.0,
            allreduce_s=0.0,
            time_s=0.0,
            memory_bytes=0.0,
        )
        for s in range(stages)
    )
    plan = Plan(
        profile=ProfileRef(
            path="synthetic.json", sha256="0" * 64, model="synthetic", batch_size=32
        ),
        topology=Topology.from_args(gpus=stages, gpus_per_node=8),
        schedule=schedule,
        optimizer=OptimizerKind.SGD,
        minibatch_size=32 * microbatches,
        microbatch_size=32,
        microbatches=microbatches,
        stages=plan_stages,
        predicted=Prediction(
            bottleneck_s=1.0,
            minibatch_s=1.0,
            samples_per_s=1.0,
            single_device_s=1.0,
            data_parallel_s=None,
        ),
    )
    return plan, profile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--minibatches", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}  python {platform.python_version()}  {platform.machine()}")
    worst = 0.0
    for schedule in PER_STAGE_SCHEDULES:
        plan, profile = synthetic(args.stages, args.microbatches, schedule)
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            result = simulate(plan, profile, minibatches=args.minibatches)
            best = min(best, time.perf_counter() - start)
        worst = max(worst, best)
        print(
            f"{schedule:>9}: {args.minibatches} minibatches x {args.microbatches} microbatches x "
            f"{args.stages} stages, {len(result.events):,} events: {best:.3f} s "
            f"({best / GOAL_S:.2f} of the {GOAL_S:g} s goal)"
        )
    print(
        f"slowest: {worst:.3f} s, {worst / GOAL_S:.2f} x the goal -> "
        f"{'OK' if worst < GOAL_S else 'TOO SLOW'}"
    )
    return 0 if worst < GOAL_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
