"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PIPEDREAM_PROFILES = REPO_ROOT.parent / "shared" / "pipedream-profiles"
PIPEDREAM_MODELS = ("alexnet", "gnmt", "resnet18", "resnet50", "vgg16")
# CI sets PLANNER_REQUIRE_SHARED=1 (.ci/run): there a missing ../shared is a failure, not a skip,
# so that tests needing PipeDream's profiles can never pass by silently not running.
REQUIRE_SHARED = os.environ.get("PLANNER_REQUIRE_SHARED") == "1"


def _absent(message: str) -> None:
    if REQUIRE_SHARED:
        pytest.fail(f"{message} (PLANNER_REQUIRE_SHARED=1: required here)")
    pytest.skip(message)


def pipedream_graph(model: str) -> Path:
    """The path of PipeDream's ``graph.txt`` for ``model``; skips the test when it is absent."""
    path = PIPEDREAM_PROFILES / model / "graph.txt"
    if not path.is_file():
        _absent(
            f"PipeDream profile {path} is absent; these tests need the checkout next to "
            "../shared/pipedream-profiles (the msr-fiddle/pipedream profiles)"
        )
    return path


@pytest.fixture
def shared_dir() -> Path:
    """``../shared/pipedream-profiles`` relative to the repository root (skips if absent)."""
    if not PIPEDREAM_PROFILES.is_dir():
        _absent(f"{PIPEDREAM_PROFILES} is absent; these tests need the shared PipeDream profiles")
    return PIPEDREAM_PROFILES
