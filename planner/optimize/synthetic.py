"""Synthetic branched profiles (Inception/DenseNet- and NASNet-like) for tests and benchmarks.

:func:`branched_profile`: a chain of blocks. Each block forks its input into 1..``max_branches`` parallel
branches of 1..``max_branch_length`` layers and joins them in a concat layer; with probability
``skip_probability`` the concat also reads the output of an earlier block (a DenseNet-style long
skip connection). Times, activation and parameter sizes are drawn from a seeded RNG, so a seed
always gives the same profile.

:func:`nasnet_profile`: NASNet-A-like cells (Zoph et al. 2018). Cell ``i`` reads the outputs of
cells ``i - 1`` and ``i - 2``, squares each with a 1x1 "prep" convolution, runs 5-8 parallel
branches (chains of separable-convolution-like layers: relu, depthwise, pointwise, batch norm,
repeated), each from one of the two preps, adds the branches in pairs and concatenates the sums
and any unpaired branch. Because a cell reads the cell two back, no layer after the stem is
comparable with every other one: the graph has no separators, so the downset lattice of the
whole model is one huge product, the hard case for :mod:`planner.optimize.states`. Every third of
the way a reduction cell halves the activations and doubles the channels (parameters).

Example:
    >>> p = branched_profile(40, seed=1)
    >>> len(p), p.layers[0].inputs, branched_profile(40, seed=1) == p
    (40, (), True)
    >>> q = nasnet_profile(cells=4, seed=3)
    >>> q == nasnet_profile(cells=4, seed=3), q.layers[0].inputs, len(q) > 4 * 30
    (True, (), True)
    >>> len(nasnet_profile()) >= 1500
    True
"""

from __future__ import annotations

import numpy as np

from planner.profile.format import LayerProfile, Profile

__all__ = ["branched_profile", "nasnet_profile"]


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


def nasnet_profile(
    cells: int = 28,
    *,
    seed: int = 0,
    min_branches: int = 5,
    max_branches: int = 8,
    batch_size: int = 32,
) -> Profile:
    """A NASNet-like profile of ``cells`` cells (module docstring); same seed, same profile.

    Each branch is 1-3 separable-convolution units of 4 layers (relu, depthwise, pointwise, batch
    norm), so a cell has ``3 + branches x (4 to 12) + pairs`` layers; the default 28 cells give
    about 1,650 layers (1,500 or more for every seed tried).
    """
    if cells < 1 or not 1 <= min_branches <= max_branches:
        raise ValueError(
            f"need cells >= 1 and 1 <= min_branches <= max_branches; got {cells}, "
            f"{min_branches}, {max_branches}"
        )
    rng = np.random.default_rng(seed)
    out: list[LayerProfile] = []
    scale = {"act": 1.0, "par": 1.0}

    def add(kind: str, inputs: tuple[int, ...], fwd_ms: float, params: bool) -> int:
        index = len(out)
        fwd = fwd_ms * scale["act"] * float(rng.uniform(0.7, 1.3))
        act = int(scale["act"] * int(rng.integers(24, 40))) * 2**16
        par = int(scale["par"] * int(rng.integers(8, 64)) * 2**12) if params else 0
        out.append(
            LayerProfile(
                name=f"{kind}{index}",
                op=kind,
                forward_ms=round(fwd, 4),
                backward_ms=round(fwd * float(rng.uniform(1.6, 2.4)), 4),
                output_bytes=(act,),
                parameter_bytes=par,
                inputs=inputs,
            )
        )
        return index

    stem = add("stem", (), 4.0, True)
    prev2, prev1 = stem, stem
    reductions = {cells // 3, (2 * cells) // 3} if cells >= 3 else set()
    for cell in range(cells):
        if cell in reductions:
            scale["act"] /= 2.0
            scale["par"] *= 4.0
        preps = (add("prep", (prev1,), 0.3, True), add("prep", (prev2,), 0.3, True))
        ends = []
        for _ in range(int(rng.integers(min_branches, max_branches + 1))):
            last = preps[int(rng.integers(0, 2))]
            for _ in range(int(rng.integers(1, 4))):
                last = add("relu", (last,), 0.05, False)
                last = add("dwconv", (last,), 0.4, True)
                last = add("pwconv", (last,), 0.6, True)
                last = add("bn", (last,), 0.1, True)
            ends.append(last)
        sums = [
            add("add", (a, b), 0.05, False) for a, b in zip(ends[::2], ends[1::2], strict=False)
        ]
        if len(ends) % 2:
            sums.append(ends[-1])
        prev2, prev1 = prev1, add("concat", tuple(sorted(sums)), 0.1, False)
    add("head", (prev1,), 0.5, True)
    return Profile(
        model=f"nasnet-like-{cells}c-seed{seed}", batch_size=batch_size, layers=tuple(out)
    )
