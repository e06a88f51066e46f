"""Measuring a model: graph capture, per-layer timing and sizes, and the profile file."""

from planner.profile.format import FORMAT, LayerProfile, Profile, graph_hash

__all__ = ["FORMAT", "LayerProfile", "Profile", "graph_hash"]
