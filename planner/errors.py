"""Typed errors for input the user can fix.

Every error a user can cause derives from :class:`PlannerError`; the CLI prints its message as one
line on stderr and exits with status 2. Messages say what was wrong and what to do about it.
``assert`` is kept for internal invariants only.
"""

from __future__ import annotations

__all__ = [
    "InfeasibleError",
    "ModelError",
    "PlanError",
    "PlannerError",
    "ProfileError",
    "TopologyError",
]


class PlannerError(Exception):
    """Base class of every error caused by the user's input (exit status 2 from the CLI)."""


class ProfileError(PlannerError):
    """A profile (ours or PipeDream's graph.txt) is missing, malformed or inconsistent."""


class ModelError(PlannerError):
    """A model cannot be found, built or traced."""


class TopologyError(PlannerError):
    """A topology description is invalid."""


class PlanError(PlannerError):
    """A plan file is malformed or does not match its profile or topology."""


class InfeasibleError(PlannerError):
    """No partition satisfies the constraints (usually memory)."""
