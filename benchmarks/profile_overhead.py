"""How much profiling costs, and how well per-layer times add up to the whole step.

Prints, for one model and batch size (default resnet50 at batch 32 on the CPU):

* ``overhead``: wall time of ``profile_model`` (building the model, tracing, warm-up, the timed
  whole steps and every layer) divided by one training step (forward, cross-entropy, backward,
  SGD update; median of ``--steps`` steps after one warm-up step). Goal: at most 5.
* ``sum/whole``: the per-layer forward+backward medians (raw, before any calibration) summed,
  divided by the profile's whole-model forward+backward. Goal: 0.9 to 1.1.

Profiling runs first, in a fresh process, so its cold start (kernel selection, first-touch
memory) is counted against it; the training step is measured warm afterwards, under the same
allocator setting as the profile (:func:`planner.profile.measure.keep_freed_memory`).

Usage:
    python benchmarks/profile_overhead.py [--model resnet50] [--batch-size 32] [--threads N]
        [--clock wall|cpu] [--warmup N] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from planner.models import load_model
from planner.profile.measure import (
    DEFAULT_REPS,
    DEFAULT_WARMUP,
    keep_freed_memory,
    machine_description,
    profile_model,
)


def training_step_ms(model: str, batch_size: int, steps: int) -> tuple[float, float]:
    """Median wall and CPU (all threads) time of a plain training step after a warm-up step."""
    spec = load_model(model, batch_size=batch_size)
    inputs, targets = spec.make_batch(batch_size, 0)
    optimizer = torch.optim.SGD(spec.module.parameters(), lr=0.01)
    times, cpu = [], []
    for step in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = spec.loss_fn(spec.module(*inputs), targets)
        loss.backward()
        optimizer.step()
        if step:  # the first is the warm-up
            times.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(times), statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="profile timer: wall (perf_counter) or cpu (process CPU time; use with --threads 1)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    start, start_cpu = time.perf_counter(), time.process_time()
    profile = profile_model(
        args.model,
        batch_size=args.batch_size,
        warmup=args.warmup,
        reps=args.reps,
        progress=False,
        clock=time.process_time if args.clock == "cpu" else time.perf_counter,
    )
    profiling_s = time.perf_counter() - start
    profiling_cpu_s = time.process_time() - start_cpu
    with keep_freed_memory():  # the allocator setting the profile was measured under
        step_ms, step_cpu_ms = training_step_ms(args.model, args.batch_size, args.steps)

    raw_sum = sum(
        statistics.median(layer.forward_samples_ms) + statistics.median(layer.backward_samples_ms)
        for layer in profile.layers
    )
    whole = profile.whole_step_ms or float("nan")
    print(f"model           {args.model}, batch {args.batch_size}, {len(profile.layers)} layers")
    print(f"machine         {machine_description()}; {profile.threads} threads")
    print(
        f"settings        warmup={profile.warmup} reps={profile.reps} clock={args.clock}; "
        f"torch {torch.__version__}"
    )
    print(f"load average    {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1 min)")
    print(f"profiling       {profiling_s:.2f} s wall, {profiling_cpu_s:.2f} s CPU")
    print(
        f"training step   {step_ms:.1f} ms wall, {step_cpu_ms:.1f} ms CPU (median of {args.steps})"
    )
    print(f"whole fwd+bwd   {whole:.1f} ms (profile's whole_step_ms)")
    print(f"layer sum       {raw_sum:.1f} ms (raw medians)")
    extra = [layer for layer in profile.layers if len(layer.forward_samples_ms) > 2]
    extra_ms = sum(
        statistics.median(layer.forward_samples_ms) + statistics.median(layer.backward_samples_ms)
        for layer in extra
    )
    print(
        f"3rd repetition  {len(extra)} of {len(profile.layers)} layers, {extra_ms:.1f} ms of the sum"
    )
    print(f"overhead        {profiling_s * 1e3 / step_ms:.2f} x a training step (goal <= 5)")
    print(
        f"overhead (CPU)  {profiling_cpu_s * 1e3 / step_cpu_ms:.2f} x (CPU time; less sensitive to other load)"
    )
    print(f"sum/whole       {raw_sum / whole:.3f} (goal 0.9-1.1)")
    print(f"calibration     {profile.calibration or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
