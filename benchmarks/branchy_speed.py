"""Branchy DAGs: DP wall time, peak memory and the certified gap (issue 11, item 2).

Profiles: torchvision ``inception_v3`` and ``googlenet`` as shipped in ``profiles/`` (batch 8,
measured here), and the synthetic NASNet-like profile
(:func:`planner.optimize.synthetic.nasnet_profile`, 28 cells, 1,695 layers). Topologies: 8, 16,
64 devices on one level (25 GB/s) and 2x4, 8x8 (servers of 4 / 8 at 25 GB/s, 10 GB/s across),
16 GiB each. Every schedule (``M`` = devices for ``1f1b``/``gpipe``, the default minibatch of
one profiled batch per device; 1 for ``pipedream``) and both cost models (the ``pipedream`` one
with PipeDream's defaults: 16e9 bytes, every device used).

Each case runs in a fresh process (cold caches, its own peak RSS): building the state space,
the DP (``planner.optimize.dp.solve``), and the certificate (``bounds.certify``: the lower bound
and the gap). A case that passes ``--timeout`` seconds is reported as such. Prints a markdown
table for benchmarks/RESULTS.md.

    python benchmarks/branchy_speed.py [--timeout 60] [--only inception_v3] [--cost-model planner]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("inception_v3", "googlenet", "nasnet")
TOPOLOGIES = ("8", "16", "64", "2x4", "8x8")
SCHEDULES = ("pipedream", "1f1b", "gpipe")
COST_MODELS = ("planner", "pipedream")


def _case(profile_name: str, topology: str, schedule: str, cost_model: str) -> dict:
    """Run one case in this process and return its numbers."""
    from planner.optimize import dp
    from planner.optimize.bounds import certify, lower_bound
    from planner.optimize.cost import (
        PIPEDREAM_DEFAULT_MEMORY_BYTES,
        CostModel,
        CostModelKind,
        SolverOptions,
    )
    from planner.optimize.states import build_states
    from planner.optimize.synthetic import nasnet_profile
    from planner.profile import Profile
    from planner.schedules import Schedule
    from planner.topology import Topology

    if profile_name == "nasnet":
        profile = nasnet_profile()
    else:
        profile = Profile.load(ROOT / "profiles" / f"{profile_name}.json")
    if "x" in topology:
        nodes, per = (int(x) for x in topology.split("x"))
        topo = Topology.from_args(gpus=nodes * per, gpus_per_node=per)
    else:
        topo = Topology.from_args(gpus=int(topology))
    kind = CostModelKind(cost_model)
    sched = Schedule(schedule)
    options = SolverOptions(
        schedule=sched,
        microbatches=1 if sched is Schedule.PIPEDREAM else topo.num_devices,
        cost_model=kind,
        allow_fewer_devices=kind is CostModelKind.PLANNER,
        memory_bytes=PIPEDREAM_DEFAULT_MEMORY_BYTES if kind is CostModelKind.PIPEDREAM else None,
    )
    cost = CostModel(profile, topo, options)
    start, cpu = time.perf_counter(), time.process_time()
    space = build_states(profile, "antichain" if kind is CostModelKind.PIPEDREAM else "auto")
    states_s = time.perf_counter() - start
    try:
        part = dp.solve(cost)
    except Exception as exc:  # report, do not hide: e.g. nothing fits
        return {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    solved = time.perf_counter()
    certified = certify(part, cost, complete=space.complete)
    bound = lower_bound(cost)
    end = time.perf_counter()
    return {
        "layers": len(profile),
        "states": len(space),
        "space": space.kind,
        "states_s": states_s,
        "dp_s": solved - start,
        "bound_s": end - solved,
        "total_s": end - start,
        "cpu_s": time.process_time() - cpu,
        "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "objective_s": part.objective_s,
        "bound": bound,
        "gap": certified.gap,
        "optimal": certified.optimal,
        "stages": len(part.stages),
        "replicas": [s.replicas for s in part.stages],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--only", nargs="*", default=list(PROFILES), choices=PROFILES)
    parser.add_argument("--topologies", nargs="*", default=list(TOPOLOGIES))
    parser.add_argument("--schedules", nargs="*", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument(
        "--cost-model", nargs="*", default=list(COST_MODELS), choices=COST_MODELS, dest="models"
    )
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_case(*args.case)))
        return
    load = os.getloadavg()
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )
    print(
        "| profile | devices | schedule | cost model | states | seconds | peak RSS GiB | objective s "
        "| gap | stages (replicas) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.only:
        for model in args.models:
            for topology in args.topologies:
                for schedule in args.schedules:
                    cmd = [sys.executable, __file__, "--case", name, topology, schedule, model]
                    try:
                        run = subprocess.run(
                            cmd, capture_output=True, text=True, timeout=args.timeout, check=False
                        )
                    except subprocess.TimeoutExpired:
                        row = f"> {args.timeout:.0f} s (stopped) | | | | |"
                        print(f"| {name} | {topology} | {schedule} | {model} | {row}", flush=True)
                        continue
                    if run.returncode != 0:
                        tail = run.stderr.strip().splitlines()[-1:] or ["?"]
                        print(f"| {name} | {topology} | {schedule} | {model} | failed: {tail[0]} |")
                        continue
                    r = json.loads(run.stdout.strip().splitlines()[-1])
                    if "error" in r:
                        print(f"| {name} | {topology} | {schedule} | {model} | {r['error']} |")
                        continue
                    gap = "proven optimal" if r["optimal"] else f"{100 * r['gap']:.2f}%"
                    reps = ",".join(str(m) for m in r["replicas"])
                    if len(reps) > 40:
                        reps = reps[:39] + "…"
                    print(
                        f"| {name} | {topology} | {schedule} | {model} | {r['states']} "
                        f"| {r['total_s']:.2f} | {r['rss_gib']:.2f} | {r['objective_s']:.5g} "
                        f"| {gap} | {r['stages']} ({reps}) |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
