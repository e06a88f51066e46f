"""planner: profiler-driven automatic partition planning for pipeline-parallel training.

The data flows profile -> cost model -> optimizer -> plan -> simulate / run. Stable names are
re-exported here; everything else lives in its module.
"""

from planner.errors import (
    InfeasibleError,
    ModelError,
    PlanError,
    PlannerError,
    ProfileError,
    TopologyError,
)
from planner.profile.format import LayerProfile, Profile
from planner.topology import Level, Topology

__version__ = "0.1.0"

__all__ = [
    "InfeasibleError",
    "LayerProfile",
    "Level",
    "ModelError",
    "PlanError",
    "PlannerError",
    "Profile",
    "ProfileError",
    "Topology",
    "TopologyError",
    "__version__",
]
