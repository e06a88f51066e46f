"""A plan as torch.distributed.pipelining split points that give exactly the plan's stages.

``pipeline(model, mb_args, split_spec=...)`` splits at *every* call of each named module, so a
module called several times (ResNet's ``layer2.3.relu`` runs three times per block) splits
several times: an 8-stage plan named that way becomes 14 stages. And it splits the program in
execution order, while a plan's stages are downsets of the DAG that may interleave in that order
(ResNet's downsample branch in the stage before its block's last BatchNorm). So the export names
module *calls*: ``(qualified name, call index) -> stage`` for every module call the plan places,
and writes ``split_policy`` for ``pipeline(..., split_policy=...)`` (:func:`policy_source`), which
finds each call in torch.export's graph (its ``nn_module_stack`` has one key per call), orders
the graph stage by stage and puts ``pipe_split`` between stages. Operations between module
calls (adds, reshapes) go to the earliest stage their inputs allow.

When every boundary falls at a module called once and the stages are contiguous in execution
order (transformer blocks, Hugging Face layers), :func:`split_spec` also gives the familiar
``{fqn: "BEGINNING" | "END"}``, which yields the same stages.

For transformer models the export also gives torchtitan's ``module_fqns_per_model_part``: each
stage's modules, whole blocks only (:func:`torchtitan_parts`).

Example:
    >>> stages = module_stages(captured, [s.layers for s in plan.stages])   # doctest: +SKIP
    >>> stages[11]                                                         # doctest: +SKIP
    ('layer1.0.bn3', 0, 1)
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from planner.errors import PlanError
from planner.profile.capture import CapturedGraph

__all__ = [
    "SplitPointAt",
    "module_stages",
    "policy_source",
    "split_points",
    "split_spec",
    "torchtitan_parts",
]

_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")


@dataclass(frozen=True, kw_only=True)
class SplitPointAt:
    """Where one stage boundary goes: before or after one call of one module.

    Attributes:
        where: ``"before"`` the call or ``"after"`` it.
        module: The module's qualified name in the user's model.
        call: Which call of the module (0 for the first), in execution order.
        calls: How many times the module is called in one forward.
    """

    where: str
    module: str
    call: int
    calls: int


def _module_calls(
    captured: CapturedGraph, fqns: Mapping[str, str]
) -> dict[int, tuple[str, int, int]]:
    """Layer index -> (module path, call index, total calls) for every call_module layer."""
    counts: dict[str, int] = {}
    calls: dict[int, tuple[str, int]] = {}
    for i, layer in enumerate(captured.layers):
        if layer.node.op != "call_module":
            continue
        path = fqns.get(str(layer.node.target), str(layer.node.target))
        calls[i] = (path, counts.get(path, 0))
        counts[path] = counts.get(path, 0) + 1
    return {i: (path, k, counts[path]) for i, (path, k) in calls.items()}


def _is_getitem(captured: CapturedGraph, index: int) -> bool:
    node = captured.layers[index].node
    return node.op == "call_function" and node.target is operator.getitem


def split_points(
    captured: CapturedGraph,
    stage_layers: Sequence[Sequence[str]],
    fqns: Mapping[str, str] | None = None,
) -> list[SplitPointAt]:
    """One split point per stage boundary, in order.

    Args:
        captured: The model as the planner captured it.
        stage_layers: Each stage's layer names.
        fqns: Layer module name -> the user's module path (Hugging Face models, see
            :func:`planner.profile.export_capture.layer_fqns`); default: the names themselves.

    Raises:
        PlanError: Stages are not contiguous in execution order, or a boundary lies between
            two layers neither of which is a module call.
    """
    index = {layer.name: i for i, layer in enumerate(captured.layers)}
    stages = [sorted(index[name] for name in names) for names in stage_layers]
    order = [i for stage in stages for i in stage]
    if order != sorted(order):
        s = next(s for s in range(1, len(stages)) if min(stages[s]) < max(stages[s - 1]))
        raise PlanError(
            f"stage {s} starts at layer {captured.layers[min(stages[s])].name}, before stage "
            f"{s - 1} ends, in execution order; torch.distributed.pipelining splits the program "
            "in order, so it cannot express this plan: run it with plan run --engine ours, or "
            "re-plan with --straight for a linear order"
        )
    calls = _module_calls(captured, fqns or {})
    points = []
    for s in range(1, len(stages)):
        first = next((i for i in stages[s] if not _is_getitem(captured, i)), stages[s][0])
        last = next(
            (i for i in reversed(stages[s - 1]) if not _is_getitem(captured, i)), stages[s - 1][-1]
        )
        if first in calls:
            path, k, total = calls[first]
            points.append(SplitPointAt(where="before", module=path, call=k, calls=total))
        elif last in calls:
            path, k, total = calls[last]
            points.append(SplitPointAt(where="after", module=path, call=k, calls=total))
        else:
            raise PlanError(
                f"stage {s} begins at {captured.layers[first].name} right after "
                f"{captured.layers[last].name}; neither is a module call, so no split point "
                "can name this boundary: re-plan, or put torch.distributed.pipelining.pipe_split() "
                "between them in your forward()"
            )
    return points


def split_spec(points: Sequence[SplitPointAt]) -> dict[str, str] | None:
    """``{fqn: "BEGINNING" | "END"}`` when every point's module is called once, else None."""
    if any(p.calls != 1 for p in points):
        return None
    return {p.module: "BEGINNING" if p.where == "before" else "END" for p in points}


