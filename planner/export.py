"""Writing a plan in the forms other pipeline systems take, saying what each cannot express.

- ``torch-pipelining``: for ``torch.distributed.pipelining.pipeline``, a ``split_policy``
  (companion ``.py``) that gives exactly the plan's stages, a ``split_spec`` where module names
  suffice, and torchtitan's ``module_fqns_per_model_part`` for transformers
  (:mod:`planner.export_torch`); the schedule class running the plan's schedule, which stages
  each rank builds (``stage_to_rank``: loop order, V order for ``zbv``), and every rank's action
  list as torch's schedule CSV (companion ``.csv``, :mod:`planner.schedule_export`).
- ``deepspeed``: a ``PipelineModule`` with one ``LayerSpec`` per stage that DeepSpeed partitions
  as planned, and its config (companion ``.py``; :mod:`planner.export_deepspeed`).
- ``pipedream``: PipeDream's stage-annotated graph (``-- stage_id=K`` on each node line) and its
  runtime configuration (``module_to_stage_map``, ``stage_to_rank_map``).

The first two name the model's modules, so they need the model (``model=``); a plan made from
an imported PipeDream profile has none, and the error names the command that profiles it.

Example:
    >>> exported = export_plan(plan, profile, ExportFormat.DEEPSPEED, model=spec)  # doctest: +SKIP
    >>> sorted(exported.companions)                                                 # doctest: +SKIP
    ['.py']
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from planner.errors import PlanError
from planner.plan import Plan
from planner.profile.format import Profile
from planner.schedules import Schedule

if TYPE_CHECKING:
    from planner.models.registry import ModelSpec
    from planner.profile.capture import CapturedGraph

__all__ = ["ExportFormat", "ExportedPlan", "export_plan"]


class ExportFormat(StrEnum):
    TORCH_PIPELINING = "torch-pipelining"
    DEEPSPEED = "deepspeed"
    PIPEDREAM = "pipedream"


@dataclass(frozen=True, kw_only=True)
class ExportedPlan:
    """What to write: the main text, optional companion files by suffix, and caveats."""

    text: str
    companions: dict[str, str]
    notes: tuple[str, ...]


def export_plan(
    plan: Plan,
    profile: Profile,
    fmt: ExportFormat,
    *,
    model: ModelSpec | None = None,
    plan_path: str | None = None,
) -> ExportedPlan:
    """Translate ``plan`` (checked against ``profile``) into ``fmt``.

    ``model`` is the plan's model (``planner.models.load_model(profile.model, ...)``); the
    torch-pipelining and DeepSpeed exports name its modules, so they need it; the DeepSpeed
    export's companion file loads the plan from ``plan_path``.
    """
    plan.check_profile(profile)
    stages = plan.stage_layer_indices(profile)
    notes: list[str] = []
    if fmt is ExportFormat.TORCH_PIPELINING:
        return _torch_pipelining(plan, profile, model, notes)
    if fmt is ExportFormat.DEEPSPEED:
        return _deepspeed(plan, profile, model, plan_path, notes)
    return _pipedream(plan, profile, stages)


def _replication_note(plan: Plan, system: str) -> str | None:
    replicas = {s.replicas for s in plan.stages}
    if len(replicas) > 1:
        return (
            f"{system} runs every stage on the same number of devices; this plan replicates stages "
            f"{'-'.join(str(s.replicas) for s in plan.stages)}, which it cannot express"
        )
    (count,) = replicas
    if count > 1:
        return (
            f"{system}: run {count} data-parallel copies of the pipeline to match the replication"
        )
    return None


def _torch_pipelining(
    plan: Plan, profile: Profile, model: ModelSpec | None, notes: list[str]
) -> ExportedPlan:
    from planner.export_torch import (
        module_stages,
        policy_source,
        split_points,
        split_spec,
        torchtitan_parts,
    )

    captured, fqns = _captured(plan, profile, model, "torch-pipelining")
    stage_layers = [stage.layers for stage in plan.stages]
    try:
        spec = split_spec(split_points(captured, stage_layers, fqns))
        if spec is None:
            notes.append(
                "a module at a stage boundary is called more than once, and split_spec splits "
                "at every call: use split_policy from the companion .py"
            )
    except PlanError as exc:
        spec = None
        reason = str(exc).split(";")[0]
        notes.append(
            f"split_spec is null ({reason}); use split_policy from the companion .py, which "
            "places every module call in its planned stage"
        )
    if plan.schedule is Schedule.PIPEDREAM:
        notes.append(
            "torch.distributed.pipelining has no asynchronous PipeDream schedule; "
            "Schedule1F1B is the closest (with a flush)"
        )
    note = _replication_note(plan, "torch.distributed.pipelining")
    if note:
        notes.append(note)
    torch_doc, csv_text = _torch_schedule(plan, notes)
    schedule = str(torch_doc["schedule"])
    hf = bool(fqns)
    if plan.chunks > 1:
        build = (
            f"stages = [pipe.build_stage(s, device) for s in stages_of_rank[rank]]; "
            f"{schedule}(stages, "
        )
    else:
        build = f"stage = pipe.build_stage(rank, device); {schedule}(stage, "
    doc: dict[str, object] = {
        "format": "torch-pipelining",
        "model": profile.model,
        "num_stages": len(plan.stages),
        "split_spec": spec,
        "microbatches": plan.microbatches,
        "microbatch_size": plan.microbatch_size,
        **torch_doc,
        "mb_kwargs": {"use_cache": False} if hf else None,
        "usage": "pipe = pipeline(model, mb_args=(microbatch,), split_policy=split_policy) with "
        "split_policy from the companion .py (or split_spec={fqn: SplitPoint[v]} when split_spec "
        f"is not null); {build}n_microbatches=microbatches, loss_fn=...)"
        + (
            "; or load the companion .csv (every rank's actions) with "
            "_PipelineScheduleRuntime(...)._load_csv(path)"
            if csv_text
            else ""
        ),
    }
    parts = torchtitan_parts(captured, stage_layers, fqns)
    if parts is not None:
        doc["torchtitan"] = {
            "parallelism": {
                "pipeline_parallel_degree": len(plan.stages) // plan.chunks,
                "pipeline_parallel_schedule": schedule.removeprefix("Schedule"),
                "pipeline_parallel_microbatch_size": plan.microbatch_size,
                "module_fqns_per_model_part": parts,
            }
        }
    doc["notes"] = notes
    source = policy_source(
        module_stages(captured, stage_layers, fqns),
        num_stages=len(plan.stages),
        model=profile.model,
        plan_path=f"a plan from {Path(plan.profile.path).name}",
    )
    return ExportedPlan(
        text=json.dumps(doc, indent=1) + "\n",
        companions={".py": source} | ({".csv": csv_text} if csv_text else {}),
        notes=tuple(notes),
    )


def _torch_schedule(plan: Plan, notes: list[str]) -> tuple[dict[str, object], str]:
    """The plan's schedule in torch's terms (class, ranks, layout) and its per-rank action lists
    as torch's schedule CSV ("" for ``pipedream``, which torch cannot run)."""
    from planner.schedule_export import (
        TORCH_SCHEDULE_CLASSES,
        schedule_csv,
        torch_schedule,
    )

    ranks = len(plan.stages) // plan.chunks
    if plan.schedule is Schedule.PIPEDREAM:
        layout = tuple(range(ranks))
        return {
            "schedule": TORCH_SCHEDULE_CLASSES[Schedule.ONE_F_ONE_B],
            "pipeline_ranks": ranks,
            "stage_to_rank": list(layout),
            "stages_of_rank": [[r] for r in layout],
        }, ""
    try:
        spec = torch_schedule(
            plan.schedule, ranks=ranks, microbatches=plan.microbatches, chunks=plan.chunks
        )
        layout = spec.stage_to_rank
    except PlanError as exc:  # Schedule1F1B refuses fewer microbatches than stages
        notes.append(str(exc))
        layout = tuple(range(ranks))
    doc: dict[str, object] = {
        "schedule": TORCH_SCHEDULE_CLASSES[plan.schedule],
        "pipeline_ranks": ranks,
        "stage_to_rank": list(layout),
        "stages_of_rank": [[s for s, r in enumerate(layout) if r == rank] for rank in range(ranks)],
    }
    csv_text = schedule_csv(
        plan.schedule, ranks=ranks, microbatches=plan.microbatches, chunks=plan.chunks
    )
    return doc, csv_text


