"""Predicted against measured throughput and memory, with default settings and no calibration.

For five plans on this machine (at most two ranks, since it has two cores):

1. profile the model as ``plan profile`` does by default: the threads one rank of a 2-rank
   local run gets (``cores // 2``), process CPU time for one thread, the allocator setting the
   runtime trains under (:mod:`planner.profile.conditions`);
2. build the plan (one or two stages, cut at half of the compute, or one stage on two replicas)
   on the topology ``plan --gpus 2`` gives a CPU profile (the ``cpu-loopback`` links: gloo on
   loopback's measured latency and bandwidth, and each process's fixed memory) and predict it
   with the simulator, the plan's optimizer included; predicted memory per rank is the
   simulator's peak of the stage's tensors plus the preset's per-process memory;
3. run it with ``plan run``'s defaults (threads as the profile, gloo) in spawned ranks that also
   measure their peak resident set (Linux ``VmHWM``: the whole process, torch included).

Each run is repeated ``--repeats`` times and the median kept; the load average is recorded
before each run, since the host is shared, and so is ``wait``: the largest share of its run a
rank's main thread was ready to compute but waited for a core other processes held
(``/proc/thread-self/schedstat``). CPU-time profiles predict an unshared core, so on a busy
machine the measured rate falls short by about that share.

Usage:
    python benchmarks/predicted_vs_measured.py [--steps 12] [--repeats 3] [--out DIR]
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
from planner.topology import Topology, with_loopback_links

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

# what `plan --gpus 2` assumes for a CPU profile (planner/commands/plan.py)
DEFAULT_TOPOLOGY = with_loopback_links(Topology.from_args(gpus=2))


def _cut(profile: Profile, fraction: float) -> int:
    """The layer index where the running compute first reaches ``fraction`` of the total."""
    total, acc = profile.total_compute_ms, 0.0
    for i, layer in enumerate(profile.layers):
        acc += layer.compute_ms
        if acc >= fraction * total:
            return max(1, min(i + 1, len(profile.layers) - 1))
    return len(profile.layers) - 1


def profile_target(target: Target, folder: Path) -> Profile:
    """Profile ``target``'s model as ``plan profile`` does by default (the threads a rank of a
    2-rank run gets, CPU time for one thread) and save it as ``folder/profile.json``."""
    threads = rank_threads(ranks_on_host=DEFAULT_PROFILE_RANKS)
    clock = time.process_time if default_clock("cpu", threads) == "cpu" else time.perf_counter
    folder.mkdir(parents=True, exist_ok=True)
    profile = profile_model(
        target.model,
        batch_size=target.microbatch_size,
        input_shape=target.input_shape,
        threads=threads,
        clock=clock,
        progress=False,
    )
    profile.save(folder / "profile.json")
    return profile


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
        reduce = allreduce_s(
            params, stage.replicas, level.ring_bandwidth_bytes_per_s, level.ring_latency_s
        )
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
    memory = {d.rank: d.peak_memory_bytes for d in result.devices}  # includes the process's
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


def _schedstat_s() -> tuple[float, float]:
    """This thread's seconds on a CPU and seconds runnable but waiting for one (Linux)."""
    try:
        with open("/proc/thread-self/schedstat", encoding="ascii") as handle:
            ran, waited = (int(x) for x in handle.read().split()[:2])
    except (OSError, ValueError):
        return 0.0, 0.0
    return ran / 1e9, waited / 1e9


def _peak_rss_bytes() -> int:
    """This process's peak resident set: ``VmHWM``, the high-water mark of its own address space.

    Not ``ru_maxrss``: Linux carries that over ``execve`` from the forked parent, so a rank
    spawned by a large process reports at least the parent's size (the previous version of this
    benchmark measured 344 MB for several different cases that way).
    """
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status")


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank(rank: int, plan_json: str, config: RunConfig, world: int, port: int, out: str) -> None:
    """One rank: train, and record the process's peak resident memory (and its start)."""
    sys.path.insert(0, str(HERE))
    plan = Plan.from_json(plan_json)
    start = _rss_bytes()
    env = DistEnv(rank=rank, world_size=world, master_port=port)
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    wall0, (_, wait0) = time.perf_counter(), _schedstat_s()
    result = train(plan, lambda: load_spec(plan, seed=config.seed), config, env)
    wall, wait = time.perf_counter() - wall0, _schedstat_s()[1] - wait0
    peak = _peak_rss_bytes()
    # the share of the run this rank's main thread was ready to compute but other processes
    # held the cores: what a busy machine takes away, which the CPU-time profile leaves out
    record: dict[str, Any] = {
        "rank": rank,
        "peak": peak,
        "start": start,
        "cpu_wait_share": wait / wall if wall > 0 else 0.0,
    }
    if result.report is not None:
        record["samples_per_s"] = result.report.samples_per_s
        record["threads"] = result.report.threads
        record["report"] = result.report.to_dict()
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
        "peak": {r["rank"]: r["peak"] for r in ranks},
        "start": {r["rank"]: r["start"] for r in ranks},
        "cpu_wait_share": max(r["cpu_wait_share"] for r in ranks),
        "report": ranks[0]["report"],
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
        profile = profile_target(target, folder)
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
                "cpu_wait_share": median["cpu_wait_share"],
                "predicted": predicted,
                "measured": median["samples_per_s"],
                "error": median["samples_per_s"] / predicted - 1,
                "memory_predicted": memory,
                "memory_measured": peak,
                "memory_at_start": {
                    r: statistics.median(run["start"][r] for run in runs) for r in peak
                },
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
        f"{args.steps} steps per run (first left out), median of {args.repeats}; "
        f"topology {DEFAULT_TOPOLOGY.describe()}"
    )
    print(
        f"{'case':<36} {'minibatch':>9} {'pred/s':>8} {'meas/s':>8} {'error':>7}  "
        f"{'memory MiB per rank (pred / meas)':<34} {'wait':>5}  loads"
    )
    for r in rows:
        mem = ", ".join(
            f"{r['memory_predicted'][k] / 2**20:.0f} / {r['memory_measured'][k] / 2**20:.0f}"
            for k in sorted(r["memory_measured"])
        )
        print(
            f"{r['case']:<36} {r['minibatch']:>9} {r['predicted']:>8.1f} {r['measured']:>8.1f} "
            f"{r['error']:>+7.1%}  {mem:<34} {r['cpu_wait_share']:>5.0%}  {r['loads']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
