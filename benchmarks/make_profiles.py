"""Measure the profiles shipped in profiles/ (resnet50, vgg16, gpt2-small) on this machine.

Each is ``profile_model`` with the settings fixed here, so profiles/README.md can state them;
the printed ``plan profile`` line is the equivalent command. By default they are timed in
process CPU time with one thread (``--clock cpu --threads 1``): this machine's two cores are
shared with other work, and CPU time leaves out the time another process holds the core, which
wall-clock timing would count. ``--clock wall`` times with ``time.perf_counter`` as
``plan profile`` does.

Usage:
    python benchmarks/make_profiles.py [NAME ...] [--out profiles] [--threads N] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from planner.profile.measure import profile_model


@dataclass(frozen=True, kw_only=True)
class Shipped:
    """One shipped profile: the model and the settings it is measured with."""

    name: str
    model: str
    batch_size: int
    input_shape: tuple[int, ...] | None = None
    leaf_modules: tuple[str, ...] = ()
    warmup: int = 1
    reps: int = 3


SHIPPED = (
    Shipped(name="resnet50", model="resnet50", batch_size=32),
    Shipped(name="vgg16", model="vgg16", batch_size=32),
    # A transformer block as one layer; full 1024-token context, one sequence per batch.
    Shipped(name="gpt2-small", model="gpt2-small", batch_size=1, leaf_modules=("Block",)),
)


def command(item: Shipped, out: Path, threads: int) -> str:
    """The equivalent `plan profile` command line."""
    parts = ["plan profile", f"--model {item.model}", f"--batch-size {item.batch_size}"]
    if item.input_shape:
        parts.append("--input-shape " + ",".join(map(str, item.input_shape)))
    if item.leaf_modules:
        parts.append("--leaf-modules " + " ".join(item.leaf_modules))
    parts += [f"--warmup {item.warmup}", f"--reps {item.reps}", f"--threads {threads}"]
    parts.append(f"-o {out / (item.name + '.json')}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="which profiles (default: all)")
    parser.add_argument("--out", type=Path, default=Path("profiles"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: process CPU time (with --threads 1; robust to other load), wall: perf_counter",
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        print(
            "--clock cpu adds up the threads' CPU times; use it with --threads 1", file=sys.stderr
        )
        return 2
    chosen = [s for s in SHIPPED if not args.names or s.name in args.names]
    unknown = set(args.names) - {s.name for s in SHIPPED}
    if unknown:
        print(
            f"unknown profile(s) {sorted(unknown)}; choose from {[s.name for s in SHIPPED]}",
            file=sys.stderr,
        )
        return 2
    for item in chosen:
        print(command(item, args.out, args.threads), flush=True)
        start = time.perf_counter()
        profile = profile_model(
            item.model,
            batch_size=item.batch_size,
            input_shape=item.input_shape,
            leaf_modules=item.leaf_modules,
            warmup=item.warmup,
            reps=item.reps,
            threads=args.threads,
            progress=sys.stderr.isatty(),
            clock=time.process_time if args.clock == "cpu" else time.perf_counter,
        )
        # State the timing method in the file itself: the Profile has no field for the clock.
        timing = "process CPU time" if args.clock == "cpu" else "wall clock (perf_counter)"
        note = (
            f"{profile.machine}; timed in {timing}, {profile.threads} thread(s), glibc malloc "
            "keeping freed memory; by benchmarks/make_profiles.py"
        )
        profile = dataclasses.replace(profile, machine=note)
        path = args.out / f"{item.name}.json"
        profile.save(path)
        ratio = profile.total_compute_ms / (profile.whole_step_ms or float("nan"))
        print(
            f"  {len(profile.layers)} layers, whole step {profile.whole_step_ms:.1f} ms, "
            f"layer sum / whole {ratio:.3f}, calibration: {profile.calibration or 'none'}; "
            f"{time.perf_counter() - start:.1f} s -> {path}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
