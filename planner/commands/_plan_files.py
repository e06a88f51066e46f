"""Finding and checking the profile a plan was made from."""

from __future__ import annotations

from pathlib import Path

from planner.errors import PlanError
from planner.plan import Plan, file_sha256
from planner.profile.format import Profile

__all__ = ["load_plan_and_profile", "resolve_profile_path"]


def resolve_profile_path(plan: Plan, plan_path: str | Path, override: str | None = None) -> Path:
    """The profile file: ``override``, else the plan's recorded path as given, then next to the plan."""
    if override is not None:
        return Path(override)
    recorded = Path(plan.profile.path)
    candidates = [recorded, Path(plan_path).parent / recorded, Path(plan_path).parent / recorded.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PlanError(
        f"cannot find the plan's profile {plan.profile.path}; pass it with --profile FILE"
    )


def load_plan_and_profile(plan_path: str, override: str | None = None) -> tuple[Plan, Profile]:
    """Load a plan and its profile and check that they belong together."""
    plan = Plan.load(plan_path)
    path = resolve_profile_path(plan, plan_path, override)
    profile = Profile.load(path)
    plan.check_profile(profile, file_sha256(path))
    return plan, profile
