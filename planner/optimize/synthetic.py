"""Synthetic branched profiles (Inception/DenseNet-like) for tests and the planner benchmark.

A profile is a chain of blocks. Each block forks its input into 1..``max_branches`` parallel
branches of 1..``max_branch_length`` layers and joins them in a concat layer; with probability
``skip_probability`` the concat also reads the output of an earlier block (a DenseNet-style long
skip connection). Times, activation and parameter sizes are drawn from a seeded RNG, so a seed
always gives the same profile.

Example:
    >>> p = branched_profile(40, seed=1)
    >>> len(p), p.layers[0].inputs, branched_profile(40, seed=1) == p
    (40, (), True)
"""

from __future__ import annotations

import numpy as np

from planner.profile.format import LayerProfile, Profile

__all__ = ["branched_profile"]


def branched_profile(
    layers: int,
    *,
    seed: int = 0,
    max_branches: int = 4,
    max_branch_length: int = 5,
    skip_probability: float = 0.2,
    batch_size: int = 32,
) -> Profile:
    """A random block-structured DAG profile with exactly ``layers`` layers (module docstring)."""
    rng = np.random.default_rng(seed)
    out: list[LayerProfile] = []

    def add(kind: str, inputs: tuple[int, ...]) -> int:
        index = len(out)
        fwd = float(rng.lognormal(mean=-0.5, sigma=0.8))
        act = int(rng.integers(1, 64)) * 2**18
        params = int(rng.choice([0, 0, 1, 4, 16])) * 2**18 * int(rng.integers(1, 8))
        out.append(
            LayerProfile(
                name=f"{kind}{index}",
                op=kind,
                forward_ms=round(fwd, 4),
                backward_ms=round(fwd * float(rng.uniform(1.5, 2.5)), 4),
                output_bytes=(act,),
                parameter_bytes=params,
                inputs=inputs,
            )
        )
        return index

    current = add("stem", ())
    block_outputs = [current]
    while len(out) < layers:
        room = layers - len(out)
        if room <= 2:
            current = add("conv", (current,))
            continue
        branches = int(rng.integers(1, max_branches + 1))
        ends = []
        for _ in range(branches):
            length = int(rng.integers(1, max_branch_length + 1))
            if len(out) + length + 1 > layers:
                break
            prev = current
            for _ in range(length):
                prev = add("conv", (prev,))
            ends.append(prev)
        if not ends:
            current = add("conv", (current,))
            continue
        inputs = set(ends)
        if len(block_outputs) > 1 and rng.random() < skip_probability:
            inputs.add(int(rng.choice(block_outputs[:-1])))
        current = add("concat", tuple(sorted(inputs)))
        block_outputs.append(current)
    return Profile(model=f"branched-{layers}-seed{seed}", batch_size=batch_size, layers=tuple(out))
