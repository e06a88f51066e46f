"""Runtime throughput of today's schedules: ours against torch.distributed.pipelining's same
schedule, on the same split.

Two local gloo ranks, one thread each. For each model and schedule, one plan (the model's layers
cut into ``p v`` virtual stages of equal layer counts, placed as torch places them) is trained by

- ours: :func:`planner.runtime.worker.train` (the ``plan run`` code path,
  :mod:`planner.runtime.chunked`);
- torch: ``plan run --engine torch`` (:mod:`planner.runtime.torch_engine`): torch's
  ``PipelineStage`` per chunk on the very same fx stage modules, driven by
  ``ScheduleInterleaved1F1B``, ``ScheduleInterleavedZeroBubble`` or ``ScheduleZBVZeroBubble``.

Samples/s = minibatch size / mean step time on the rank holding the last stage, warm-up steps
left out. Rounds alternate ours and torch so background load hits both alike; the median round
is reported, with the load average before and after (the machine may be shared).

Usage:
    python benchmarks/runtime_schedules.py                     # mlp and gpt2-tiny, 3 rounds
    python benchmarks/runtime_schedules.py --models mlp --schedules zb-h1 --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from planner.models import load_model
from planner.plan import Plan, PlanStage, Prediction, ProfileRef
from planner.profile.capture import capture
from planner.rank_schedules import stage_ranks
from planner.runtime.config import Backend, Engine, RunConfig
from planner.runtime.worker import DistEnv, load_spec, train
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Topology

__all__ = ["Case", "main", "make_plan"]

MODELS = {"mlp": "runtime_throughput:mlp", "gpt2-tiny": "gpt2-tiny"}
CHUNKS = {Schedule.INTERLEAVED_1F1B: 2, Schedule.ZB_H1: 1, Schedule.ZBV: 2}


@dataclass(frozen=True, kw_only=True)
class Case:
    model: str
    schedule: Schedule
    microbatches: int
    microbatch_size: int
    steps: int
    warmup: int


def make_plan(case: Case, *, ranks: int = 2) -> Plan:
    """``case``'s model cut into ``p v`` stages of equal layer counts, laid out as torch does."""
    name = MODELS[case.model]
    spec = load_model(name, batch_size=case.microbatch_size)
    captured = capture(spec.module)
    names = [layer.name for layer in captured.layers]
    chunks = CHUNKS[case.schedule]
    count = ranks * chunks
    where = stage_ranks(case.schedule, ranks=ranks, chunks=chunks)
    stages = tuple(
        PlanStage(
            layers=tuple(names[len(names) * s // count : len(names) * (s + 1) // count]),
            replicas=1,
            ranks=(where[s],),
            compute_s=0.0,
            comm_s=0.0,
            allreduce_s=0.0,
            time_s=0.0,
            memory_bytes=0.0,
        )
        for s in range(count)
    )
    return Plan(
        profile=ProfileRef(
            path="benchmark",
            sha256="0" * 64,
            model=name,
            batch_size=case.microbatch_size,
            graph_hash=captured.graph_hash,
            input_shape=spec.input_shape,
        ),
        topology=Topology.from_args(gpus=ranks),
        schedule=case.schedule,
        chunks=chunks,
        optimizer=OptimizerKind.SGD,
        minibatch_size=case.microbatches * case.microbatch_size,
        microbatch_size=case.microbatch_size,
        microbatches=case.microbatches,
        stages=stages,
        predicted=Prediction(
            bottleneck_s=1.0,
            minibatch_s=1.0,
            samples_per_s=1.0,
            single_device_s=1.0,
            data_parallel_s=None,
        ),
    )


def _config(case: Case, tmp: str, engine: Engine) -> RunConfig:
    return RunConfig(
        plan_path=os.path.join(tmp, "plan.json"),
        steps=case.warmup + case.steps,
        lr=0.01,
        timeout_s=120,
        log_every=0,
        backend=Backend.GLOO,  # the CPU for both, also on a CUDA host
        threads=1,
        engine=engine,
    )


def _ours(rank: int, case: Case, port: int, tmp: str) -> float | None:
    plan = make_plan(case)
    config = _config(case, tmp, Engine.OURS)
    result = train(
        plan, lambda: load_spec(plan), config, DistEnv(rank=rank, world_size=2, master_port=port)
    )
    if result.report is None:  # rank 0 has the report: the last stage's rank's step times
        return None
    walls = [s.wall_s for s in result.report.step_stats[case.warmup :]]
    return plan.minibatch_size / statistics.mean(walls)


def _torch(rank: int, case: Case, port: int, tmp: str) -> float | None:
    from planner.runtime.torch_engine import train_torch

    plan = make_plan(case)
    walls: list[float] = []
    train_torch(
        plan,
        lambda: load_spec(plan),
        _config(case, tmp, Engine.TORCH),
        DistEnv(rank=rank, world_size=2, master_port=port),
        on_step=lambda step, seconds: walls.append(seconds),
    )
    if rank != plan.stages[-1].ranks[0]:
        return None
    return plan.minibatch_size / statistics.mean(walls[case.warmup :])


def _rank(rank: int, cases: list[Case], rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    results: list[dict] = []
    for r in range(rounds):
        for case in cases:
            for impl in ("ours", "torch"):
                port = int(Path(out, f"port-{r}-{case.model}-{case.schedule}-{impl}").read_text())
                run = _ours if impl == "ours" else _torch
                rate = run(rank, case, port, out)
                if rate is not None:
                    results.append(
                        {
                            "round": r,
                            "model": case.model,
                            "schedule": str(case.schedule),
                            "impl": impl,
                            "samples_per_s": rate,
                        }
                    )
    Path(out, f"results-{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,gpt2-tiny", help="comma-separated: mlp, gpt2-tiny")
    parser.add_argument("--schedules", default="interleaved-1f1b,zb-h1,zbv")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median kept)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    cases = [
        Case(
            model=m,
            schedule=Schedule(s),
            microbatches=args.microbatches,
            microbatch_size=args.microbatch_size,
            steps=args.steps,
            warmup=args.warmup,
        )
        for m in args.models.split(",")
        for s in args.schedules.split(",")
    ]
    for case in cases:
        make_plan(case)  # a shape torch refuses fails here, before any process starts
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for case in cases:
                for impl in ("ours", "torch"):
                    Path(tmp, f"port-{r}-{case.model}-{case.schedule}-{impl}").write_text(
                        str(_free_port())
                    )
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_rank, args=(cases, args.rounds, tmp), nprocs=2, join=True)
        rows = [
            row
            for rank in (0, 1)
            for row in json.loads(Path(tmp, f"results-{rank}.json").read_text())
        ]
    load_after = os.getloadavg()
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC  torch {torch.__version__}  "
        f"2 gloo ranks x 1 thread, {os.cpu_count()} cores, minibatch {args.microbatches} x "
        f"{args.microbatch_size}, {args.steps} timed steps, median of {args.rounds} rounds"
    )
    print(
        "load average (1, 5, 15 min) before "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + "; after "
        + ", ".join(f"{x:.2f}" for x in load_after)
    )
    print(
        f"{'model':<10} {'schedule':<17} {'ours samples/s':>15} {'torch samples/s':>16} "
        f"{'ours/torch':>10}  rounds (ours/torch)"
    )
    summary = []
    for case in cases:

        def rates(impl: str, case: Case = case) -> list[float]:
            return [
                x["samples_per_s"]
                for x in sorted(rows, key=lambda x: x["round"])
                if x["model"] == case.model
                and x["schedule"] == str(case.schedule)
                and x["impl"] == impl
            ]

        ours, theirs = rates("ours"), rates("torch")
        per_round = " ".join(f"{a / b:.2f}" for a, b in zip(ours, theirs, strict=True))
        mo, mt = statistics.median(ours), statistics.median(theirs)
        summary.append(
            dataclasses.asdict(case)
            | {"ours_samples_per_s": mo, "torch_samples_per_s": mt, "ratio": mo / mt}
        )
        print(
            f"{case.model:<10} {case.schedule!s:<17} {mo:>15.1f} {mt:>16.1f} {mo / mt:>10.2f}  "
            f"{per_round}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": str(datetime.date.today()),
                    "torch": torch.__version__,
                    "load_before": load_before,
                    "load_after": load_after,
                    "args": vars(args),
                    "results": summary,
                    "rounds": rows,
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
