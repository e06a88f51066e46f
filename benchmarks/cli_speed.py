"""Wall time of `plan --model resnet50 --gpus 8` from the shipped profile (goal: under 5 s).

Runs the real console entry point as a fresh process (interpreter start, imports, planning,
baselines, writing the plan) several times in a temporary folder and prints the median.

    python benchmarks/cli_speed.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

GOAL_S = 5.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--gpus", default="8")
    args = parser.parse_args()
    times = []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "planner.cli", "--model", args.model, "--gpus", args.gpus],
                cwd=folder,
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"plan --model {args.model} --gpus {args.gpus}: median {median:.2f} s over {args.runs} runs "
        f"(min {min(times):.2f}, max {max(times):.2f}); goal {GOAL_S:.0f} s, "
        f"ratio to goal {median / GOAL_S:.2f}"
    )
    return 0 if median <= GOAL_S else 1


if __name__ == "__main__":
    sys.exit(main())
