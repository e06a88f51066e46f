"""Executing a plan on torch.distributed: stages, schedules, communication, launch.

``plan run PLAN.json`` starts one local process per rank; ``torchrun ... -m planner.runtime
PLAN.json`` runs across machines. Modules, in data-flow order: :mod:`~planner.runtime.stage`
(cut the model), :mod:`~planner.runtime.comm` (peers, metadata, transfers, gradient sync),
:mod:`~planner.runtime.schedules` (run the operation lists), :mod:`~planner.runtime.worker`
(one rank's training loop), :mod:`~planner.runtime.launch` (local processes),
:mod:`~planner.runtime.report` (the JSON report).

Example:
    >>> from planner.runtime import RunConfig
    >>> RunConfig(plan_path="plan.json", steps=5).report_file.name
    'plan.report.json'
"""

from planner.runtime.comm import BoundaryMeta, Placement, TensorMeta
from planner.runtime.config import Backend, RunConfig, RunError
from planner.runtime.launch import LaunchResult, launch_local
from planner.runtime.report import RankStats, RunReport, StageStats, StepStats
from planner.runtime.schedules import FlushSchedule, StageExecutor
from planner.runtime.stage import (
    SharedParameter,
    StageCut,
    build_stage_module,
    capture_for_plan,
    cut_graph,
)
from planner.runtime.worker import DistEnv, RankResult, load_spec, prepare, train

__all__ = [
    "Backend",
    "BoundaryMeta",
    "DistEnv",
    "FlushSchedule",
    "LaunchResult",
    "Placement",
    "RankResult",
    "RankStats",
    "RunConfig",
    "RunError",
    "RunReport",
    "SharedParameter",
    "StageCut",
    "StageExecutor",
    "StageStats",
    "StepStats",
    "TensorMeta",
    "build_stage_module",
    "capture_for_plan",
    "cut_graph",
    "launch_local",
    "load_spec",
    "prepare",
    "train",
]
