"""Wall time of the DP (planner.optimize.dp.solve) on the issue's three cases, with peak memory.

* PipeDream's ResNet-50 profile on 4 x 2 GPUs (25 GB/s inside a server, 10 GB/s across); goal
  0.2 s (PipeDream's optimizer: 44 s). Solved twice: with the PipeDream-compatible cost model on
  its antichain states (the problem PipeDream's optimizer solves), and with the planner's cost
  model (32 GiB devices: at 16 GiB no plan of its batch-128 microbatches fits the pipedream
  schedule's activation stash);
* a synthetic branched 1,500-layer profile (:func:`planner.optimize.synthetic.branched_profile`)
  on 16 GPUs, one level (goal 0.5 s), and on 2 x 8;
* the same on 1,024 GPUs, 128 x 8 (goal 10 s).

Each time covers everything ``solve`` does: building the state space and its tables, the DP,
ranks, and scoring the plan. The median of ``--runs`` runs is printed, wall clock and this
process's CPU time (steadier on a shared machine); peak Python memory (tracemalloc) comes from one
extra run, as tracing slows the run down.

    python benchmarks/planner_speed.py [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from planner.optimize import dp
from planner.optimize.cost import (
    PIPEDREAM_DEFAULT_MEMORY_BYTES,
    CostModel,
    CostModelKind,
    SolverOptions,
)
from planner.optimize.synthetic import branched_profile
from planner.profile.pipedream import pipedream_preprocess, read_graph_txt
from planner.topology import Level, Topology

PROFILES = Path(__file__).resolve().parents[1] / ".." / "shared" / "pipedream-profiles"


def _resnet50_cases() -> list[tuple[str, float, Callable[[], CostModel], bool]]:
    graph = PROFILES / "resnet50" / "graph.txt"
    if not graph.is_file():
        print(f"(skipping ResNet-50: {graph} is absent)")
        return []
    profile = pipedream_preprocess(read_graph_txt(graph, model="resnet50", batch_size=128))
    pd_topology = Topology(
        levels=(
            Level(devices=4, bandwidth_bytes_per_s=25e9),
            Level(devices=2, bandwidth_bytes_per_s=10e9),
        ),
        memory_bytes=PIPEDREAM_DEFAULT_MEMORY_BYTES,
    )
    pd_options = SolverOptions(cost_model=CostModelKind.PIPEDREAM, allow_fewer_devices=False)
    ours = Topology.from_args(
        gpus=8, gpus_per_node=4, bandwidth_gbps=25, inter_node_bandwidth_gbps=10, memory_gb=32
    )
    return [
        (
            "ResNet-50 (PipeDream), 4x2, PipeDream-compatible model",
            0.2,
            lambda: CostModel(profile, pd_topology, pd_options),
            False,
        ),
        (
            "ResNet-50 (PipeDream), 4x2, planner model, 32 GiB",
            0.2,
            lambda: CostModel(profile, ours),
            False,
        ),
    ]


def _synthetic_cases() -> list[tuple[str, float, Callable[[], CostModel], bool]]:
    profile = branched_profile(1500, seed=0)
    return [
        (
            "synthetic 1,500 layers, 16 GPUs (one level)",
            0.5,
            lambda: CostModel(profile, Topology.from_args(gpus=16)),
            True,
        ),
        (
            "synthetic 1,500 layers, 2x8 GPUs",
            0.5,
            lambda: CostModel(profile, Topology.from_args(gpus=16, gpus_per_node=8)),
            True,
        ),
        (
            "synthetic 1,500 layers, 1,024 GPUs (128x8)",
            10.0,
            lambda: CostModel(profile, Topology.from_args(gpus=1024, gpus_per_node=8)),
            True,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"{datetime.date.today()}  {platform.machine()}, {os.cpu_count()} cores, load "
        f"{load[0]:.1f}, Python {platform.python_version()}, numpy {np.__version__}"
    )
    for name, goal, build, trace in _resnet50_cases() + _synthetic_cases():
        times, cpu = [], []
        for _ in range(args.runs):
            cost = build()
            start, start_cpu = time.perf_counter(), time.process_time()
            part = dp.solve(cost)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        peak = ""
        if trace:
            cost = build()
            tracemalloc.start()
            dp.solve(cost)
            peak = f", peak {tracemalloc.get_traced_memory()[1] / 2**20:.0f} MiB (tracemalloc)"
            tracemalloc.stop()
        median = statistics.median(times)
        verdict = "ok" if median <= goal else "over goal"
        print(
            f"{name}: median {median:.3f} s (min {min(times):.3f}, CPU "
            f"{statistics.median(cpu):.3f}) over {args.runs} runs, goal "
            f"{goal:g} s: {verdict}; {len(part.stages)} stages on {part.num_devices_used} "
            f"devices, {part.bottleneck_s * 1e3:.4g} ms per stage{peak}"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
