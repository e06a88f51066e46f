"""Does it fit? Memory lower bounds and the fewest devices, decided before any search.

Memory (:meth:`~planner.optimize.cost.CostModel.stage_memory_bytes`) depends on a stage's layers,
its replicas ``m`` and the devices from it on ``r`` (microbatches in flight), never on where its
ranks sit. So whether *any* plan fits is a shortest path over the state space: the fewest devices
``g(k)`` that run every layer outside ``D_k`` with every stage fitting is
``min over j, m of m + g(j)`` such that stage ``k -> j`` on ``m`` replicas fits with
``m + g(j)`` devices from it on. Fewest devices downstream is also best for the stage itself (in
flight never decreases with the devices after it), and the smallest ``m`` that fits has a closed
form (in flight is non-increasing in ``m``), so this costs one pass over the pairs of states.

:func:`check_fits` runs it before the DP: a model that cannot fit on the topology is refused at
once, with the smallest fix (the device count that fits, ``--recompute``, a memory size). Two
O(layers) bounds come first: the heaviest single layer, and the whole model's weights, gradients,
optimizer state and one microbatch's activations spread over every device.

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> from planner.topology import Topology
    >>> from planner.optimize.cost import CostModel
    >>> from planner.optimize.states import build_states
    >>> layers = tuple(LayerProfile(name=f"l{i}", op="", forward_ms=1, backward_ms=1,
    ...                             output_bytes=(0,), parameter_bytes=10**9,
    ...                             inputs=(i - 1,) if i else ()) for i in range(4))
    >>> cost = CostModel(Profile(model="m", batch_size=1, layers=layers),
    ...                  Topology.from_args(gpus=2, memory_gb=4))
    >>> fewest_devices(cost, build_states(cost.profile))  # 2 GB of weights+gradients per layer
    3
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from planner.errors import InfeasibleError
from planner.optimize.cost import CostModel, DownsetTables
from planner.optimize.states import StateSpace, build_states
from planner.schedules import OptimizerKind, Schedule
from planner.topology import GIB

__all__ = [
    "LazyInfeasibleError",
    "check_fits",
    "explain_infeasible",
    "fewest_devices",
    "memory_floor_bytes",
]

_BIG = 2**62


def memory_floor_bytes(cost: CostModel) -> tuple[float, float]:
    """``(heaviest layer alone, whole model)`` in bytes: no plan needs less on one device, nor
    less in total over the devices it uses."""
    o = cost.options
    weights = cost.parameter_bytes * (2 + cost.optimizer_factor) + cost.buffer_bytes
    # fewest microbatches in flight any replica keeps: gpipe keeps all of its ceil(M / m)
    least = (
        1 if o.schedule is not Schedule.GPIPE else -(-o.microbatches // cost.topology.num_devices)
    )
    if o.schedule is Schedule.GPIPE and o.straight:
        least = o.microbatches
    layer = weights + cost.saved_bytes * (1 if o.recompute else least)
    return float(layer.max(initial=0.0)), float(layer.sum())


def fewest_devices(cost: CostModel, space: StateSpace | None = None) -> int | None:
    """The fewest devices on which some plan of the state space fits (module docstring); None if
    none does, whatever the device count (a layer larger than a device)."""
    o = cost.options
    cap = cost.memory_limit_bytes
    if not o.memory_constraint:
        return 1
    space = space or build_states(cost.profile, o.state_space)
    t = DownsetTables.from_masks(cost, space.masks)
    last = len(space) - 1
    pd = o.schedule is Schedule.PIPEDREAM
    fixed_versions = 0 if pd else 1
    g = np.full(len(space), _BIG, dtype=np.int64)
    g[last] = 0
    total = o.microbatches
    for k in range(last - 1, -1, -1):
        js = np.flatnonzero(space.includes[k])
        js = js[g[js] < _BIG]
        if len(js) == 0:
            continue
        params = t.parameter_bytes[js] - t.parameter_bytes[k]
        saved = t.saved_bytes[js] - t.saved_bytes[k]
        base = params * (1 + fixed_versions + cost.optimizer_factor)
        base = base + t.buffer_bytes[js] - t.buffer_bytes[k] + (saved if o.recompute else 0.0)
        per = (params if pd else 0.0) + (t.cut_bytes[k] if o.recompute else saved)
        per = np.broadcast_to(per, js.shape).astype(float)
        after = g[js]
        with np.errstate(divide="ignore", invalid="ignore"):
            # the most microbatches in flight the stage can afford
            most = np.where(per > 0, np.floor((cap - base) / np.where(per > 0, per, 1)), np.inf)
        most = np.where(base > cap, -1, most)
        m = np.full(js.shape, _BIG, dtype=np.int64)
        # pipedream: 1 + ceil(after / m) <= most  <=>  m >= after / (most - 1)
        by_depth = np.where(
            after == 0,
            np.where(most >= 1, 1, _BIG),
            np.where(most >= 2, np.ceil(after / np.maximum(most - 1, 1)), _BIG),
        )
        by_total = np.where(most >= 1, np.ceil(total / np.maximum(most, 1)), _BIG)
        if o.schedule is Schedule.PIPEDREAM:
            m = by_depth
        elif o.schedule is Schedule.GPIPE:
            m = by_total
        else:
            m = np.minimum(by_depth, by_total)
        m = np.maximum(np.where(np.isfinite(m), m, _BIG), 1).astype(np.int64)
        # the closed form rounds through floats: settle it on the exact test, as the DP checks
        for _ in range(2):
            bad = (m < _BIG) & ~_fits(cost, base, per, m, after)
            m = np.where(bad, m + 1, m)
        for _ in range(2):
            lower = np.maximum(m - 1, 1)
            better = (m < _BIG) & (m > 1) & _fits(cost, base, per, lower, after)
            m = np.where(better, lower, m)
        m = np.where((m < _BIG) & ~_fits(cost, base, per, m, after), _BIG, m)
        if o.straight:
            m = np.where(m <= 1, 1, _BIG)
        need = np.where(m < _BIG, m + after, _BIG)
        g[k] = need.min()
    return None if g[0] >= _BIG else int(g[0])


def _fits(cost: CostModel, base, per, m: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Whether stages of memory ``base + per x in flight`` fit on ``m`` replicas with ``after``
    devices after them (cost.in_flight, vectorised)."""
    o = cost.options
    safe = np.minimum(m, 2**40)
    total = -(-o.microbatches // safe)
    depth = -(-(safe + after) // safe)
    if o.schedule is Schedule.GPIPE:
        flight = total
    elif o.schedule is Schedule.ONE_F_ONE_B:
        flight = np.minimum(depth, total)
    else:
        flight = depth
    return base + per * flight <= cost.memory_limit_bytes


def check_fits(cost: CostModel, space: StateSpace | None = None) -> None:
    """Raise :class:`InfeasibleError` at once when no plan can fit (module docstring)."""
    o = cost.options
    if not o.memory_constraint:
        return
    n = cost.topology.num_devices
    cap = cost.memory_limit_bytes
    layer, whole = memory_floor_bytes(cost)
    if layer <= cap and whole <= cap * n:
        space = space or build_states(cost.profile, o.state_space)
        need = fewest_devices(cost, space)
        if need is not None and need <= n:
            return
    raise LazyInfeasibleError(lambda: explain_infeasible(cost, None, space))


class LazyInfeasibleError(InfeasibleError):
    """An :class:`InfeasibleError` whose message is built when first read.

    Naming the smallest fix takes a few more feasibility searches (a memory bisection, other
    options); a caller trying several microbatch counts keeps one failure at most, so the
    others never pay for theirs.
    """

    def __init__(self, explain: Callable[[], InfeasibleError]) -> None:
        super().__init__()
        self._explain = explain
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = str(self._explain())
        return self._text


def _with(cost: CostModel, **changes) -> CostModel:
    return CostModel(cost.profile, cost.topology, dataclasses.replace(cost.options, **changes))


def explain_infeasible(
    cost: CostModel,
    fits: Callable[[CostModel], bool] | None = None,
    space: StateSpace | None = None,
) -> InfeasibleError:
    """An error naming why nothing fits and the smallest fixes that would.

    ``fits``: the caller's exact test on a changed cost model (the DP), used when the memory
    bounds alone say the model fits (e.g. every device must be used); else the bounds decide.
    """
    o = cost.options
    n = cost.topology.num_devices
    cap = cost.memory_limit_bytes
    layer, whole = memory_floor_bytes(cost)
    process = cost.topology.process_bytes  # each process's own memory, not in the limit
    head = (
        f"{cost.profile.model!r} does not fit on {n} device(s) of {(cap + process) / GIB:.3g} GiB"
        + (f" ({process / GIB:.2g} GiB of each held by its process)" if process else "")
        + f" under schedule {o.schedule}"
        + (" with recomputation" if o.recompute else "")
        + f" and optimizer {o.optimizer}"
    )
    space = space or build_states(cost.profile, o.state_space)
    need = fewest_devices(cost, space) if layer <= cap else None
    if layer > cap:
        why = f"its largest layer alone needs {layer / GIB:.3g} GiB"
    elif need is not None and need > n:
        why = f"it needs at least {need} devices ({whole / GIB:.3g} GiB in all)"
    else:
        why = "no partition on exactly these devices fits"
    fixes = []
    if need is not None and need > n:
        step = cost.topology.levels[0].devices if len(cost.topology.levels) > 1 else 1
        fixes.append(f"--gpus {-(-need // step) * step}")
    trials: list[tuple[str, CostModel]] = []
    if not o.recompute:
        trials.append(("--recompute", _with(cost, recompute=True)))
    if o.schedule is Schedule.PIPEDREAM:
        trials.append(("--schedule 1f1b", _with(cost, schedule=Schedule.ONE_F_ONE_B)))
    if o.optimizer is not OptimizerKind.SGD:
        trials.append(("--optimizer sgd", _with(cost, optimizer=OptimizerKind.SGD)))
    for flag, changed in trials:
        if _fits_on(changed, space, fits):
            fixes.append(flag)
    memory = _smallest_memory(cost, space)
    if memory is not None and memory > cap:
        fixes.append(f"--memory-gb {math.ceil(memory / GIB * 100) / 100:g}")
    lines = [head, why]
    if fixes:
        lines.append("it fits with " + ", or with ".join(fixes))
    else:
        lines.append("no single change fits it: use devices with more memory or a smaller batch")
    if o.microbatches > 1 or not fixes:
        lines[-1] += "; a smaller microbatch also needs less memory"
    return InfeasibleError("; ".join(lines))


def _fits_on(cost: CostModel, space: StateSpace, fits: Callable[[CostModel], bool] | None) -> bool:
    layer, _ = memory_floor_bytes(cost)
    if layer > cost.memory_limit_bytes:
        return False
    need = fewest_devices(cost, space)
    if need is None or need > cost.topology.num_devices:
        return False
    return fits(cost) if fits is not None and not cost.options.allow_fewer_devices else True


def _smallest_memory(cost: CostModel, space: StateSpace) -> float | None:
    """The smallest device memory (within 3%, rounded up) on which some plan fits the devices:
    bisection between the memory floors (no plan needs less) and a fitting size."""
    n = cost.topology.num_devices
    layer, whole = memory_floor_bytes(cost)
    lo = max(cost.memory_limit_bytes, layer, whole / n)

    def fits(memory: float) -> bool:
        need = fewest_devices(_with(cost, memory_bytes=memory), space)
        return need is not None and need <= n

    hi = lo * 1.25
    for _ in range(40):
        if fits(hi):
            break
        lo, hi = hi, hi * 2
    else:
        return None
    while hi - lo > hi * 0.03:
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi
