"""What other partitioners would do, scored by our cost model so every plan compares with every other.

* ``data-parallel``: one stage holding every layer, replicated on every device.
* ``gpipe-balanced``: torchgpipe's ``balance_by_time``: a straight pipeline, one stage per device,
  contiguous blocks of the profile's order minimising the largest block's forward+backward time
  (the optimal block partition that torchgpipe's ``blockpartition`` computes).
* ``uniform``: Megatron/DeepSpeed ``partition_method="uniform"``: the same number of layers per
  stage, the first ``layers mod stages`` stages taking one more.
* ``parameters``: DeepSpeed ``partition_method="parameters"``: contiguous blocks minimising the
  largest block's parameter bytes.

The pipelines use ``min(devices, layers)`` stages of one device each, in the profile's order (these
tools partition a sequential module list). Each result is :meth:`CostModel.evaluate` of the
partition (``solver="baseline:<name>"``, ``optimal=False``), with ``fits`` and a ``note`` saying
which stage does not fit when one does not: a baseline is reported whether or not it fits.

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> from planner.topology import Topology
    >>> from planner.optimize.cost import CostModel
    >>> layers = tuple(
    ...     LayerProfile(name=f"l{i}", op="", forward_ms=t, backward_ms=t, output_bytes=(64,),
    ...                  parameter_bytes=p, inputs=(i - 1,) if i else ())
    ...     for i, (t, p) in enumerate([(1, 0), (1, 0), (6, 10), (2, 90)]))
    >>> cost = CostModel(Profile(model="m", batch_size=1, layers=layers), Topology.from_args(gpus=2))
    >>> {name: [s.layers for s in p.stages] for name, p in baselines(cost).items()}
    {'data-parallel': [(0, 1, 2, 3)], 'gpipe-balanced': [(0, 1, 2), (3,)], 'uniform': [(0, 1), (2, 3)], 'parameters': [(0, 1, 2), (3,)]}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from planner.optimize.cost import CostModel, CostModelKind, SolverOptions
from planner.optimize.result import Partition
from planner.profile.format import Profile
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Topology

__all__ = [
    "BASELINES",
    "all_baselines",
    "balanced_blocks",
    "baselines",
    "data_parallel",
    "gpipe_balanced",
    "parameters",
    "uniform",
    "uniform_blocks",
]

_GIB = 1024**3


def data_parallel(cost: CostModel) -> Partition:
    """Every layer in one stage, replicated on all devices."""
    return _score(cost, [cost.num_layers], [cost.topology.num_devices], "data-parallel")


def gpipe_balanced(cost: CostModel) -> Partition:
    """torchgpipe ``balance_by_time``: blocks balanced by forward+backward time, one per device."""
    stages = _pipeline_stages(cost)
    return _score(cost, balanced_blocks(cost.compute_s, stages), [1] * stages, "gpipe-balanced")


def uniform(cost: CostModel) -> Partition:
    """Megatron/DeepSpeed ``uniform``: equal layer counts per stage, one stage per device."""
    stages = _pipeline_stages(cost)
    return _score(cost, uniform_blocks(cost.num_layers, stages), [1] * stages, "uniform")


def parameters(cost: CostModel) -> Partition:
    """DeepSpeed ``parameters``: blocks balanced by parameter bytes, one stage per device."""
    stages = _pipeline_stages(cost)
    return _score(cost, balanced_blocks(cost.parameter_bytes, stages), [1] * stages, "parameters")


BASELINES: dict[str, Callable[[CostModel], Partition]] = {
    "data-parallel": data_parallel,
    "gpipe-balanced": gpipe_balanced,
    "uniform": uniform,
    "parameters": parameters,
}


def baselines(cost: CostModel) -> dict[str, Partition]:
    """Every baseline of :data:`BASELINES` for one cost model, by name.

    Example:
        >>> from planner.profile import LayerProfile, Profile
        >>> from planner.topology import Topology
        >>> la = LayerProfile(name="a", op="", forward_ms=1, backward_ms=1, output_bytes=(4,),
        ...                   parameter_bytes=8)
        >>> cost = CostModel(Profile(model="m", batch_size=1, layers=(la,)), Topology.from_args(gpus=4))
        >>> sorted(baselines(cost))
        ['data-parallel', 'gpipe-balanced', 'parameters', 'uniform']
    """
    return {name: make(cost) for name, make in BASELINES.items()}


def all_baselines(
    profile: Profile,
    topology: Topology,
    *,
    schedule: Schedule = Schedule.PIPEDREAM,
    microbatches: int = 1,
    optimizer: OptimizerKind = OptimizerKind.SGD,
    recompute: bool = False,
    memory_constraint: bool = True,
    cost_model: CostModelKind = CostModelKind.PLANNER,
    memory_bytes: float | None = None,
) -> dict[str, Partition]:
    """The baselines for a profile at the microbatch size (as the solvers receive it).

    The options mean what they mean in :class:`~planner.optimize.cost.SolverOptions`; the
    baselines' own choices (straight pipelines, all devices) are theirs, not options.

    Example:
        >>> from planner.profile import LayerProfile, Profile
        >>> la = LayerProfile(name="a", op="", forward_ms=1, backward_ms=1, output_bytes=(4,),
        ...                   parameter_bytes=8)
        >>> p = Profile(model="m", batch_size=1, layers=(la,))
        >>> all_baselines(p, Topology.from_args(gpus=2))["data-parallel"].stages[0].replicas
        2
    """
    options = SolverOptions(
        schedule=schedule,
        microbatches=microbatches,
        optimizer=optimizer,
        recompute=recompute,
        memory_constraint=memory_constraint,
        cost_model=cost_model,
        memory_bytes=memory_bytes,
    )
    return baselines(CostModel(profile, topology, options))


# --- partitions of a sequence ----------------------------------------------------------------


def uniform_blocks(items: int, parts: int) -> list[int]:
    """Block sizes for ``items`` in ``parts`` blocks, the first ``items % parts`` one larger.

    Example:
        >>> uniform_blocks(10, 4)
        [3, 3, 2, 2]
    """
    size, extra = divmod(items, parts)
    return [size + (1 if p < extra else 0) for p in range(parts)]


def balanced_blocks(weights: Sequence[float] | np.ndarray, parts: int) -> list[int]:
    """Sizes of ``parts`` non-empty contiguous blocks minimising the largest block's weight.

    First the optimum, by an exact min-max DP vectorised per block count: with ``best[k][i]`` the
    smallest largest weight of ``k`` blocks over the first ``i`` items, ``best[k][j] = min_i
    max(best[k-1][i], W[j] - W[i])``; the first term grows with ``i`` and the second shrinks, so
    the optimal ``i`` is where they cross, found for every ``j`` at once by a binary search. Then
    the blocks, as DeepSpeed's ``partition_balanced`` lays them out: each block in turn takes as
    many items as fit under the optimum, leaving at least one item for every later block.

    Example:
        >>> balanced_blocks([1, 1, 6, 2], 2)
        [3, 1]
        >>> balanced_blocks([5, 1, 1, 1, 1, 1], 3)
        [1, 4, 1]
    """
    w = np.asarray(weights, dtype=float)
    n = len(w)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} items into {parts} non-empty blocks")
    prefix = np.concatenate([[0.0], np.cumsum(w)])
    best = prefix.copy()  # one block over the first i items
    for k in range(2, parts + 1):
        # h(i) = best[i] + W[i] does not decrease; best[i] >= W[j] - W[i] from its crossing on
        h = np.where(np.arange(n + 1) >= k - 1, best + prefix, -np.inf)
        j = np.arange(k, n + 1)
        cross = np.searchsorted(np.maximum.accumulate(h), prefix[j], side="left")
        new = np.full(n + 1, np.inf)
        for i in (np.clip(cross - 1, k - 1, j - 1), np.clip(cross, k - 1, j - 1)):
            new[j] = np.minimum(new[j], np.maximum(best[i], prefix[j] - prefix[i]))
        best = new
    limit = best[n] + 1e-12 * prefix[n]  # rounding of the prefix sums, not a real slack
    sizes, start = [], 0
    for p in range(parts - 1):
        last_allowed = n - (parts - 1 - p)  # leave one item for each later block
        end = int(np.searchsorted(prefix, prefix[start] + limit, side="right")) - 1
        end = max(start + 1, min(end, last_allowed))
        sizes.append(end - start)
        start = end
    sizes.append(n - start)
    return sizes


# --- helpers ----------------------------------------------------------------------------------


def _pipeline_stages(cost: CostModel) -> int:
    return min(cost.topology.num_devices, cost.num_layers)


def _score(cost: CostModel, sizes: Sequence[int], replicas: Sequence[int], name: str) -> Partition:
    """Evaluate contiguous blocks of the profile's order and record whether they fit."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    stages = [list(range(bounds[s], bounds[s + 1])) for s in range(len(sizes))]
    plain = dataclasses.replace(cost, options=dataclasses.replace(cost.options, straight=False))
    partition = plain.evaluate(stages, replicas, solver=f"baseline:{name}", optimal=False)
    limit = cost.memory_limit_bytes
    over = [
        (s, st.memory_bytes) for s, st in enumerate(partition.stages) if st.memory_bytes > limit
    ]
    if not over:
        return partition
    s, need = max(over, key=lambda x: x[1])
    process = cost.topology.process_bytes  # each process's own memory, not in the limit
    note = (
        f"stage {s} needs {(need + process) / _GIB:.3g} GiB but a device has "
        f"{(limit + process) / _GIB:.3g} GiB"
    ) + (f" ({len(over)} stages do not fit)" if len(over) > 1 else "")
    return dataclasses.replace(partition, fits=False, note=note)
