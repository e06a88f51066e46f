"""Executing a plan on torch.distributed: stages, schedules, communication, launch.

``plan run PLAN.json`` starts one local process per rank; ``torchrun ... -m planner.runtime
PLAN.json`` runs across machines. Modules, in data-flow order: :mod:`~planner.runtime.stage`
(cut the model), :mod:`~planner.runtime.comm` (peers, metadata, transfers, gradient sync),
:mod:`~planner.runtime.executors` (run the operation lists), :mod:`~planner.runtime.worker`
(one rank's set-up), :mod:`~planner.runtime.loops` (the training loops),
:mod:`~planner.runtime.pipedream` (asynchronous 1F1B with weight stashing),
:mod:`~planner.runtime.checkpoint`, :mod:`~planner.runtime.launch` (local processes),
:mod:`~planner.runtime.report` (the JSON report), :mod:`~planner.runtime.compare` (predicted
vs measured) and :mod:`~planner.runtime.calibrate` (rescaling a profile from a report).

Example:
    >>> from planner.runtime import RunConfig
    >>> RunConfig(plan_path="plan.json", steps=5).report_file.name
    'plan.report.json'
"""

from planner.runtime.calibrate import Calibration, calibrate, calibration_of
from planner.runtime.comm import BoundaryMeta, Placement, TensorMeta
from planner.runtime.compare import compare_run
from planner.runtime.config import Backend, RunConfig, RunError
from planner.runtime.executors import FlushSchedule, StageExecutor
from planner.runtime.launch import LaunchResult, launch_local
from planner.runtime.pipedream import PipeDreamSchedule, WeightStash
from planner.runtime.report import Comparison, RankStats, RunReport, StageStats, StepStats
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
    "Calibration",
    "Comparison",
    "DistEnv",
    "FlushSchedule",
    "LaunchResult",
    "PipeDreamSchedule",
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
    "WeightStash",
    "build_stage_module",
    "calibrate",
    "calibration_of",
    "capture_for_plan",
    "compare_run",
    "cut_graph",
    "launch_local",
    "load_spec",
    "prepare",
    "train",
]
