"""One recorded forward pass through a captured graph: every layer's values, and exact sizes.

The profiler (:mod:`planner.profile.measure`) runs the model once through an fx interpreter
that keeps every layer's output (detached), notes which values required grad, which layers
changed their inputs in place (their version counter moved) and, through
``torch.autograd.graph.saved_tensors_hooks``, the storages autograd saved for each layer's
backward. From that, :func:`layer_sizes` gives each layer's sizes, exact from shapes and dtypes:

* ``output_bytes``: every output tensor (nested tuples and lists flattened); a view counts as
  the tensor it shows, since that is what a pipeline stage would send.
* ``saved_bytes``: each storage autograd saves counted once per layer, without the model's
  parameters and buffers (held regardless of microbatches). A saved storage can be another
  layer's output too (a Linear saves its input).
* ``parameter_bytes``: parameters owned by the first layer that uses them, so a shared
  (tied) parameter counts once; a ``get_attr`` layer fetching a parameter owns it.
* ``buffer_bytes``: non-parameter buffers (BatchNorm statistics, masks), owned the same way.

Example:
    >>> import torch
    >>> from planner.profile.capture import capture
    >>> g = capture(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()))
    >>> [(s.output_bytes, s.parameter_bytes) for s in layer_sizes(g, (torch.randn(2, 4),))]
    [((64,), 160), ((64,), 0)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from planner.errors import ModelError
from planner.profile.capture import CapturedGraph

__all__ = ["LayerSizes", "Recording", "flatten_tensors", "layer_sizes", "record"]


@dataclass(frozen=True, kw_only=True)
class LayerSizes:
    """Sizes of one layer, exact from shapes and dtypes (see the module docstring).

    Attributes:
        output_bytes: Bytes of each output tensor.
        saved_bytes: Bytes of the storages autograd saves for this layer's backward.
        parameter_bytes: Bytes of the parameters this layer owns.
        buffer_bytes: Bytes of the buffers this layer owns.
    """

    output_bytes: tuple[int, ...]
    saved_bytes: int
    parameter_bytes: int
    buffer_bytes: int


@dataclass(frozen=True, kw_only=True)
class Recording:
    """What one interpreted forward pass learned about every node.

    Attributes:
        values: Each node's value (placeholders included), tensors detached.
        grad_ids: ``id()`` of the detached tensors whose original required grad.
        inplace: Layers that changed one of their inputs in place.
        saved_bytes: Per layer, bytes of the storages autograd saved (see module docstring).
    """

    values: dict[fx.Node, Any]
    grad_ids: frozenset[int]
    inplace: frozenset[fx.Node]
    saved_bytes: dict[fx.Node, int]


def flatten_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a nested value (tuples, lists, dicts), in order."""
    found: list[torch.Tensor] = []
    map_aggregate(value, lambda x: found.append(x) if isinstance(x, torch.Tensor) else None)
    return found


def fetch_attr(root: torch.nn.Module, target: str) -> Any:
    """The attribute at a dotted path, as a ``get_attr`` node reads it."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def record(graph: CapturedGraph, inputs: Sequence[Any], *, backward: bool = False) -> Recording:
    """Run ``graph`` once on ``inputs`` (grad enabled), keeping every value detached.

    With ``backward``, a backward pass follows (grads w.r.t. the trainable parameters, grad
    outputs of ones, nothing accumulated into ``.grad``), so the run is a full warm-up step.

    Raises:
        ModelError: a layer fails on these inputs; the message names it.
    """
    gm = graph.module
    weights = {t.untyped_storage().data_ptr() for t in (*gm.parameters(), *gm.buffers())}
    recorder = _Recorder(gm, weights)
    out = recorder.run(*inputs)
    grad_ids: set[int] = set()

    def detach(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        d = x.detach()
        if x.requires_grad:
            grad_ids.add(id(d))
        return d

    values = {node: map_aggregate(v, detach) for node, v in recorder.env.items()}
    if backward:
        outs = [t for t in flatten_tensors(out) if t.requires_grad]
        params = [p for p in gm.parameters() if p.requires_grad]
        if outs and params:
            torch.autograd.grad(outs, params, [torch.ones_like(t) for t in outs], allow_unused=True)
    return Recording(
        values=values,
        grad_ids=frozenset(grad_ids),
        inplace=frozenset(recorder.inplace),
        saved_bytes=recorder.saved,
    )


def layer_sizes(
    graph: CapturedGraph, inputs: Sequence[Any], recording: Recording | None = None
) -> tuple[LayerSizes, ...]:
    """Sizes of every layer of ``graph`` (one forward pass on ``inputs`` unless ``recording``)."""
    rec = recording if recording is not None else record(graph, inputs)
    gm = graph.module
    seen: set[int] = set()
    result = []
    for layer in graph.layers:
        node = layer.node
        params: list[torch.Tensor] = []
        buffers: list[torch.Tensor] = []
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            params, buffers = list(sub.parameters()), list(sub.buffers())
        elif node.op == "get_attr":
            value = fetch_attr(gm, str(node.target))
            if isinstance(value, torch.nn.Parameter):
                params = [value]
            elif isinstance(value, torch.Tensor):
                buffers = [value]
        owned_params = [p for p in params if id(p) not in seen]
        owned_buffers = [b for b in buffers if id(b) not in seen]
        seen.update(id(t) for t in (*owned_params, *owned_buffers))
        result.append(
            LayerSizes(
                output_bytes=tuple(_nbytes(t) for t in flatten_tensors(rec.values[node])),
                saved_bytes=rec.saved_bytes.get(node, 0),
                parameter_bytes=sum(_nbytes(p) for p in owned_params),
                buffer_bytes=sum(_nbytes(b) for b in owned_buffers),
            )
        )
    return tuple(result)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Recorder(fx.Interpreter):
    """An interpreter noting in-place layers and saved-for-backward storages per layer."""

    def __init__(self, gm: fx.GraphModule, weights: set[int]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.weights = weights
        self.inplace: set[fx.Node] = set()
        self.saved: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "output"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        before = [(t, t._version) for t in flatten_tensors((args, kwargs))]
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without a storage
                return t
            if storage.data_ptr() not in self.weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = super().run_node(n)
        except Exception as exc:  # the user's layer failed on these inputs
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelError(
                f"layer {n.name} ({n.op} {n.target}) failed while profiling: "
                f"{type(exc).__name__}: {reason}; check the input shape and dtype"
            ) from None
        if any(t._version != v for t, v in before):
            self.inplace.add(n)
        self.saved[n] = sum(storages.values())
        return out
