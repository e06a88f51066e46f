"""``plan simulate PLAN.json``: simulate a plan, print what it promises, draw it.

Example:
    $ plan simulate plan.json --png gantt.png --csv events.csv
    (prints the summary; writes gantt.png, gantt.partition.png, gantt.memory.png, events.csv)
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

from planner._io import atomic_write_text, check_outputs, printable
from planner.errors import PlanError
from planner.plan import Plan, find_profile_file, load_plan_and_profile
from planner.simulate import SimulationResult, simulate

__all__ = ["add_arguments", "run", "side_paths", "summary"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``plan simulate``."""
    parser.add_argument("plan", metavar="PLAN.json", help="a plan written by `plan`")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="the plan's profile (default: the path the plan records, looked up "
        "from here and then next to the plan)",
    )
    parser.add_argument(
        "--minibatches",
        type=int,
        metavar="N",
        help="minibatches to simulate (default: 3 for 1f1b/gpipe; enough to "
        "reach the steady state for pipedream)",
    )
    parser.add_argument(
        "--png",
        metavar="FILE",
        help="write the Gantt chart here, and the partition and memory charts "
        "next to it (FILE.partition.png, FILE.memory.png)",
    )
    parser.add_argument("--csv", metavar="FILE", help="write every simulated event here")


def run(args: argparse.Namespace) -> int:
    """Simulate, print the summary, write the pictures and the CSV; returns the exit status."""
    if args.minibatches is not None and args.minibatches < 1:
        raise PlanError(f"--minibatches must be at least 1, got {args.minibatches}")
    plan, profile = load_plan_and_profile(args.plan, args.profile)
    pictures: tuple[Path, ...] = side_paths(args.png) if args.png else ()
    names = ("--png", "--png (partition chart)", "--png (memory chart)")
    outputs = check_outputs(
        [*zip(names, pictures, strict=False), *([("--csv", args.csv)] if args.csv else [])],
        inputs=[
            ("plan", args.plan),
            ("plan's profile", find_profile_file(plan, args.plan, args.profile)),
        ],
        error=PlanError,
    )
    result = simulate(plan, profile, minibatches=args.minibatches)
    print(summary(plan, result))
    if args.png:
        from planner.viz import draw_gantt, draw_memory, draw_partition

        gantt, partition, memory = pictures
        title = (
            f"{printable(plan.profile.model)}: {result.schedule} on {len(result.devices)} devices, "
            f"{result.microbatches} x {plan.microbatch_size} samples per minibatch: "
            f"{result.samples_per_s:,.1f} samples/s simulated"
        )
        draw_gantt(result, gantt, title=title)
        draw_partition(plan, profile, partition)
        draw_memory(result, memory)
        print(outputs.announce(gantt, partition, memory))
    if args.csv:
        buffer = io.StringIO()
        result.events.to_csv(buffer, index=False)
        atomic_write_text(args.csv, buffer.getvalue())
        print(f"{outputs.announce(args.csv)} ({len(result.events)} events)")
    return 0


def side_paths(png: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``gantt.png`` -> itself, ``gantt.partition.png``, ``gantt.memory.png``."""
    path = Path(png)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    suffix = path.suffix or ".png"
    return (
        path.with_name(stem + suffix),
        path.with_name(f"{stem}.partition{suffix}"),
        path.with_name(f"{stem}.memory{suffix}"),
    )


def summary(plan: Plan, result: SimulationResult) -> str:
    """The simulated numbers beside the plan's prediction."""
    predicted = plan.predicted
    ratio = (
        result.minibatch_s / predicted.minibatch_s if predicted.minibatch_s > 0 else float("nan")
    )
    lines = [
        f"{printable(plan.profile.model)}: {len(plan.stages)} stages on {len(result.devices)} devices, "
        f"schedule {plan.schedule}, minibatch {plan.minibatch_size} = {plan.microbatches} x "
        f"{plan.microbatch_size}",
        result.describe(),
        f"plan's prediction: {predicted.minibatch_s * 1e3:.2f} ms per minibatch, "
        f"{predicted.samples_per_s:.1f} samples/s; simulated/predicted time {ratio:.3f}",
    ]
    peaks: dict[int, float] = {}
    for d in result.devices:  # a rank running several stages (chunks) holds them all
        for s in d.stages or (d.stage,):
            peaks[s] = max(peaks.get(s, 0.0), d.peak_memory_bytes)
    lines.append(
        "memory per stage, GiB (predicted / simulated peak"
        + (", of the stage's rank" if plan.chunks > 1 else "")
        + "): "
        + ", ".join(
            f"{s}: {stage.memory_bytes / 1024**3:.2f} / {peaks[s] / 1024**3:.2f}"
            for s, stage in enumerate(plan.stages)
        )
    )
    limit = result.memory_limit_bytes
    over = [d for d in result.devices if limit is not None and d.peak_memory_bytes > limit]
    if over and limit is not None:
        worst = max(over, key=lambda d: d.peak_memory_bytes)
        lines.append(
            f"warning: {len(over)} devices exceed the {limit / 1024**3:.3g} GiB of device memory "
            f"(rank {worst.rank}: {worst.peak_memory_bytes / 1024**3:.2f} GiB)"
        )
    return "\n".join(lines)
