"""A plan as a DeepSpeed ``PipelineModule`` that DeepSpeed (0.19.8) partitions exactly as planned.

DeepSpeed's ``PipelineModule(layers=..., partition_method=...)`` computes its own boundaries
(``uniform``, ``parameters``, ``type:REGEX``; ``profile`` raises NotImplementedError) and has no
argument to set them. So the layer list has **one layer per planned stage**: a
``LayerSpec(PlannedStage, plan_path, s)`` that builds stage ``s`` of the plan (the same fx stage
cut as ``plan run``), and ``partition_method="type:PlannedStage"`` gives each stage one marked
layer, so DeepSpeed's balanced partition puts layer ``s`` on pipeline stage ``s``. Values that skip
stages are relayed, as in our runtime: each stage takes one tuple of tensors and returns the next.

``LayerSpec`` builds a layer only on the ranks of its stage. Every stage builds the plan's model
from the plan's seed (weights as ``plan run`` has them) and keeps its part.

Example (the companion file ``plan export --format deepspeed`` writes does this)::

    from deepspeed.pipe import LayerSpec, PipelineModule
    from planner.export_deepspeed import PlannedStage, planned_loss
    net = PipelineModule(layers=[LayerSpec(PlannedStage, "plan.json", s) for s in range(2)],
                         num_stages=2, loss_fn=planned_loss("plan.json"),
                         partition_method="type:PlannedStage")
"""

from __future__ import annotations

from functools import cache
from typing import Any

from torch import nn

from planner.plan import Plan

__all__ = ["PlannedStage", "deepspeed_source", "planned_loss"]


@cache
def _prepared(plan_path: str, model: str | None, seed: int) -> Any:
    """The plan's model, checked and cut (once per process)."""
    from planner.models.registry import check_trusted, is_builtin
    from planner.runtime.comm import BoundaryMeta
    from planner.runtime.data import microbatch
    from planner.runtime.stage import capture_for_plan, cut_graph, propagate
    from planner.runtime.worker import load_spec

    plan = Plan.load(plan_path)
    check_trusted(plan.profile.model, named=model)
    spec = load_spec(plan, seed=seed, search_cwd=not is_builtin(plan.profile.model))
    captured = capture_for_plan(plan, spec.module)
    cut = cut_graph(captured, [stage.layers for stage in plan.stages])
    example, _ = microbatch(spec.make_batch(plan.microbatch_size, 0), 0, size=plan.microbatch_size)
    values = propagate(captured, example)
    metas = tuple(BoundaryMeta.from_values(names, values) for names in cut.boundaries)
    return plan, spec, captured, cut, metas


class PlannedStage(nn.Module):
    """Stage ``stage`` of the plan in ``plan_path``, as one DeepSpeed pipeline layer.

    Args:
        plan_path: The plan file.
        stage: Which stage.
        model: The plan's model reference, confirming you trust it when it is your own code
            (``package.module:factory``); built-in models need nothing.
        seed: Seed of the initial weights (``plan run --seed``).
    """

    def __init__(self, plan_path: str, stage: int, model: str | None = None, seed: int = 0):
        super().__init__()
        from planner.runtime.stage import build_stage_module
        from planner.runtime.torch_engine import _FlatStage

        plan, _, captured, cut, metas = _prepared(plan_path, model, seed)
        last = len(plan.stages) - 1
        self.stage = _FlatStage(
            build_stage_module(captured, cut, stage),
            metas[stage - 1] if stage > 0 else None,
            metas[stage] if stage < last else None,
        )

    def forward(self, x: Any) -> Any:
        tensors = x if isinstance(x, tuple) else (x,)
        return self.stage(*tensors)


def planned_loss(plan_path: str, model: str | None = None, seed: int = 0) -> Any:
    """The plan's model's loss function, ``loss(outputs, labels)``."""
    return _prepared(plan_path, model, seed)[1].loss_fn


def deepspeed_source(*, plan_path: str, model: str, num_stages: int, config: dict) -> str:
    """The companion module: ``pipeline_module()`` and ``DS_CONFIG`` for ``deepspeed``."""
    import json

    return _SOURCE.format(
        plan=plan_path,
        model=model,
        stages=num_stages,
        config=json.dumps(config, indent=4).replace("null", "None"),
    )


_SOURCE = '''"""DeepSpeed PipelineModule for {model}: the {stages} stages of {plan}.

Written by `plan export --format deepspeed`. In your training script (under deepspeed/torchrun):

    import deepspeed
    from this_file import DS_CONFIG, pipeline_module
    net = pipeline_module()
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                           config=DS_CONFIG)
    loss = engine.train_batch(data_iter=batches)   # batches of (inputs, labels)

One LayerSpec per planned stage and partition_method="type:PlannedStage": DeepSpeed puts layer s
on pipeline stage s, so the stages are exactly the plan's.
"""

from deepspeed.pipe import LayerSpec, PipelineModule

from planner.export_deepspeed import PlannedStage, planned_loss

PLAN = {plan!r}
MODEL = {model!r}
NUM_STAGES = {stages}
DS_CONFIG = {config}


def pipeline_module(seed: int = 0, **kwargs) -> PipelineModule:
    """The plan as a PipelineModule (kwargs go to PipelineModule, e.g. activation checkpoints)."""
    return PipelineModule(
        layers=[LayerSpec(PlannedStage, PLAN, s, MODEL, seed) for s in range(NUM_STAGES)],
        num_stages=NUM_STAGES,
        loss_fn=planned_loss(PLAN, MODEL, seed),
        partition_method="type:PlannedStage",
        **kwargs,
    )
'''
