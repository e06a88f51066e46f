"""Measure the profiles shipped in profiles/ (resnet50, vgg16, gpt2-small) on this machine.

Each is the same as ``plan profile --model M --batch-size B ... -o profiles/NAME.json``; the
settings are fixed here so profiles/README.md can state them. Measure on a quiet machine: the
timings are wall-clock and another busy process on the same cores inflates them.

Usage:
    python benchmarks/make_profiles.py [NAME ...] [--out profiles] [--threads N]
"""

from __future__ import annotations

import argparse
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


def command(item: Shipped, out: Path, threads: int | None) -> str:
    """The equivalent `plan profile` command line."""
    parts = ["plan profile", f"--model {item.model}", f"--batch-size {item.batch_size}"]
    if item.input_shape:
        parts.append("--input-shape " + ",".join(map(str, item.input_shape)))
    if item.leaf_modules:
        parts.append("--leaf-modules " + " ".join(item.leaf_modules))
    parts += [f"--warmup {item.warmup}", f"--reps {item.reps}"]
    if threads:
        parts.append(f"--threads {threads}")
    parts.append(f"-o {out / (item.name + '.json')}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="which profiles (default: all)")
    parser.add_argument("--out", type=Path, default=Path("profiles"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
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
        )
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
