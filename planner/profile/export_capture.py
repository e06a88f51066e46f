"""Capturing models torch.fx cannot trace (Hugging Face transformers) with torch.export.

``torch.fx.symbolic_trace`` fails on today's transformers models; ``torch.export.export`` captures
them, as ATen operations that each carry ``nn_module_stack`` (the modules whose forward was
running). :func:`export_layers` exports a model once, with a dynamic batch dimension so every
microbatch size runs the same graph, and regroups the ATen nodes into **layers**, one
``torch.fx.GraphModule`` per group, called in order by a top-level ``GraphModule``. Each layer
module is marked as a leaf, so :func:`planner.profile.capture.capture` sees one ``call_module``
node per layer and the whole planner (profile, plan, ``plan run``, export) treats the result like
any fx-traced model.

**Grouping.** The key of a node is the module it belongs to at the planning grain: the outermost
``ModuleList`` element in its stack (a transformer block, ``transformer.h.3``), else the innermost
module (``lm_head``, ``transformer.wte``). Nodes are taken in the exported (topological) order and
a new layer starts whenever the key changes, so layers are contiguous runs of a topological order
and the layer graph is acyclic by construction. Runs whose key is a container that is not a block
(shape and mask glue computed in ``GPT2Model.forward``), and second calls of a module already
seen, join the previous layer (the first layer if nothing precedes them). After that every key
names one module called once, so a layer's key is also a valid ``SplitPoint`` for
``torch.distributed.pipelining`` and an FQN for torchtitan's ``module_fqns_per_model_part``.

Parameters are ``get_attr`` nodes in the exported graph; each layer module holds the ones it
reads (the same tensor objects), under their original qualified names.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> top = export_layers(net, (torch.zeros(2, 4),))
    >>> [name for name, _ in top.named_children()]
    ['_0', '_1', '_2']
    >>> top.planner_layer_fqns["_2"]
    '2'
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from planner.errors import ModelError

__all__ = ["LAYER_FLAG", "export_layers", "layer_fqns"]

LAYER_FLAG = "_planner_layer"
"""Attribute set on each layer module; :mod:`planner.profile.capture` keeps such modules whole."""

_BLOCK = re.compile(r"(^|\.)\d+$")
_SKIP_MODULES = ("_guards_fn",)  # torch.export's input-shape guard: the layer graph has its own


def layer_fqns(module: torch.nn.Module) -> dict[str, str]:
    """Layer name -> the original module's qualified name, for a module from :func:`export_layers`.

    Empty for any other module.
    """
    return dict(getattr(module, "planner_layer_fqns", {}))


def export_layers(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    kwargs: dict[str, Any] | None = None,
    output: str | None = None,
) -> fx.GraphModule:
    """Export ``model`` and regroup its ATen graph into one leaf module per layer.

    Args:
        model: The model; called as ``model(*example_inputs, **kwargs)``.
        example_inputs: Example positional tensors with a batch dimension of at least 2 (dim 0
            is exported as dynamic).
        kwargs: Constant keyword arguments (``{"use_cache": False}``).
        output: Attribute of the model's output to return; default: the output if it is a
            tensor, else its ``logits``, ``last_hidden_state`` or first element.

    Returns:
        A ``GraphModule`` taking the same positional inputs and returning one tensor; attribute
        ``planner_layer_fqns`` maps each layer (child) name to its module's qualified name.

    Raises:
        ModelError: torch.export cannot capture the model.
    """
    wrapper = _Wrapper(model, dict(kwargs or {}), output)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = (tuple({0: batch} for _ in example_inputs),)  # one entry: forward(*inputs)
    try:
        program = torch.export.export(wrapper, tuple(example_inputs), dynamic_shapes=dynamic)
    except Exception as exc:  # export raises many types: Unsupported, UserError, RuntimeError...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"torch.export cannot capture {type(model).__name__} with a dynamic batch "
            f"dimension: {type(exc).__name__}: {reason}; check that the model runs on the "
            "example inputs, or build a smaller configuration to find the failing module"
        ) from None
    flat = program.module()
    return _regroup(flat, model)


class _Wrapper(torch.nn.Module):
    """``model(*inputs, **kwargs)``, reduced to one tensor output."""

    def __init__(self, model: torch.nn.Module, kwargs: dict[str, Any], output: str | None):
        super().__init__()
        self.model = model
        self.kwargs = kwargs
        self.output = output

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs, **self.kwargs)
        if self.output:
            return getattr(out, self.output)
        if isinstance(out, torch.Tensor):
            return out
        for name in ("logits", "last_hidden_state"):  # transformers' ModelOutput
            if getattr(out, name, None) is not None:
                return getattr(out, name)
        return out[0]


def _key(node: fx.Node) -> tuple[str, type | str] | None:
    """(qualified name, type) of the module that owns ``node`` at the planning grain."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entries = []
    for path, kind in stack.values():
        if path == "model":
            entries.append(("", kind))
        elif path.startswith("model."):
            entries.append((path[len("model.") :], kind))
    if not entries:
        return None  # only torch.export's own hooks
    for path, kind in entries:
        if _BLOCK.search(path):
            return path, kind
    return entries[-1]


