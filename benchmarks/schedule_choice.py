"""``--schedule auto`` against the best ``1f1b`` plan and torch's even split (issue 14).

For each model and device count: the plan ``make_plan`` makes with ``auto_schedule=True``, the
best ``1f1b`` plan (the DP, replication allowed), and for each rank schedule torch's default split
(``pipeline(..., split_spec)`` style: the same number of layers per stage, ``p = devices`` ranks,
no replication), simulated with the same schedule and microbatches as auto's best plan of that
schedule. Every number is the simulator's minibatch time, which is what plans now predict.

Models:
* ``gpt2-small``: the shipped profile (``profiles/gpt2-small.json``, measured on this machine's CPU
  at batch 1, 12 blocks as leaves).
* ``decoder-48``: a 48-block decoder with GPT-2 XL's shapes (hidden 1600, 25 heads, sequence
  1024, vocabulary 50,257), V100-class: **built from FLOP and byte counts, not measured**: a
  block's forward is 24 h^2 s + 4 s^2 h FLOPs at 50 TFLOP/s, backward twice that; it saves
  34 s h + 5 a s^2 bytes (Korthikanti et al. 2022, fp16); weights fp32 with Adam.

Topology: servers of 8 V100s (32 GB), 25 GB/s inside a server, 12.5 GB/s across.

Usage: python benchmarks/schedule_choice.py [--devices 8 16 64] [--per-device 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from planner.errors import PlannerError
from planner.optimize.chunked import CHUNK_CHOICES
from planner.plan import ScheduleScore
from planner.planning import PlanOptions, make_plan
from planner.profile import LayerProfile, Profile
from planner.schedules import RANK_SCHEDULES, OptimizerKind, Schedule
from planner.simulate import simulate_stages
from planner.simulate_costs import virtual_stages
from planner.topology import Topology

ROOT = Path(__file__).resolve().parents[1]


def decoder_48() -> Profile:
    """The analytic 48-block decoder (module docstring); one sample per batch."""
    h, s, a, vocab, blocks = 1600, 1024, 25, 50257, 48
    flops_per_ms = 50e12 / 1e3
    block_fwd = (24 * h * h * s + 4 * s * s * h) / flops_per_ms
    head_fwd = 2 * s * h * vocab / flops_per_ms
    act = 2 * s * h  # fp16 hidden states
    layers = [
        LayerProfile(
            name="tok_emb",
            op="Embedding",
            forward_ms=0.05,
            backward_ms=0.1,
            output_bytes=(act,),
            parameter_bytes=4 * vocab * h,
            inputs=(),
        )
    ]
    for b in range(blocks):
        layers.append(
            LayerProfile(
                name=f"blocks_{b}",
                op="Block",
                forward_ms=block_fwd,
                backward_ms=2 * block_fwd,
                output_bytes=(act,),
                parameter_bytes=4 * 12 * h * h,
                inputs=(b,),
                saved_bytes=34 * s * h + 5 * a * s * s,
            )
        )
    layers.append(
        LayerProfile(
            name="lm_head",
            op="Linear",
            forward_ms=head_fwd,
            backward_ms=2 * head_fwd,
            output_bytes=(2 * s * vocab,),
            parameter_bytes=4 * vocab * h,
            inputs=(blocks,),
        )
    )
    return Profile(model="decoder-48", batch_size=1, layers=tuple(layers))


def even_split(
    profile: Profile,
    topology: Topology,
    schedule: Schedule,
    ranks: int,
    chunks: int,
    m: int,
    size: int,
) -> float | None:
    """torch's default: equal layer counts per stage; None where it cannot run."""
    count = len(profile.layers)
    num = ranks * chunks
    if num > count:
        return None
    starts = [round(i * count / num) for i in range(1, num)]
    stages = virtual_stages(
        profile,
        schedule=schedule,
        ranks=ranks,
        chunks=chunks,
        microbatch_size=size,
        starts=starts,
        topology=topology,
        optimizer=OptimizerKind.ADAM,
    )
    run = simulate_stages(
        stages,
        schedule=schedule,
        microbatches=m,
        topology=topology,
        microbatch_size=size,
        chunks=chunks,
    )
    if max(d.peak_memory_bytes for d in run.devices) > topology.memory_bytes:
        return None
    return run.minibatch_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--per-device", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print(
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}"
    )
    folder = Path(tempfile.mkdtemp())
    models = {
        "gpt2-small": Profile.load(ROOT / "profiles" / "gpt2-small.json"),
        "decoder-48": decoder_48(),
    }
    print(
        "| model | devices | minibatch | auto plan | auto ms | best 1f1b ms | auto / 1f1b speed-up "
        "| each rank schedule: auto's best (ms @ranks) vs torch's even split, same schedule, "
        "chunks and M | seconds to plan |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, profile in models.items():
        path = folder / f"{name}.json"
        profile.save(path)
        for n in args.devices:
            topology = Topology.from_args(
                gpus=n,
                gpus_per_node=8 if n > 8 else None,
                bandwidth_gbps=25,
                inter_node_bandwidth_gbps=12.5,
                memory_gb=32 * 1e9 / 2**30,
            )
            for per in args.per_device:
                batch = per * n
                base = dict(minibatch_size=batch, optimizer=OptimizerKind.ADAM)
                t = time.perf_counter()
                try:
                    auto = make_plan(
                        profile, path, topology, PlanOptions(auto_schedule=True, **base)
                    )
                except PlannerError as exc:
                    print(f"| {name} | {n} | {batch} | {exc} |")
                    continue
                seconds = time.perf_counter() - t
                by: dict[str, ScheduleScore] = {}  # each schedule's fastest shape (listed first)
                for c in auto.schedules_compared:
                    by.setdefault(c.schedule, c)
                one = by.get("1f1b")
                shape = f"{auto.schedule}" + (f" x{auto.chunks}" if auto.chunks > 1 else "")
                shape += f", {auto.num_ranks} ranks, M={auto.microbatches}"
                evens = []
                for sched in RANK_SCHEDULES:
                    c = by.get(str(sched))
                    v = c.chunks if c is not None else CHUNK_CHOICES[sched][0]
                    m = c.microbatches if c is not None else auto.microbatches
                    p = min(n, len(profile.layers) // v)
                    try:
                        even = even_split(profile, topology, sched, p, v, m, batch // m)
                    except PlannerError:  # torch's shape rules
                        even = None
                    ours = f"{c.minibatch_s * 1e3:.0f} @{c.ranks}" if c is not None else "-"
                    theirs = f"{even * 1e3:.0f} @{p}" if even else "-"
                    evens.append(f"{sched}: {ours} vs {theirs}")
                ratio = (
                    f"{one.minibatch_s / auto.predicted.minibatch_s:.2f}x"
                    if one
                    else "1f1b does not fit"
                )
                print(
                    f"| {name} | {n} | {batch} | {shape} | {auto.predicted.minibatch_s * 1e3:.0f} | "
                    f"{one.minibatch_s * 1e3:.0f} | {ratio} | "
                    if one
                    else f"| {name} | {n} | {batch} | {shape} | {auto.predicted.minibatch_s * 1e3:.0f} | - | {ratio} | ",
                    end="",
                )
                print(f"{'; '.join(evens)} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
