"""Planner speed and memory at scale, every schedule, plus "does not fit" answers.

Each case runs in its own process (so its peak RSS, ``resource.getrusage``, is its own) with a
time limit; one line per case: wall seconds, peak RSS, the goal, and the plan found.

* PipeDream's ResNet-50 profile on 4x2 (its optimizer takes 44 s here): its own cost model and the
  planner's (32 GiB), goal 0.2 s;
* the synthetic branched 1,500-layer profile (:func:`planner.optimize.synthetic.branched_profile`,
  seed 0) on 16, 2x8 and 128x8 devices, schedules pipedream, 1f1b and gpipe (``M`` = devices);
  goal 10 s and 2 GiB each, 1 s at 16 devices;
* gpt2-tiny (profiled here at batch 8, once, with ``plan profile``) on 32, 128 and 1,024 devices,
  every schedule; goal 10 s and 2 GiB, 1 s at 32 devices (the issue's 16-device figure);
* infeasible or absurd requests through the CLI (``planner.cli.main``, one line and exit 2, or a
  plan): resnet50 on 8 devices of 1 GiB, ``--gpus 1000000000``, ``--batch-size 10**12``;
  goal 2 s and 2 GiB. These include the command's imports.

    python benchmarks/planner_speed.py [--timeout 120] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SOLVE = """
import json, resource, sys, time
from planner.optimize import dp
from planner.optimize.cost import CostModel, SolverOptions
from planner.optimize.synthetic import branched_profile
from planner.profile import Profile
from planner.schedules import Schedule
from planner.topology import Topology
kind, source, gpus, per_node, schedule = sys.argv[1:6]
gpus, per_node = int(gpus), int(per_node) or None
m = 1 if schedule == "pipedream" else gpus
options = SolverOptions(schedule=Schedule(schedule), microbatches=m)
if kind == "synthetic":
    profile = branched_profile(1500, seed=0)
    topology = Topology.from_args(gpus=gpus, gpus_per_node=per_node)
elif kind == "gpt2":
    profile = Profile.load(source)
    topology = Topology.from_args(gpus=gpus, gpus_per_node=per_node)
else:  # PipeDream's ResNet-50 profile, 25 GB/s inside a server, 10 GB/s across
    from planner.optimize.cost import PIPEDREAM_DEFAULT_MEMORY_BYTES, CostModelKind
    from planner.profile.pipedream import pipedream_preprocess, read_graph_txt
    from planner.topology import GIB
    profile = pipedream_preprocess(read_graph_txt(source, model="resnet50", batch_size=128))
    pipedream = kind == "resnet50-pipedream"
    topology = Topology.from_args(
        gpus=gpus, gpus_per_node=per_node, bandwidth_gbps=25, inter_node_bandwidth_gbps=10,
        memory_gb=PIPEDREAM_DEFAULT_MEMORY_BYTES / GIB if pipedream else 32)
    if pipedream:
        options = SolverOptions(cost_model=CostModelKind.PIPEDREAM, allow_fewer_devices=False)
cost = CostModel(profile, topology, options)
start = time.perf_counter()
part = dp.solve(cost)
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall": wall, "rss": rss, "stages": len(part.stages),
                  "devices": part.num_devices_used, "objective_ms": part.objective_s * 1e3}))
"""

_CLI = """
import json, resource, sys, time
start = time.perf_counter()
from planner.cli import main
code = main(sys.argv[1:])
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall": wall, "rss": rss, "exit": code}))
"""


def _run(code: str, args: list[str], timeout: float) -> tuple[dict | None, str]:
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return None, f"killed after {timeout:g} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"failed in {time.perf_counter() - start:.1f} s: {tail[:150]}"
    result = json.loads(lines[-1])
    errors = [line for line in done.stderr.splitlines() if line.startswith("plan:")]
    return result, errors[-1][:160] if errors else ""


def _gpt2_tiny(folder: Path) -> Path:
    path = folder / "gpt2-tiny.json"
    argv = ["profile", "--model", "gpt2-tiny", "--batch-size", "8", "-o", str(path)]
    code = "import sys\nfrom planner.cli import main\nraise SystemExit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, cwd=ROOT)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  {platform.machine()}, "
        f"{os.cpu_count()} cores, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, "
        f"Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        solves = []
        graph = ROOT.parent / "shared" / "pipedream-profiles" / "resnet50" / "graph.txt"
        if graph.is_file():  # PipeDream's optimizer takes 44 s on this one (goal 0.2 s)
            for kind in ("resnet50-pipedream", "resnet50-planner"):
                name = f"PipeDream ResNet-50, 4x2, {kind.split('-')[1]} cost model, pipedream"
                solves.append((name, 0.2, [kind, str(graph), "8", "4", "pipedream"]))
        for gpus, per in ((16, 0), (16, 8), (1024, 8)):
            for schedule in ("pipedream", "1f1b", "gpipe"):
                shape = f"{gpus // per}x{per}" if per else str(gpus)
                goal = 1.0 if gpus <= 16 and not per else 10.0
                solves.append(
                    (
                        f"synthetic 1,500 layers, {shape}, {schedule}",
                        goal,
                        ["synthetic", "-", str(gpus), str(per), schedule],
                    )
                )
        tiny: Path | None = None
        for gpus in (32, 128, 1024):
            for schedule in ("pipedream", "1f1b", "gpipe"):
                goal = 1.0 if gpus <= 32 else 10.0
                solves.append(
                    (f"gpt2-tiny, {gpus}, {schedule}", goal, ["gpt2", "", str(gpus), "0", schedule])
                )
        for name, goal, case in solves:
            if args.only not in name:
                continue
            if case[0] == "gpt2":
                tiny = tiny or _gpt2_tiny(folder)
                case[1] = str(tiny)
            result, note = _run(_SOLVE, case, args.timeout)
            _report(
                name,
                goal,
                result,
                note,
                lambda r: (
                    f"{r['stages']} stages on {r['devices']} devices, {r['objective_ms']:.4g} ms"
                ),
            )
        out = str(folder / "plan.json")
        clis = [
            (
                "infeasible: resnet50, 8 devices of 1 GiB",
                ["--model", "resnet50", "--gpus", "8", "--memory-gb", "1", "-o", out],
            ),
            (
                "absurd: resnet50, --gpus 1000000000",
                ["--model", "resnet50", "--gpus", "1000000000", "-o", out],
            ),
            (
                "absurd: resnet50, --batch-size 10**12",
                ["--model", "resnet50", "--gpus", "8", "--batch-size", str(10**12), "-o", out],
            ),
        ]
        for name, argv in clis:
            if args.only not in name:
                continue
            result, note = _run(_CLI, argv, args.timeout)
            _report(name, 2.0, result, note, lambda r: f"exit {r['exit']}")
    return 0


def _report(name, goal, result, note, what) -> None:
    if result is None:
        print(f"{name}: {note}; goal {goal:g} s: NOT MET")
        return
    ok = result["wall"] <= goal and result["rss"] <= 2048
    print(
        f"{name}: {result['wall']:.2f} s, peak RSS {result['rss']:.0f} MiB, goal {goal:g} s / "
        f"2 GiB: {'met' if ok else 'NOT MET'}; {what(result)}" + (f"; {note}" if note else "")
    )


if __name__ == "__main__":
    raise SystemExit(main())
