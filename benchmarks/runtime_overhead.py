"""The runtime's own time per operation and its optimizer step per parameter byte: what a rank
spends beyond its layers' compute and beyond waiting for its inputs (the ``cpu-loopback`` preset's
``op_overhead_s`` and ``update_s_per_byte``).

For the two-rank cases of ``benchmarks/predicted_vs_measured.py`` that run a flushed schedule
(the mlp under 1f1b, gpt2-tiny under gpipe, gpt2-tiny data parallel on 2 replicas): profile and
plan each as that benchmark does, train it with ``plan run``'s defaults in spawned ranks, and read
every rank's report. A rank's wall time is ``compute + wait + sync + send + update + other``
(:class:`planner.runtime.report.RankStats`); the part that neither the profile (compute), the links
(wait), the all-reduce (sync) nor the optimizer step (update) accounts for is

    overhead per op = (send_s + other_s) / (steps x 2 x microbatches per step)

that is: posting isends and irecvs (gloo's calls are synchronous enough to cost 0.05-0.5 ms each
on this VM), unflattening boundary values, the executor's bookkeeping, the data slices and the
loss, spread over the rank's forward and backward operations. The simulator charges it on the
rank for every operation (``Topology.op_overhead_s``), so the rank's next operation and every
rank waiting on it move as they do in the run. The optimizer step is timed apart
(``update_s``) and divided by the bytes of the parameters the rank updates, per optimizer kind
(the mlp case is also run with momentum and adam): the simulator charges
``Topology.update_s_per_byte`` x a stage's parameter bytes after each minibatch.

Usage:
    python benchmarks/predicted_vs_measured.py is the end-to-end check; this script prints the
    per-operation overhead of each case and rank, and the median the preset uses:

    python benchmarks/runtime_overhead.py [--steps 12] [--repeats 3] [--json out.json]

The gradient all-reduce of gloo on CPU is measured by ``benchmarks/loopback_links.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import predicted_vs_measured as pvm  # noqa: E402  (a sibling script, not a package)

from planner.profile.conditions import DEFAULT_PROFILE_RANKS, rank_threads  # noqa: E402
from planner.schedules import OptimizerKind  # noqa: E402

__all__ = ["CASES", "OPTIMIZERS", "main", "overhead_per_op"]

CASES = ("mlp 1f1b 2 stages", "gpt2-tiny gpipe 2 stages", "gpt2-tiny data parallel x2")
"""The flushed two-rank cases of predicted_vs_measured.py (pipedream updates per microbatch)."""

OPTIMIZERS = (OptimizerKind.MOMENTUM, OptimizerKind.ADAM)
"""Optimizers the mlp case also runs with, for their step's cost (sgd is every case's)."""


def overhead_per_op(rank: dict[str, Any]) -> float:
    """Seconds per forward or backward that a rank's report puts in sends and other."""
    ops = rank["steps"] * 2 * rank["microbatches_per_step"]
    busy = rank["wall_s"] - rank["compute_s"] - rank["wait_s"] - rank["sync_s"] - rank["update_s"]
    return busy / ops if ops else 0.0


def _targets() -> list[Any]:
    """The cases, then the mlp case with each of :data:`OPTIMIZERS`."""
    cases = [t for t in pvm.TARGETS if t.name in CASES]
    mlp = next(t for t in cases if t.name == CASES[0])
    return cases + [
        dataclasses.replace(mlp, name=f"{mlp.name} {kind}", optimizer=kind) for kind in OPTIMIZERS
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case")
    parser.add_argument("--steps", type=int, default=12, help="steps per run (first is warm-up)")
    parser.add_argument("--out", default=None, help="keep profiles, plans and reports here")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    out = Path(args.out or tempfile.mkdtemp(prefix="overhead-"))
    threads = rank_threads(ranks_on_host=DEFAULT_PROFILE_RANKS)
    rows: list[dict[str, Any]] = []
    for target in _targets():
        folder = out / target.name.replace(" ", "_")
        profile = pvm.profile_target(target, folder)
        plan, _ = pvm.build_plan(profile, folder / "profile.json", pvm.DEFAULT_TOPOLOGY, target)
        stage_params = [
            sum(profile.layers[profile.index(n)].parameter_bytes for n in st.layers)
            for st in plan.stages
        ]
        for i in range(args.repeats):
            run = pvm._run(plan, folder, f"run-{i}", args.steps)
            for rank in run["report"]["ranks"]:
                steps_ops = rank["steps"] * 2 * rank["microbatches_per_step"]
                rows.append(
                    {
                        "case": target.name,
                        "optimizer": str(target.optimizer),
                        "run": i,
                        "rank": rank["rank"],
                        "load": round(run["load"], 2),
                        "overhead_us_per_op": overhead_per_op(rank) * 1e6,
                        "send_us_per_op": rank["send_s"] / steps_ops * 1e6,
                        "update_us_per_op": rank["update_s"] / steps_ops * 1e6,
                        "update_ns_per_byte": rank["update_s"]
                        / (rank["steps"] * stage_params[rank["stage"]])
                        * 1e9,
                        "other_us_per_op": rank["other_s"] / steps_ops * 1e6,
                        "wait_ms_per_step": rank["wait_s"] / rank["steps"] * 1e3,
                        "compute_ms_per_step": rank["compute_s"] / rank["steps"] * 1e3,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  torch "
        f"{torch.__version__}, {threads} thread(s) per rank, gloo, {args.steps} steps per run "
        f"(first left out), {args.repeats} runs per case"
    )
    print(f"{'case':<30} {'us per op: overhead':>20} {'send':>7} {'update':>7} {'other':>7}  loads")
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        if not mine:
            continue

        def med(key: str, rows: list[dict[str, Any]] = mine) -> float:
            return statistics.median(r[key] for r in rows)

        print(
            f"{case:<30} {med('overhead_us_per_op'):>20.1f} {med('send_us_per_op'):>7.1f} "
            f"{med('update_us_per_op'):>7.1f} {med('other_us_per_op'):>7.1f}  "
            f"{sorted({r['load'] for r in mine})}"
        )
    overall = statistics.median(r["overhead_us_per_op"] for r in rows)
    print(f"median over every case, run and rank: {overall:.1f} us per operation")
    update = {
        kind: statistics.median(r["update_ns_per_byte"] for r in rows if r["optimizer"] == kind)
        for kind in dict.fromkeys(r["optimizer"] for r in rows)
    }
    print(
        "optimizer step, median over runs and ranks: "
        + ", ".join(f"{kind} {ns:.3f} ns per parameter byte" for kind, ns in update.items())
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "median_us": overall, "update_ns_per_byte": update}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
