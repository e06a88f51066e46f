"""Predicted against measured throughput and memory, with default settings and no calibration.

For five plans on this machine (at most two ranks, since it has two cores):

1. profile the model as ``plan profile`` does by default: the threads one rank of a 2-rank
   local run gets (``cores // 2``), process CPU time for one thread, the allocator setting the
   runtime trains under (:mod:`planner.profile.conditions`);
2. build the plan (one or two stages, cut at half of the compute, or one stage on two replicas)
   on the default topology (``--gpus 2``: 25 GB/s, no latency) and predict it with the
   simulator, the plan's optimizer included;
3. run it with ``plan run``'s defaults (threads as the profile, gloo) in spawned ranks that also
   measure their peak resident memory above what the process held before building the model.

Each run is repeated ``--repeats`` times and the median kept; the load average is recorded
before each run, since the host is shared.

Usage:
    python benchmarks/predicted_vs_measured.py [--steps 12] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from planner.optimize.cost import allreduce_s
from planner.plan import Plan, PlanStage, Prediction, ProfileRef, file_sha256
from planner.profile.conditions import DEFAULT_PROFILE_RANKS, default_clock, rank_threads
from planner.profile.format import Profile
from planner.profile.measure import profile_model
from planner.runtime.config import Backend, RunConfig
from planner.runtime.worker import DistEnv, load_spec, train
from planner.schedules import OptimizerKind, Schedule
from planner.simulate import plan_stages, simulate
from planner.topology import Topology

__all__ = ["Target", "build_plan", "main"]

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, kw_only=True)
class Target:
    """One plan to predict and measure."""

    name: str
    model: str
    input_shape: tuple[int, ...]
    stages: int
    replicas: int
    schedule: Schedule
    microbatches: int
    microbatch_size: int
    optimizer: OptimizerKind = OptimizerKind.SGD


TARGETS = (
    Target(
        name="mlp 1f1b 2 stages",
        model="runtime_throughput:mlp",
        input_shape=(512,),
        stages=2,
        replicas=1,
        schedule=Schedule.ONE_F_ONE_B,
        microbatches=8,
        microbatch_size=16,
    ),
    Target(
        name="gpt2-tiny gpipe 2 stages",
        model="gpt2-tiny",
        input_shape=(32,),
        stages=2,
        replicas=1,
        schedule=Schedule.GPIPE,
        microbatches=4,
        microbatch_size=4,
    ),
    Target(
        name="resnet18 64x64 pipedream 2 stages",
        model="resnet18",
        input_shape=(3, 64, 64),
        stages=2,
        replicas=1,
        schedule=Schedule.PIPEDREAM,
        microbatches=4,
        microbatch_size=8,
    ),
    Target(
        name="gpt2-tiny data parallel x2",
        model="gpt2-tiny",
        input_shape=(32,),
        stages=1,
        replicas=2,
        schedule=Schedule.ONE_F_ONE_B,
        microbatches=4,
        microbatch_size=4,
    ),
    Target(
        name="mlp 1f1b 2 stages adam",
        model="runtime_throughput:mlp",
        input_shape=(512,),
        stages=2,
        replicas=1,
        schedule=Schedule.ONE_F_ONE_B,
        microbatches=8,
        microbatch_size=16,
        optimizer=OptimizerKind.ADAM,
    ),
)

DEFAULT_TOPOLOGY = Topology.from_args(gpus=2)  # what `plan --gpus 2` assumes


def _cut(profile: Profile, fraction: float) -> int:
    """The layer index where the running compute first reaches ``fraction`` of the total."""
    total, acc = profile.total_compute_ms, 0.0
    for i, layer in enumerate(profile.layers):
        acc += layer.compute_ms
        if acc >= fraction * total:
            return max(1, min(i + 1, len(profile.layers) - 1))
    return len(profile.layers) - 1


def build_plan(
    profile: Profile, profile_path: Path, topology: Topology, target: Target
) -> tuple[Plan, dict[int, float]]:
    """The target's plan predicted by the simulator, and the predicted peak memory per rank."""
    names = [layer.name for layer in profile.layers]
    cut = _cut(profile, 0.5)
    parts = [names] if target.stages == 1 else [names[:cut], names[cut:]]
    ranks = [tuple(range(target.replicas))] if target.stages == 1 else [(0,), (1,)]
    dummy = tuple(
        PlanStage(
            layers=tuple(p),
            replicas=len(r),
            ranks=r,
            compute_s=0.0,
            comm_s=0.0,
            allreduce_s=0.0,
            time_s=0.0,
            memory_bytes=0.0,
        )
        for r, p in zip(ranks, parts, strict=True)
    )
    plan = Plan(
        profile=ProfileRef(
            path=str(profile_path),
            sha256=file_sha256(profile_path),
            model=profile.model,
            batch_size=profile.batch_size,
            graph_hash=profile.graph_hash,
            input_shape=profile.input_shape,
            leaf_modules=profile.leaf_modules,
        ),
        topology=topology,
        schedule=target.schedule,
        optimizer=target.optimizer,
        minibatch_size=target.microbatches * target.microbatch_size,
        microbatch_size=target.microbatch_size,
        microbatches=target.microbatches,
        stages=dummy,
        predicted=Prediction(
            bottleneck_s=1, minibatch_s=1, samples_per_s=1, single_device_s=1, data_parallel_s=None
        ),
    )
    sims = plan_stages(plan, profile)
    level = topology.levels[0]
    real = []
    for s, (stage, sim) in enumerate(zip(dummy, sims, strict=True)):
        inbound = sims[s - 1].send_bytes if s > 0 else 0.0
        comm = 2 * (topology.transfer_s(inbound, 0) + topology.transfer_s(sim.send_bytes, 0))
        compute = sim.forward_s + sim.backward_s
        params = sum(profile.layers[profile.index(n)].parameter_bytes for n in stage.layers)
        reduce = allreduce_s(params, stage.replicas, level.bandwidth_bytes_per_s, level.latency_s)
        real.append(
            dataclasses.replace(
                stage,
                compute_s=compute,
                comm_s=comm,
                allreduce_s=reduce if stage.replicas > 1 else 0.0,
                time_s=max(compute, comm),
                memory_bytes=sim.static_bytes,
            )
        )
    planned = dataclasses.replace(plan, stages=tuple(real))
    result = simulate(planned, profile)
    single = sum(s.compute_s for s in real) * target.microbatches
    memory = {d.rank: d.peak_memory_bytes for d in result.devices}
    return dataclasses.replace(
        planned,
        predicted=Prediction(
            bottleneck_s=max(s.time_s for s in real),
            minibatch_s=result.minibatch_s,
            samples_per_s=result.samples_per_s,
            single_device_s=single,
            data_parallel_s=None,
        ),
    ), memory


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank(rank: int, plan_json: str, config: RunConfig, world: int, port: int, out: str) -> None:
    """One rank: train, and record the peak resident memory above the start."""
    sys.path.insert(0, str(HERE))
    plan = Plan.from_json(plan_json)
    base = _rss_bytes()
    env = DistEnv(rank=rank, world_size=world, master_port=port)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    result = train(plan, lambda: load_spec(plan, seed=config.seed), config, env)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    record: dict[str, Any] = {"rank": rank, "peak_above_start": peak - base}
    if result.report is not None:
        record["samples_per_s"] = result.report.samples_per_s
        record["threads"] = result.report.threads
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(plan: Plan, folder: Path, name: str, steps: int) -> dict[str, Any]:
    path = folder / f"{name}.json"
    plan.save(path)
    world = 1 + max(r for s in plan.stages for r in s.ranks)
    config = RunConfig(
        plan_path=str(path), steps=steps, timeout_s=120, log_every=0, backend=Backend.GLOO
    )  # threads: the default, cores // ranks, as the profile
    out = folder / f"{name}.out"
    out.mkdir(exist_ok=True)
    load = os.getloadavg()[0]
    mp.spawn(_rank, args=(plan.to_json(), config, world, _free_port(), str(out)), nprocs=world)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return {
        "load": load,
        "samples_per_s": ranks[0]["samples_per_s"],
        "threads": ranks[0]["threads"],
        "peak": {r["rank"]: r["peak_above_start"] for r in ranks},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per plan (median kept)")
    parser.add_argument("--steps", type=int, default=12, help="steps per run (first is warm-up)")
    parser.add_argument("--out", default=None, help="keep profiles, plans and reports here")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--only", default=None, help="run the targets whose name contains this")
    args = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    sys.path.insert(0, str(HERE))
    out = Path(args.out or tempfile.mkdtemp(prefix="pvm-"))
    threads = rank_threads(ranks_on_host=DEFAULT_PROFILE_RANKS)
    clock = time.process_time if default_clock("cpu", threads) == "cpu" else time.perf_counter
    rows = []
    for target in TARGETS:
        if args.only and args.only not in target.name:
            continue
        folder = out / target.name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        profile = profile_model(  # what `plan profile` does by default
            target.model,
            batch_size=target.microbatch_size,
            input_shape=target.input_shape,
            threads=threads,
            clock=clock,
            progress=False,
        )
        profile.save(folder / "profile.json")
        plan, memory = build_plan(profile, folder / "profile.json", DEFAULT_TOPOLOGY, target)
        runs = sorted(
            (_run(plan, folder, f"run-{i}", args.steps) for i in range(args.repeats)),
            key=lambda r: r["samples_per_s"],
        )
        median = runs[len(runs) // 2]
        predicted = plan.predicted.samples_per_s
        peak = {
            r: statistics.median(run["peak"][r] for run in runs) for r in sorted(median["peak"])
        }
        rows.append(
            {
                "case": target.name,
                "minibatch": f"{target.microbatches}x{target.microbatch_size}",
                "optimizer": str(target.optimizer),
                "threads": median["threads"],
                "loads": [round(r["load"], 2) for r in runs],
                "predicted": predicted,
                "measured": median["samples_per_s"],
                "error": median["samples_per_s"] / predicted - 1,
                "memory_predicted": memory,
                "memory_measured": peak,
                "memory_error": {
                    r: peak[r] / memory[r] - 1 if memory.get(r) else None for r in peak
                },
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  torch "
        f"{torch.__version__}  defaults: {threads} thread(s) per rank, "
        f"{'process CPU' if clock is time.process_time else 'wall'} clock, no calibration; "
        f"{args.steps} steps per run (first left out), median of {args.repeats}"
    )
    print(
        f"{'case':<36} {'minibatch':>9} {'pred/s':>8} {'meas/s':>8} {'error':>7}  "
        f"{'memory MiB per rank (pred / meas)':<40} loads"
    )
    for r in rows:
        mem = ", ".join(
            f"{r['memory_predicted'][k] / 2**20:.0f} / {r['memory_measured'][k] / 2**20:.0f}"
            for k in sorted(r["memory_measured"])
        )
        print(
            f"{r['case']:<36} {r['minibatch']:>9} {r['predicted']:>8.1f} {r['measured']:>8.1f} "
            f"{r['error']:>+7.1%}  {mem:<40} {r['loads']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
