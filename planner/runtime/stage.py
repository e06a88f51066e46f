"""Cutting a traced model into pipeline stages, one fx submodule per stage.

The plan assigns every layer (fx node) to a stage. This module checks the assignment against the
model the rank rebuilt, works out which values cross each cut, and builds the submodule of one
stage: its placeholders are the values arriving over the boundary before it, its output the values
leaving over the boundary after it (the last stage returns the model's output).

**Relay, not direct sends.** A value produced in stage ``p`` and last read in stage ``c > p + 1``
(a skip connection that jumps stages) is relayed: boundary ``s`` (from stage ``s`` to ``s + 1``)
carries every value produced in stages ``<= s`` and read in stages ``> s``. Why:

- every transfer is between neighbouring stages, so a rank only ever talks to the replicas of the
  stage before and after it; the peer of every message follows from the plan alone;
- each stage has exactly one incoming and one outgoing boundary, one ordered list of named
  tensors each way per microbatch; gradients flow back over the same lists;
- the cost model and the simulator charge each link with exactly these bytes, so predicted
  and measured communication count the same thing.

The price is extra bytes on the intermediate links, which a direct send would avoid.

**Model inputs are relayed too.** Stage 0 reads the microbatch from the data loader; a later stage
that reads a model input (a GPT's token ids, a mask) gets it over the boundaries like any other
value, counted by the cost model the same way ("produced in stage 0"). Only stage 0 needs the
inputs and only the last stage needs the targets.

**Non-tensor values** crossing a cut (``x.size(0)``, shape tuples) are static for a fixed
microbatch size: every rank computes them at start-up by propagating a microbatch through the
whole graph (:func:`propagate`) and bakes them in; only tensors travel.

``get_attr`` nodes (parameters read directly) belong to the stage the plan puts them in. A
parameter used by several stages (tied embeddings, a module called twice) exists on each of them;
:func:`shared_parameters` finds these so their gradients can be summed across stages.

Example:
    >>> import torch
    >>> from planner.profile.capture import capture
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cut = cut_graph(capture(net), [["_0", "_1"], ["_2"]])
    >>> cut.boundaries
    (('_1',),)
    >>> build_stage_module(capture(net), cut, 1)(torch.zeros(3, 8)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from planner.errors import PlanError
from planner.plan import Plan
from planner.profile.capture import CapturedGraph, capture

__all__ = [
    "SharedParameter",
    "StageCut",
    "build_stage_module",
    "capture_for_plan",
    "cut_graph",
    "propagate",
    "release_other_stages",
    "shared_parameters",
]

_LAYER_OPS = ("call_module", "call_function", "call_method", "get_attr")


@dataclass(frozen=True, kw_only=True)
class StageCut:
    """Where a model is cut: each stage's nodes and the values crossing each boundary.

    Attributes:
        inputs: The model's input names (fx placeholders), in order.
        stages: Node names of each stage, in graph order.
        boundaries: ``boundaries[s]``: names of the values going from stage ``s`` to ``s + 1``,
            in graph order (model inputs first); relayed values included.
    """

    inputs: tuple[str, ...]
    stages: tuple[tuple[str, ...], ...]
    boundaries: tuple[tuple[str, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_inputs(self, stage: int) -> tuple[str, ...]:
        """Names of the values stage ``stage`` takes: the model inputs or the boundary before it."""
        return self.inputs if stage == 0 else self.boundaries[stage - 1]

    def stage_outputs(self, stage: int) -> tuple[str, ...]:
        """Names of the values stage ``stage`` sends on; ``()`` for the last stage."""
        return self.boundaries[stage] if stage < len(self.boundaries) else ()


@dataclass(frozen=True, kw_only=True)
class SharedParameter:
    """One parameter held by several stages (e.g. tied input and output embeddings).

    Attributes:
        stages: The stages holding it, ascending.
        names: Its qualified name in each of those stages' modules (same order).
    """

    stages: tuple[int, ...]
    names: tuple[str, ...]

    def name_in(self, stage: int) -> str:
        return self.names[self.stages.index(stage)]


def capture_for_plan(plan: Plan, module: torch.nn.Module) -> CapturedGraph:
    """Trace ``module`` as the profiler did and check it is the model the plan was made for.

    Raises:
        PlanError: The graph hash differs from the plan's profile, or the layers do not match.
        ModelError: fx cannot trace the model.
    """
    captured = capture(module, plan.profile.leaf_modules)
    expected = plan.profile.graph_hash
    if expected is not None and captured.graph_hash != expected and _imported(plan):
        model = plan.profile.model
        raise PlanError(
            f"this plan was made from a profile imported from PipeDream ({plan.profile.path}), "
            f"whose layers are PipeDream's graph nodes, not {model}'s modules, so it cannot run; "
            f"profile the real model (plan profile --model {model} --batch-size "
            f"{plan.profile.batch_size} -o {model}.json), re-plan with --profile {model}.json, "
            "then plan run"
        )
    if expected is not None and captured.graph_hash != expected:
        raise PlanError(
            f"model {plan.profile.model!r} traces to graph hash {captured.graph_hash} but the plan's "
            f"profile ({plan.profile.path}) has {expected}; the model or its configuration changed "
            "since profiling: re-profile and re-plan"
        )
    cut_graph(captured, [stage.layers for stage in plan.stages])  # validates the assignment
    return captured


def _imported(plan: Plan) -> bool:
    """Whether the plan's profile was imported from PipeDream (it has no model to run)."""
    from planner.errors import PlannerError
    from planner.profile.format import Profile

    try:
        return Profile.load(plan.profile.path).source == "pipedream"
    except PlannerError:  # the profile file is gone: PipeDream's layers are node1, node2, ...
        return all(
            name.startswith("node") and name[4:].isdigit()
            for stage in plan.stages
            for name in stage.layers
        )