def torchtitan_parts(
    captured: CapturedGraph,
    stage_layers: Sequence[Sequence[str]],
    fqns: Mapping[str, str] | None = None,
) -> list[list[str]] | None:
    """torchtitan's ``module_fqns_per_model_part``: each stage's top modules, whole blocks.

    None when the model has no numbered blocks (not a transformer) or a block or module is
    split across stages (torchtitan assigns whole modules).
    """
    fqns = fqns or {}
    calls = _module_calls(captured, fqns)
    index = {layer.name: i for i, layer in enumerate(captured.layers)}
    parts: list[list[str]] = []
    owner: dict[str, int] = {}
    any_block = False
    for s, names in enumerate(stage_layers):
        part: list[str] = []
        for i in sorted(index[name] for name in names):
            if i not in calls:
                continue
            path = calls[i][0]
            match = _BLOCK.match(path)
            top = match.group(1) if match else path
            any_block = any_block or match is not None
            if owner.setdefault(top, s) != s:
                return None
            if top not in part:
                part.append(top)
        parts.append(part)
    return parts if any_block else None


def module_stages(
    captured: CapturedGraph,
    stage_layers: Sequence[Sequence[str]],
    fqns: Mapping[str, str] | None = None,
) -> list[tuple[str, int, int]]:
    """(module path, call index, stage) of every module-call layer, in execution order."""
    stage_of = {name: s for s, names in enumerate(stage_layers) for name in names}
    calls = _module_calls(captured, fqns or {})
    return [
        (path, k, stage_of[captured.layers[i].name]) for i, (path, k, _) in sorted(calls.items())
    ]


def policy_source(
    stages: Sequence[tuple[str, int, int]], *, num_stages: int, model: str, plan_path: str
) -> str:
    """A self-contained Python module (torch only) defining ``split_policy`` for a plan."""
    lines = "\n".join(f"    ({m!r}, {k}): {s}," for m, k, s in stages)
    return _POLICY.format(model=model, plan=plan_path, stages=num_stages, table=lines)


_POLICY = '''"""Split {model} into the {stages} stages of {plan} for torch.distributed.pipelining.

Written by `plan export --format torch-pipelining`. In your training script:

    from torch.distributed.pipelining import pipeline
    from this_file import split_policy
    pipe = pipeline(model, mb_args=(example_microbatch,), split_policy=split_policy)
    stage = pipe.build_stage(rank, device)      # then Schedule1F1B / ScheduleGPipe as usual

(Hugging Face models: also pass mb_kwargs={{"use_cache": False}}.) Every module call the plan
placed runs in its stage, whatever the program order (torch.export records each call in
``nn_module_stack``); operations between module calls (adds, reshapes) run in the earliest
stage their inputs allow, and stages are laid out one after the other with pipe_split between.
"""

import torch
import torch.distributed.pipelining  # noqa: F401  (registers torch.ops.pippy._pipe_split)

NUM_STAGES = {stages}
# (module qualified name, which call of it: 0 = first) -> stage
STAGE_OF_CALL = {{
{table}
}}


def split_policy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Order the exported graph stage by stage and put pipe_split between stages."""
    key_call: dict = {{}}
    stage: dict = {{}}
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op == "output":
            continue
        placed = None
        for key, (path, _) in (node.meta.get("nn_module_stack") or {{}}).items():
            if key not in key_call:  # each call of a module has its own stack key
                key_call[key] = (path, sum(1 for p, _ in key_call.values() if p == path))
            placed = STAGE_OF_CALL.get(key_call[key], placed)
        earliest = max((stage[n] for n in node.all_input_nodes if n in stage), default=-1)
        if placed is not None and placed < earliest:
            raise ValueError(f"{{node.name}} (stage {{placed}}) reads from stage {{earliest}}")
        stage[node] = earliest if placed is None else placed
    missing = set(STAGE_OF_CALL.values()) - set(stage.values())
    if len(set(STAGE_OF_CALL) - set(key_call.values())) or missing:
        raise ValueError("this split policy was written for another model: module calls differ")
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    env: dict = {{}}
    current = -1
    position = {{n: i for i, n in enumerate(nodes)}}
    for node in sorted(stage, key=lambda n: (stage[n], position[n])):
        if node.op != "placeholder" and stage[node] > max(current, 0):
            for _ in range(stage[node] - max(current, 0)):
                graph.call_function(torch.ops.pippy._pipe_split.default, ())
        if node.op != "placeholder":
            current = max(current, stage[node])
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.node_copy(nodes[-1], lambda n: env[n])
    gm.graph = graph
    gm.recompile()
    return gm
'''