def _regroup(flat: fx.GraphModule, model: torch.nn.Module) -> fx.GraphModule:
    named = dict(model.named_modules())

    def is_leaf(path: str) -> bool:
        module = named.get(path)
        return module is not None and not any(True for _ in module.children())

    groups: list[tuple[str, list[fx.Node]]] = []
    seen: set[str] = set()
    for node in flat.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module" and str(node.target) in _SKIP_MODULES:
            continue
        key = _key(node)
        path = key[0] if key else ""
        standalone = bool(path) and (_BLOCK.search(path) is not None or is_leaf(path))
        if groups and path == groups[-1][0]:
            groups[-1][1].append(node)
        elif standalone and path not in seen:
            groups.append((path, [node]))
            seen.add(path)
        elif groups:
            groups[-1][1].append(node)  # glue or a module's second call: joins the layer before
        else:
            groups.append(("", [node]))  # glue before any module: merged forward below
    if len(groups) > 1 and groups[0][0] == "":
        groups[1] = (groups[1][0], groups[0][1] + groups[1][1])
        del groups[0]
    kinds = [type(named[p]).__name__ if p in named else "Layer" for p, _ in groups]
    return _build(flat, groups, kinds)


def _build(
    flat: fx.GraphModule, groups: list[tuple[str, list[fx.Node]]], kinds: list[str]
) -> fx.GraphModule:
    group_of: dict[fx.Node, int] = {}
    for g, (_, nodes) in enumerate(groups):
        for node in nodes:
            group_of[node] = g
    placeholders = [n for n in flat.graph.nodes if n.op == "placeholder"]
    (out_node,) = [n for n in flat.graph.nodes if n.op == "output"]
    outputs = [n for n in out_node.all_input_nodes if n.op != "get_attr"]
    if len(outputs) != 1:
        raise ModelError(f"expected the exported model to return one tensor, got {len(outputs)}")
    # Values each group must hand on: read by a later group or returned by the model.
    needed: dict[int, list[fx.Node]] = {g: [] for g in range(len(groups))}
    for node in flat.graph.nodes:
        readers = {group_of[u] for u in node.users if u in group_of}
        owner = group_of.get(node)
        if owner is None:
            continue
        if any(r != owner for r in readers) or node is outputs[0]:
            needed[owner].append(node)

    top = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for p in placeholders:
        env[p] = top.placeholder(p.name)
    children: dict[str, torch.nn.Module] = {}
    fqns: dict[str, str] = {}
    for g, (path, nodes) in enumerate(groups):
        name = _layer_name(path, g, children)
        sub, inputs = _subgraph(nodes, needed[g])
        module = fx.GraphModule(_attr_root(flat, sub), sub, kinds[g])
        setattr(module, LAYER_FLAG, True)
        children[name] = module
        fqns[name] = path
        call = top.call_module(name, tuple(env[n] for n in inputs))
        call.name = name
        outs = needed[g]
        if len(outs) == 1:
            env[outs[0]] = call
        else:
            for i, node in enumerate(outs):
                env[node] = top.call_function(operator.getitem, (call, i))
    top.output(env[outputs[0]])
    root = torch.nn.Module()
    for name, child in children.items():
        root.add_module(name, child)
    result = fx.GraphModule(root, top, "ExportedLayers")
    result.planner_layer_fqns = fqns  # type: ignore[assignment]
    return result


def _layer_name(path: str, index: int, taken: dict[str, Any]) -> str:
    base = re.sub(r"\W", "_", path) or f"layer{index}"
    if base[0].isdigit():
        base = "_" + base
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _subgraph(nodes: list[fx.Node], outs: list[fx.Node]) -> tuple[fx.Graph, list[fx.Node]]:
    """The graph of one layer: its external inputs become placeholders, ``outs`` its output."""
    members = set(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op == "get_attr":
                env[n] = graph.get_attr(str(n.target))
            else:
                assert n not in members, f"{n.name} used before it is computed"
                env[n] = graph.placeholder(n.name)
                inputs.append(n)
        return env[n]

    for node in nodes:
        for source in node.all_input_nodes:
            arg(source)
        env[node] = graph.node_copy(node, arg)
    graph.output(env[outs[0]] if len(outs) == 1 else tuple(env[n] for n in outs))
    graph.lint()
    return graph, inputs


def _attr_root(flat: fx.GraphModule, graph: fx.Graph) -> dict[str, Any]:
    """The attributes a layer graph reads, resolved in the exported module."""
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            value: Any = flat
            for part in str(node.target).split("."):
                value = getattr(value, part)
            root[str(node.target)] = value
    return root