def cut_graph(captured: CapturedGraph, stage_layers: Sequence[Sequence[str]]) -> StageCut:
    """Work out each stage's nodes and each boundary's values from a layer assignment.

    Args:
        captured: The traced model.
        stage_layers: Layer (fx node) names of each stage, stages in pipeline order.

    Raises:
        PlanError: A layer is unknown, missing or in two stages, or reads from a later stage.
    """
    nodes = list(captured.module.graph.nodes)
    layer_names = [n.name for n in nodes if n.op in _LAYER_OPS]
    stage_of: dict[str, int] = {}
    for s, names in enumerate(stage_layers):
        for name in names:
            if name in stage_of:
                raise PlanError(
                    f"layer {name!r} is in stage {stage_of[name]} and stage {s}; re-plan"
                )
            stage_of[name] = s
    unknown = sorted(set(stage_of) - set(layer_names))
    if unknown:
        raise PlanError(
            f"the plan names layers the model lacks ({', '.join(unknown[:3])}); the plan was made "
            "for another model or other --leaf-modules: re-profile and re-plan"
        )
    missing = [name for name in layer_names if name not in stage_of]
    if missing:
        raise PlanError(
            f"{len(missing)} layers of the model are in no stage of the plan (first: {missing[0]}); "
            "the plan was made for another model: re-profile and re-plan"
        )
    last = len(stage_layers) - 1
    inputs = tuple(n.name for n in nodes if n.op == "placeholder")
    produced = {name: 0 for name in inputs} | stage_of
    consumed: dict[str, int] = {}
    for node in nodes:
        if node.op == "placeholder":
            continue
        at = last if node.op == "output" else stage_of[node.name]
        for source in node.all_input_nodes:
            if produced[source.name] > at:
                raise PlanError(
                    f"layer {node.name} (stage {at}) reads {source.name} from the later stage "
                    f"{produced[source.name]}; stages must follow the graph: re-plan"
                )
            consumed[source.name] = max(consumed.get(source.name, at), at)
    order = [n.name for n in nodes if n.name in produced]
    boundaries = tuple(
        tuple(v for v in order if produced[v] <= s < consumed.get(v, -1)) for s in range(last)
    )
    stages = tuple(tuple(n for n in layer_names if stage_of[n] == s) for s in range(last + 1))
    return StageCut(inputs=inputs, stages=stages, boundaries=boundaries)


