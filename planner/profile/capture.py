"""Capturing a model as a layer DAG with torch.fx.

Every fx node that computes something (``call_module``, ``call_function``, ``call_method``,
``get_attr``) is a layer; placeholders are the model's inputs and the output node is not a layer.
Modules in ``torch.nn`` are leaves (one layer each) as fx makes them; ``leaf_modules`` keeps more
modules whole, by type name (``TransformerBlock``) or qualified name (``blocks.3``), for coarser
profiles of big models. The profiler and the runtime both cut models through this module, so a
profile's layer names are the node names the runtime finds.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> g = capture(net)
    >>> [layer.name for layer in g.layers], [layer.inputs for layer in g.layers]
    (['_0', '_1', '_2'], [(), (0,), (1,)])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from planner.errors import ModelError
from planner.profile.format import graph_hash

__all__ = ["CapturedGraph", "CapturedLayer", "capture", "describe_node"]

_LAYER_OPS = ("call_module", "call_function", "call_method", "get_attr")


@dataclass(frozen=True, kw_only=True)
class CapturedLayer:
    """One layer of a captured graph: its fx node, and the indices of the layers it reads.

    Attributes:
        name: The fx node's name (unique in the graph).
        op: Human description, e.g. ``"Conv2d(3, 64, kernel_size=(7, 7), ...)"`` or ``"add"``.
        target: Module qualified name, function name, method name or attribute path.
        node: The fx node itself.
        inputs: Indices (into the layer list) of layers whose outputs it reads.
        reads_model_input: Whether it reads one of the model's inputs (a placeholder).
    """

    name: str
    op: str
    target: str
    node: fx.Node
    inputs: tuple[int, ...]
    reads_model_input: bool


@dataclass(frozen=True, kw_only=True)
class CapturedGraph:
    """A traced model: the GraphModule and its layers in the graph's (topological) order."""

    module: fx.GraphModule
    layers: tuple[CapturedLayer, ...]
    leaf_modules: tuple[str, ...]

    @property
    def graph_hash(self) -> str:
        """Hash of names, ops and edges; equal to the ``graph_hash`` of a profile of this model."""
        return graph_hash((layer.name, layer.op, layer.inputs) for layer in self.layers)

    @property
    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.module.graph.nodes if n.op == "placeholder"]

    @property
    def output_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose values the model returns."""
        index = {layer.node: i for i, layer in enumerate(self.layers)}
        (out,) = [n for n in self.module.graph.nodes if n.op == "output"]
        return tuple(index[n] for n in out.all_input_nodes if n in index)


class _LeafTracer(fx.Tracer):
    """fx's default tracer, keeping also the requested modules whole."""

    def __init__(self, leaf_modules: Sequence[str]) -> None:
        super().__init__()
        self._leaf = set(leaf_modules)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if type(m).__name__ in self._leaf or module_qualified_name in self._leaf:
            return True
        if getattr(m, "_planner_layer", False):  # one layer of a torch.export capture
            return True
        return super().is_leaf_module(m, module_qualified_name)


def describe_node(node: fx.Node, root: torch.nn.Module) -> str:
    """A one-line description of what a node computes, stable across runs."""
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        extra = module.extra_repr().replace("\n", " ")
        return f"{type(module).__name__}({extra})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return f"getattr {node.target}"


def capture(model: torch.nn.Module, leaf_modules: Sequence[str] = ()) -> CapturedGraph:
    """Trace ``model`` with torch.fx into a layer DAG.

    Raises:
        ModelError: fx cannot trace the model (data-dependent control flow, unsupported calls);
            the message names the failing construct and suggests ``--leaf-modules``.
    """
    leaf_modules = tuple(leaf_modules)
    _check_leaf_names(model, leaf_modules)
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except (
        Exception
    ) as exc:  # fx raises TraceError, TypeError, RuntimeError, ... for untraceable code
        construct = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = _innermost_module(exc, model)
        hint = f" (in module {where!r})" if where else ""
        raise ModelError(
            f"torch.fx cannot trace {type(model).__name__}{hint}: {type(exc).__name__}: {construct}; "
            "keep the offending submodule whole with --leaf-modules TYPE_OR_NAME"
        ) from None
    module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    layers: list[CapturedLayer] = []
    index: dict[fx.Node, int] = {}
    for node in module.graph.nodes:
        if node.op not in _LAYER_OPS:
            continue
        inputs = tuple(sorted({index[n] for n in node.all_input_nodes if n in index}))
        reads_input = any(n.op == "placeholder" for n in node.all_input_nodes)
        index[node] = len(layers)
        layers.append(
            CapturedLayer(
                name=node.name,
                op=describe_node(node, module),
                target=str(getattr(node.target, "__name__", node.target)),
                node=node,
                inputs=inputs,
                reads_model_input=reads_input,
            )
        )
    if not layers:
        raise ModelError(f"{type(model).__name__} traced to an empty graph; it computes nothing")
    return CapturedGraph(module=module, layers=tuple(layers), leaf_modules=leaf_modules)


def _check_leaf_names(model: torch.nn.Module, leaf_modules: Sequence[str]) -> None:
    names = {name for name, _ in model.named_modules()}
    types = {type(m).__name__ for m in model.modules()}
    unknown = [leaf for leaf in leaf_modules if leaf not in names and leaf not in types]
    if unknown:
        raise ModelError(
            f"--leaf-modules {', '.join(unknown)} names no module type or submodule of "
            f"{type(model).__name__}; module types present: {', '.join(sorted(types)[:12])}"
        )


def _innermost_module(exc: BaseException, model: torch.nn.Module) -> str | None:
    """The qualified name of the deepest submodule whose forward appears in the traceback."""
    codes: dict[object, str] = {}
    for name, sub in model.named_modules():
        forward = getattr(type(sub), "forward", None)
        code = getattr(forward, "__code__", None)
        if code is not None:
            codes.setdefault(code, name or type(model).__name__)
    found = None
    tb = exc.__traceback__
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code)
        if name is not None:
            found = name
        tb = tb.tb_next
    return found
