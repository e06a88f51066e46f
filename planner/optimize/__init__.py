"""Choosing stages and replicas: the cost model, the hierarchical DP, and the solvers' contract.

Every solver is ``solve(cost: CostModel) -> Partition`` (see :mod:`planner.optimize.cost`).
"""

from planner.optimize.cost import (
    CostModel,
    CostModelKind,
    DownsetTables,
    SolverOptions,
    allreduce_s,
    boundary_link_level,
    contiguous_ranks,
    in_flight,
    link_s,
    schedule_objective,
)
from planner.optimize.result import Partition, StageAssignment

__all__ = [
    "CostModel",
    "CostModelKind",
    "DownsetTables",
    "Partition",
    "SolverOptions",
    "StageAssignment",
    "allreduce_s",
    "boundary_link_level",
    "contiguous_ranks",
    "in_flight",
    "link_s",
    "schedule_objective",
]