def _captured(
    plan: Plan, profile: Profile, model: ModelSpec | None, fmt: str
) -> tuple[CapturedGraph, dict[str, str]]:
    """The plan's model captured as the profiler did, checked against the profile."""
    from planner.profile.capture import capture
    from planner.profile.export_capture import layer_fqns

    if model is None:
        if profile.source == "pipedream":
            raise PlanError(
                f"the {fmt} export names the model's modules, but this plan's profile was "
                f"imported from PipeDream and has no model; profile the real model "
                f"(plan profile --model {profile.model.split('/')[-1] or 'NAME'} --batch-size "
                f"{profile.batch_size} -o profile.json), re-plan, then export"
            )
        raise PlanError(f"the {fmt} export needs the plan's model; build it and pass it")
    captured = capture(model.module, profile.leaf_modules)
    if profile.graph_hash is not None and captured.graph_hash != profile.graph_hash:
        raise PlanError(
            f"model {profile.model!r} captures to graph hash {captured.graph_hash} but the "
            f"plan's profile has {profile.graph_hash}; the model or its configuration changed "
            "since profiling: re-profile and re-plan"
        )
    return captured, layer_fqns(model.module)


def _deepspeed(
    plan: Plan, profile: Profile, model: ModelSpec | None, plan_path: str | None, notes: list[str]
) -> ExportedPlan:
    from planner.export_deepspeed import deepspeed_source
    from planner.runtime.stage import cut_graph, shared_parameters

    captured, _ = _captured(plan, profile, model, "deepspeed")
    replicas = {stage.replicas for stage in plan.stages}
    if len(replicas) > 1:
        raise PlanError(
            "DeepSpeed runs every stage on the same number of devices; this plan replicates "
            f"stages {'-'.join(str(s.replicas) for s in plan.stages)}: re-plan with --straight, "
            "or train it with plan run"
        )
    (copies,) = replicas
    if plan.microbatches % copies:
        raise PlanError(
            f"DeepSpeed splits the {plan.microbatches} microbatches evenly over {copies} "
            f"data-parallel copies; re-plan with --microbatches a multiple of {copies}"
        )
    shared = shared_parameters(captured, cut_graph(captured, [s.layers for s in plan.stages]))
    if shared:
        raise PlanError(
            f"parameters are shared by stages {list(shared[0].stages)} ({shared[0].names[0]}); "
            "DeepSpeed ties them only through TiedLayerSpec: train this plan with plan run"
        )
    if copies > 1:
        notes.append(f"run on {len(plan.stages) * copies} ranks: {copies} data-parallel copies")
    if plan.schedule is not Schedule.ONE_F_ONE_B:
        notes.append(f"DeepSpeed always runs 1F1B with a flush; this plan assumed {plan.schedule}")
    config = {
        "train_batch_size": plan.minibatch_size,
        "train_micro_batch_size_per_gpu": plan.microbatch_size,
        "gradient_accumulation_steps": plan.microbatches // copies,
        "optimizer": {
            "type": "SGD" if str(plan.optimizer) in ("sgd", "momentum") else "Adam",
            "params": {"lr": 0.01},
        },
        "steps_per_print": 10,
    }
    path = str(Path(plan_path).resolve()) if plan_path else plan.profile.path
    doc = {
        "format": "deepspeed",
        "model": profile.model,
        "num_stages": len(plan.stages),
        "data_parallel_copies": copies,
        "partition_method": "type:PlannedStage",
        "layers": [
            {
                "layer": s,
                "spec": f"LayerSpec(PlannedStage, PLAN, {s})",
                "stage_layers": list(st.layers),
            }
            for s, st in enumerate(plan.stages)
        ],
        "config": config,
        "usage": "pipeline_module() and DS_CONFIG from the companion .py; "
        "deepspeed.initialize(model=..., config=DS_CONFIG); engine.train_batch(data_iter)",
        "notes": notes,
    }
    source = deepspeed_source(
        plan_path=path, model=profile.model, num_stages=len(plan.stages), config=config
    )
    return ExportedPlan(
        text=json.dumps(doc, indent=1) + "\n", companions={".py": source}, notes=tuple(notes)
    )


def _pipedream(plan: Plan, profile: Profile, stages: list[list[int]]) -> ExportedPlan:
    from planner.profile.pipedream import graph_txt

    stage_of = {profile.layers[i].name: s for s, stage in enumerate(stages) for i in stage}
    lines = []
    for line in graph_txt(profile).splitlines():
        if line and not line.startswith("\t"):
            name = line.split(" -- ", 1)[0]
            line = f"{line} -- stage_id={stage_of[name]}"
        lines.append(line)
    notes = []
    if plan.schedule is not Schedule.PIPEDREAM:
        notes.append(
            f"PipeDream's runtime runs its own asynchronous 1F1B; this plan assumed {plan.schedule}"
        )
    conf = {
        # PipeDream generates one module per stage plus the loss, which runs on the last stage.
        "module_to_stage_map": [*range(len(stages)), len(stages) - 1],
        "stage_to_rank_map": {str(s): list(stage.ranks) for s, stage in enumerate(plan.stages)},
    }
    return ExportedPlan(
        text="\n".join(lines) + "\n",
        companions={".conf.json": json.dumps(conf, indent=4) + "\n"},
        notes=tuple(notes),
    )