def build_stage_module(captured: CapturedGraph, cut: StageCut, stage: int) -> fx.GraphModule:
    """The submodule of one stage: ``module(*stage_inputs) -> tuple(stage_outputs)``.

    The last stage returns the model's output instead. Parameters are the model's own objects
    (not copies), under their original qualified names.
    """
    source = captured.module.graph
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    if stage == 0:
        for node in source.nodes:
            if node.op == "placeholder":
                env[node.name] = graph.node_copy(node)
    else:
        for name in cut.stage_inputs(stage):
            env[name] = graph.placeholder(name)
    members = set(cut.stages[stage])
    for node in source.nodes:
        if node.name in members:
            env[node.name] = graph.node_copy(node, lambda n: env[n.name])
    if stage == cut.num_stages - 1:
        (out,) = [n for n in source.nodes if n.op == "output"]
        graph.node_copy(out, lambda n: env[n.name])
    else:
        graph.output(tuple(env[name] for name in cut.stage_outputs(stage)))
    graph.lint()
    return fx.GraphModule(captured.module, graph, f"Stage{stage}")


def release_other_stages(model: torch.nn.Module, keep: torch.nn.Module | None) -> int:
    """Free the memory of every parameter and buffer of ``model`` that ``keep`` does not use.

    Every rank builds the whole model (same seed, same weights) and keeps one stage; without
    this the other stages' weights stay allocated for the whole run, and a rank holds the whole
    model instead of the stage the plan budgeted. The tensors are emptied in place (shapes
    become ``(0,)``), so ``model`` must not run again. Returns the bytes released.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> release_other_stages(net, net[1]), net[0].weight.shape, net[1].weight.shape
        (80, torch.Size([0]), torch.Size([2, 4]))
    """
    kept = set()
    if keep is not None:
        kept = {id(t) for t in (*keep.parameters(), *keep.buffers())}
    released = 0
    seen: set[int] = set()
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if id(t) in kept or id(t) in seen:
                continue
            seen.add(id(t))
            released += t.numel() * t.element_size()
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return released


def shared_parameters(captured: CapturedGraph, cut: StageCut) -> tuple[SharedParameter, ...]:
    """Parameters used by more than one stage, in a deterministic order.

    Every rank computes the same answer from the plan and the model, so it can drive the
    creation of process groups (which all ranks must do in the same order).
    """
    root = captured.module
    nodes = {n.name: n for n in root.graph.nodes}
    where: dict[int, dict[int, str]] = {}
    first_seen: dict[int, int] = {}
    for s, names in enumerate(cut.stages):
        for name in names:
            for qualified, param in _node_parameters(root, nodes[name]):
                where.setdefault(id(param), {}).setdefault(s, qualified)
                first_seen.setdefault(id(param), len(first_seen))
    shared = [
        SharedParameter(stages=tuple(sorted(held)), names=tuple(held[s] for s in sorted(held)))
        for key, held in sorted(where.items(), key=lambda item: first_seen[item[0]])
        if len(held) > 1
    ]
    return tuple(shared)


def _node_parameters(root: torch.nn.Module, node: fx.Node) -> list[tuple[str, torch.nn.Parameter]]:
    target = str(node.target)
    if node.op == "call_module":
        return list(root.get_submodule(target).named_parameters(prefix=target))
    if node.op == "get_attr":
        value = _resolve(root, target)
        if isinstance(value, torch.nn.Parameter):
            return [(target, value)]
        if isinstance(value, torch.nn.Module):
            return list(value.named_parameters(prefix=target))
    return []


def _resolve(root: torch.nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def propagate(captured: CapturedGraph, inputs: Sequence[Any]) -> dict[str, Any]:
    """The value of every placeholder and layer for one microbatch, without real compute.

    Runs the whole graph under torch's fake tensor mode (shapes, dtypes and ``requires_grad``
    only, no memory); falls back to a real forward for models with ops fake mode cannot run.
    Gradient mode is on, so ``requires_grad`` says which values carry gradients. The model's
    buffers (BatchNorm statistics) are left as they were.
    """
    buffers = [(b, b.detach().clone()) for b in captured.module.buffers()]
    try:
        return _propagate(captured, inputs)
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)


def _propagate(captured: CapturedGraph, inputs: Sequence[Any]) -> dict[str, Any]:
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
            return _Recorder(captured.module).record(fake)
    except Exception:  # fake mode lacks some ops and data-dependent shapes: measure for real
        state = torch.get_rng_state()
        try:
            return _Recorder(captured.module).record(list(inputs))
        finally:
            torch.set_rng_state(state)


class _Recorder(fx.Interpreter):
    """An fx interpreter that keeps every node's value."""

    def record(self, inputs: list[Any]) -> dict[str, Any]:
        self.values: dict[str, Any] = {}
        with torch.enable_grad():
            self.run(*inputs)
        return self.values

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.op != "output":
            self.values[n.name] = value
        return value
