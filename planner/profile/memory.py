"""How much memory profiling a batch takes, estimated before measuring, without running it.

Profiling keeps every layer's output of the recording pass (each layer is then timed alone on
them) and runs a backward through the whole model, so its peak is about

    parameters + their gradients + every layer's output and every tensor saved for backward

(no optimizer state: profiling never steps an optimizer). The activation part comes from one
forward of the captured graph under torch's fake tensor mode: shapes and dtypes only, no memory
and no compute, counting each storage once (a view is its base; parameters and buffers are
already counted). It grows linearly with the batch, so one estimate gives the largest batch that
fits (:meth:`MemoryEstimate.largest_batch`). :func:`available_bytes` reads ``MemAvailable`` from
``/proc/meminfo``; the profiler allows itself half of it.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(100, 1000), torch.nn.ReLU())
    >>> est = estimate_profiling_memory(net, (torch.randn(8, 100),))
    >>> est.parameter_bytes, est.activation_bytes >= 8 * 1000 * 4
    (404000, True)
    >>> est.largest_batch(est.new_bytes)  # the room gradients and activations need
    8
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from planner.errors import ProfileError
from planner.profile.capture import capture

__all__ = [
    "MEMORY_FRACTION",
    "MemoryEstimate",
    "available_bytes",
    "check_profiling_memory",
    "estimate_profiling_memory",
]

MEMORY_FRACTION = 0.5
"""Profiling may use this fraction of the memory available when it starts."""


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """The memory profiling one batch needs.

    Attributes:
        batch_size: The batch estimated.
        parameter_bytes: Parameters and buffers.
        gradient_bytes: Gradients of the trainable parameters.
        activation_bytes: Every layer's outputs and saved-for-backward tensors at this batch.
    """

    batch_size: int
    parameter_bytes: int
    gradient_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.activation_bytes

    @property
    def new_bytes(self) -> int:
        """What profiling allocates beyond the model itself (gradients and activations)."""
        return self.gradient_bytes + self.activation_bytes

    def at(self, batch_size: int) -> MemoryEstimate:
        """The same model at another batch (activations scale with it)."""
        per_sample = self.activation_bytes / self.batch_size
        return MemoryEstimate(
            batch_size=batch_size,
            parameter_bytes=self.parameter_bytes,
            gradient_bytes=self.gradient_bytes,
            activation_bytes=math.ceil(per_sample * batch_size),
        )

    def largest_batch(self, budget_bytes: float) -> int:
        """The largest batch whose new memory fits ``budget_bytes`` (0 if not even one)."""
        per_sample = self.activation_bytes / self.batch_size
        room = budget_bytes - self.gradient_bytes
        if room < per_sample:
            return 0
        return int(room // per_sample) if per_sample > 0 else 1 << 30


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def estimate_profiling_memory(
    module: torch.nn.Module, inputs: Sequence[Any], leaf_modules: Sequence[str] = ()
) -> MemoryEstimate:
    """Estimate profiling ``module`` on ``inputs`` (module docstring); the module is unchanged.

    Raises:
        ModelError: the model cannot be traced.
    """
    graph = capture(module, leaf_modules)
    weights = list(module.parameters()) + list(module.buffers())
    parameter_bytes = sum(_nbytes(t) for t in dict.fromkeys(weights))
    gradient_bytes = sum(_nbytes(p) for p in dict.fromkeys(module.parameters()) if p.requires_grad)
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        activation_bytes = _fake_activations(graph.module, inputs)
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
    batch = next(
        (int(t.shape[0]) for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), 1
    )
    return MemoryEstimate(
        batch_size=batch,
        parameter_bytes=parameter_bytes,
        gradient_bytes=gradient_bytes,
        activation_bytes=activation_bytes,
    )


def check_profiling_memory(
    estimate: MemoryEstimate, *, model: str, option: str, budget_bytes: float | None = None
) -> None:
    """Refuse a profiling batch that does not fit in :data:`MEMORY_FRACTION` of free memory.

    ``budget_bytes`` defaults to that fraction of :func:`available_bytes` (no check when unknown).

    Raises:
        ProfileError: with the estimate, the budget and the batch to pass with ``option``.
    """
    if budget_bytes is None:
        free = available_bytes()
        if free is None:
            return
        budget_bytes = MEMORY_FRACTION * free
    if estimate.new_bytes <= budget_bytes:
        return
    fit = estimate.largest_batch(budget_bytes)
    fix = (
        f"pass {option} {fit}"
        if fit
        else "even batch 1 does not fit: free memory or use --leaf-modules for coarser layers"
    )
    raise ProfileError(
        f"profiling {model} at batch {estimate.batch_size} needs about "
        f"{_gib(estimate.new_bytes)} GiB (gradients {_gib(estimate.gradient_bytes)} GiB, "
        f"activations {_gib(estimate.activation_bytes)} GiB) beyond the model's "
        f"{_gib(estimate.parameter_bytes)} GiB, more than half of the free memory "
        f"({_gib(budget_bytes)} GiB); {fix}"
    )


def _gib(nbytes: float) -> str:
    return f"{nbytes / 1024**3:.2f}"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _fake_activations(gm: fx.GraphModule, inputs: Sequence[Any]) -> int:
    """Bytes of every node's outputs and saved tensors, each storage once, under fake mode.

    The module's parameters and buffers are swapped for fake ones, so tensors that are views of
    them (a Linear saves its weight transposed) are recognised by their storage and left out.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    storages: dict[int, int] = {}
    weights: set[int] = set()
    kept: list[Any] = []  # keeps every storage alive, so no key is reused

    def note(t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        with contextlib.suppress(RuntimeError, NotImplementedError):
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in weights:
                storages[key] = max(storages.get(key, 0), storage.nbytes())
                kept.append(t)

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    class _Counter(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.op not in ("placeholder", "output"):
                for t in _tensors(value):
                    note(t)
            return value

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state: dict[str, torch.Tensor] = {
            name: mode.from_tensor(t) for name, t in (*gm.named_parameters(), *gm.named_buffers())
        }
        weights.update(t.untyped_storage()._cdata for t in state.values())
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.enable_grad(),
            torch.nn.utils.stateless._reparametrize_module(gm, state),
        ):
            _Counter(gm).run(*fake)
    return sum(storages.values())


def _tensors(value: Any) -> list[torch.Tensor]:
    from torch.fx.node import map_aggregate

    found: list[torch.Tensor] = []
    map_aggregate(value, lambda x: found.append(x) if isinstance(x, torch.Tensor) else None)
    return found
