"""Runtime throughput: our 1f1b/gpipe against torch.distributed.pipelining on the same split.

Two local gloo ranks, one thread each, one model cut into the same two stages. For each model and
schedule, both runtimes train with SGD on the same synthetic minibatches:

- ours: :func:`planner.runtime.worker.train` with a two-stage plan (the ``plan run`` code path);
- torch: ``plan run --engine torch`` (:mod:`planner.runtime.torch_engine`): torch's
  ``PipelineStage`` on the very same stage submodules (our fx cut, so both run identical
  compute), driven by ``Schedule1F1B`` / ``ScheduleGPipe``.

Samples/s = minibatch size / mean step time on the last stage, warm-up steps left out. Rounds
alternate ours and torch so background load hits both alike; the median round is reported.

Usage:
    python benchmarks/runtime_throughput.py                    # gpt2-tiny and an MLP, 3 rounds
    python benchmarks/runtime_throughput.py --models mlp --steps 40 --json out.json
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
from torch import nn

from planner.models import ModelSpec, load_model
from planner.plan import Plan, PlanStage, Prediction, ProfileRef
from planner.profile.capture import capture
from planner.runtime.config import Backend, Engine, RunConfig
from planner.runtime.worker import DistEnv, load_spec, train
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Topology

__all__ = ["Case", "main", "make_plan", "mlp"]

MODELS = {  # name -> (model spec, first layer of stage 1)
    "gpt2-tiny": ("gpt2-tiny", "blocks_1_ln1"),
    "mlp": ("runtime_throughput:mlp", "_8"),
}


def _batch(batch_size: int, seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch_size, 512, generator=gen),), torch.randint(
        10, (batch_size,), generator=gen
    )


def mlp() -> ModelSpec:
    """Eight 512-wide Linear+ReLU layers and a classifier (about 2.1 M parameters)."""
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    module = nn.Sequential(*layers, nn.Linear(512, 10))
    return ModelSpec(
        name="runtime_throughput:mlp",
        module=module,
        input_shape=(512,),
        input_dtype=torch.float32,
        make_batch=_batch,
        loss_fn=F.cross_entropy,
    )


@dataclass(frozen=True, kw_only=True)
class Case:
    model: str
    schedule: Schedule
    microbatches: int
    microbatch_size: int
    steps: int
    warmup: int


def make_plan(case: Case) -> Plan:
    spec_name, cut = MODELS[case.model]
    spec = load_model(spec_name, batch_size=case.microbatch_size)
    captured = capture(spec.module)
    names = [layer.name for layer in captured.layers]
    at = names.index(cut)
    stages = tuple(
        PlanStage(
            layers=tuple(part),
            replicas=1,
            ranks=(rank,),
            compute_s=0.0,
            comm_s=0.0,
            allreduce_s=0.0,
            time_s=0.0,
            memory_bytes=0.0,
        )
        for rank, part in enumerate((names[:at], names[at:]))
    )
    return Plan(
        profile=ProfileRef(
            path="benchmark",
            sha256="0" * 64,
            model=spec_name,
            batch_size=case.microbatch_size,
            graph_hash=captured.graph_hash,
            input_shape=spec.input_shape,
        ),
        topology=Topology.from_args(gpus=2),
        schedule=case.schedule,
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


def _ours(rank: int, case: Case, port: int, tmp: str) -> float | None:
    plan = make_plan(case)
    config = RunConfig(
        plan_path=os.path.join(tmp, "plan.json"),
        steps=case.warmup + case.steps,
        lr=0.01,
        timeout_s=60,
        log_every=0,
        backend=Backend.GLOO,  # the CPU, as torch's side below, also on a CUDA host
        threads=1,
    )
    result = train(
        plan, lambda: load_spec(plan), config, DistEnv(rank=rank, world_size=2, master_port=port)
    )
    if result.report is None:
        return None
    walls = [s.wall_s for s in result.report.step_stats[case.warmup :]]
    return plan.minibatch_size / statistics.mean(walls)


def _torch(rank: int, case: Case, port: int, tmp: str) -> float | None:
    """``plan run --engine torch``'s code path: torch's PipelineStage on our stage cut."""
    from planner.runtime.torch_engine import train_torch

    plan = make_plan(case)
    config = RunConfig(
        plan_path=os.path.join(tmp, "plan.json"),
        steps=case.warmup + case.steps,
        lr=0.01,
        timeout_s=60,
        log_every=0,
        backend=Backend.GLOO,
        threads=1,
        engine=Engine.TORCH,
    )
    walls: list[float] = []
    train_torch(
        plan,
        lambda: load_spec(plan),
        config,
        DistEnv(rank=rank, world_size=2, master_port=port),
        on_step=lambda step, seconds: walls.append(seconds),
    )
    return plan.minibatch_size / statistics.mean(walls[case.warmup :]) if rank == 1 else None


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
    if results:
        Path(out, f"results-{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="gpt2-tiny,mlp", help="comma-separated: " + ", ".join(MODELS)
    )
    parser.add_argument("--schedules", default="1f1b,gpipe")
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
    sys.path.insert(0, str(Path(__file__).resolve().parent))
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
            if Path(tmp, f"results-{rank}.json").exists()
            for row in json.loads(Path(tmp, f"results-{rank}.json").read_text())
        ]
    summary = []
    print(
        f"{datetime.date.today()}  torch {torch.__version__}  2 gloo ranks x 1 thread, "
        f"minibatch {args.microbatches} x {args.microbatch_size}, {args.steps} timed steps, "
        f"median of {args.rounds} rounds"
    )
    print(
        f"{'model':<10} {'schedule':<8} {'ours samples/s':>15} {'torch samples/s':>16} "
        f"{'ours/torch':>10}"
    )
    for case in cases:

        def median(impl: str, case: Case = case) -> float:
            return statistics.median(
                x["samples_per_s"]
                for x in rows
                if x["model"] == case.model
                and x["schedule"] == str(case.schedule)
                and x["impl"] == impl
            )

        ours, theirs = median("ours"), median("torch")
        summary.append(
            {
                "model": case.model,
                "schedule": str(case.schedule),
                "ours_samples_per_s": ours,
                "torch_samples_per_s": theirs,
                "ratio": ours / theirs,
            }
        )
        print(
            f"{case.model:<10} {case.schedule!s:<8} {ours:>15.1f} {theirs:>16.1f} "
            f"{ours / theirs:>10.2f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": str(datetime.date.today()),
                    "torch": torch.__version__,
                    "args": vars(args),
                    "results": summary,
                    "rounds": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
