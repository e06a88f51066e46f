"""Writing a plan in the forms other pipeline systems take, saying what each cannot express.

- ``torch-pipelining``: a ``split_spec`` for ``torch.distributed.pipelining.pipeline`` (module
  names mapped to ``SplitPoint.BEGINNING``), one split per stage boundary.
- ``deepspeed``: DeepSpeed ``PipelineModule``'s ``parts`` (stage boundaries over the layer list).
- ``pipedream``: PipeDream's stage-annotated graph (``-- stage_id=K`` on each node line) and its
  runtime configuration (``module_to_stage_map``, ``stage_to_rank_map``).

Example:
    >>> exported = export_plan(plan, profile, ExportFormat.DEEPSPEED)   # doctest: +SKIP
    >>> exported.notes                                                   # doctest: +SKIP
    ['DeepSpeed runs every stage on the same number of devices; ...']
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from planner.errors import PlanError
from planner.plan import Plan
from planner.profile.format import Profile
from planner.schedules import Schedule

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


def export_plan(plan: Plan, profile: Profile, fmt: ExportFormat) -> ExportedPlan:
    """Translate ``plan`` (checked against ``profile``) into ``fmt``."""
    plan.check_profile(profile)
    stages = plan.stage_layer_indices(profile)
    notes: list[str] = []
    contiguous = _contiguous(stages)
    if fmt is ExportFormat.TORCH_PIPELINING:
        return _torch_pipelining(plan, profile, stages, contiguous, notes)
    if fmt is ExportFormat.DEEPSPEED:
        return _deepspeed(plan, profile, stages, contiguous, notes)
    return _pipedream(plan, profile, stages)


def _contiguous(stages: list[list[int]]) -> bool:
    order = [i for stage in stages for i in sorted(stage)]
    return order == list(range(len(order)))


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
    plan: Plan, profile: Profile, stages: list[list[int]], contiguous: bool, notes: list[str]
) -> ExportedPlan:
    split_spec: dict[str, str] = {}
    for s, stage in enumerate(stages[1:], start=1):
        first = profile.layers[min(stage)]
        if _is_module(first.op) and first.target:
            split_spec[first.target] = "BEGINNING"
        else:
            notes.append(
                f"stage {s} begins at {first.name} ({first.op}), not a submodule: put "
                "torch.distributed.pipelining.pipe_split() before it in forward()"
            )
    if not contiguous:
        notes.append(
            "some stages are not contiguous in program order; torch.distributed."
            "pipelining splits the traced program in order, so it cannot express them"
        )
    if plan.schedule is Schedule.PIPEDREAM:
        notes.append(
            "torch.distributed.pipelining has no asynchronous PipeDream schedule; "
            "Schedule1F1B is the closest (with a flush)"
        )
    note = _replication_note(plan, "torch.distributed.pipelining")
    if note:
        notes.append(note)
    schedule = {"gpipe": "ScheduleGPipe"}.get(str(plan.schedule), "Schedule1F1B")
    doc = {
        "format": "torch-pipelining",
        "split_spec": split_spec,
        "num_stages": len(stages),
        "microbatches": plan.microbatches,
        "schedule": schedule,
        "usage": "pipeline(model, mb_args=..., split_spec={name: SplitPoint.BEGINNING for name in "
        "split_spec}); then " + schedule + "(stage, n_microbatches=microbatches, loss_fn=...)",
        "notes": notes,
    }
    return ExportedPlan(text=json.dumps(doc, indent=1) + "\n", companions={}, notes=tuple(notes))


def _deepspeed(
    plan: Plan, profile: Profile, stages: list[list[int]], contiguous: bool, notes: list[str]
) -> ExportedPlan:
    if not contiguous:
        raise PlanError(
            "DeepSpeed's parts are ranges of the layer list, but this plan's stages are not "
            "contiguous in the profile's order; re-plan with a straight order or export torch-pipelining"
        )
    parts = [0]
    for stage in stages:
        parts.append(parts[-1] + len(stage))
    note = _replication_note(plan, "DeepSpeed")
    if note:
        notes.append(note)
    if plan.schedule is not Schedule.ONE_F_ONE_B:
        notes.append(f"DeepSpeed always runs 1F1B with a flush; this plan assumed {plan.schedule}")
    notes.append(
        "parts index the profile's layers in order; build PipelineModule(layers=...) from "
        "the same layer list and set its parts to these boundaries (partition_method "
        "computes them otherwise)"
    )
    doc = {
        "format": "deepspeed",
        "num_stages": len(stages),
        "parts": parts,
        "layers": [layer.name for layer in profile.layers],
        "micro_batch_size": plan.microbatch_size,
        "gradient_accumulation_steps": plan.microbatches,
        "notes": notes,
    }
    return ExportedPlan(text=json.dumps(doc, indent=1) + "\n", companions={}, notes=tuple(notes))


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


def _is_module(op: str) -> bool:
    return "(" in op and not op.startswith((".", "getattr"))
