"""The DP's state space: valid downsets, PipeDream's states included, bounded on branchy graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import pipedream_graph

from planner.optimize.states import MAX_STATES, build_states
from planner.optimize.synthetic import branched_profile, nasnet_profile
from planner.profile import Profile
from planner.profile.pipedream import pipedream_preprocess, read_graph_txt

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
BATCH = {"alexnet": 256, "resnet18": 256, "resnet50": 128, "vgg16": 128, "gnmt": 128}


def _shared(model: str) -> Profile:
    return pipedream_preprocess(
        read_graph_txt(pipedream_graph(model), model=model, batch_size=BATCH[model])
    )


def _rows(masks: np.ndarray) -> set[bytes]:
    return {np.packbits(row).tobytes() for row in masks}


def _check_valid(profile: Profile, space) -> None:
    masks = space.masks
    assert not masks[0].any() and masks[-1].all()
    sizes = masks.sum(axis=1)
    assert (np.diff(sizes) >= 0).all(), "states sorted by size"
    for row in masks:  # every state is down-closed
        for i in np.flatnonzero(row):
            assert all(row[j] for j in profile.layers[i].inputs)
    subset = (masks[:, None, :] <= masks[None, :, :]).all(axis=2) & (
        sizes[:, None] < sizes[None, :]
    )
    if space.kind.startswith("antichain") and space.kind != "antichain-bounded":
        assert not (space.includes & ~subset).any()
    else:
        assert (space.includes == subset).all()


@pytest.mark.parametrize("model", sorted(BATCH))
def test_auto_contains_every_downset_of_pipedreams_antichain_dag(model):
    profile = _shared(model)
    auto = build_states(profile)
    antichain = build_states(profile, "antichain")
    assert antichain.kind == "antichain"
    assert _rows(antichain.masks) <= _rows(auto.masks)
    # small graphs: the whole lattice, so the DP is exact over every partition
    assert auto.complete
    _check_valid(profile, auto)


def test_complete_flag_means_every_downset():
    for seed in range(6):
        profile = branched_profile(14, seed=seed, max_branches=3, max_branch_length=3)
        auto, every = build_states(profile), build_states(profile, "all")
        assert every.complete
        if auto.complete:
            assert _rows(auto.masks) == _rows(every.masks)
        else:
            assert _rows(auto.masks) < _rows(every.masks)
        _check_valid(profile, auto)


@pytest.mark.parametrize("name", ["inception_v3", "googlenet", "nasnet"])
def test_branchy_profiles_are_bounded(name):
    profile = nasnet_profile() if name == "nasnet" else Profile.load(PROFILES / f"{name}.json")
    space = build_states(profile)
    assert len(space) <= MAX_STATES
    assert not space.complete
    assert build_states(profile) is space  # cached per graph
    _check_valid(profile, space)
    # PipeDream's antichain space explodes on these: the same bounded space instead, and says so
    bounded = build_states(profile, "antichain")
    assert bounded.kind == "antichain-bounded"
    assert _rows(bounded.masks) == _rows(space.masks)


def test_nasnet_cells_end_in_states():
    """Cell boundaries are waists (two tensors cross): every cell's end is a state."""
    profile = nasnet_profile(cells=6, seed=4)
    space = build_states(profile)
    rows = _rows(space.masks)
    n = len(profile)
    for i, layer in enumerate(profile.layers):
        if layer.op == "concat":
            mask = np.zeros(n, dtype=bool)
            mask[: i + 1] = True
            assert np.packbits(mask).tobytes() in rows
    _check_valid(profile, space)
    assert nasnet_profile(cells=6, seed=4) == profile


def test_nasnet_profile_shape():
    profile = nasnet_profile()
    assert len(profile) >= 1500
    concats = [i for i, la in enumerate(profile.layers) if la.op == "concat"]
    assert len(concats) >= 20
    for cell, i in enumerate(concats):
        branches = len(profile.layers[i].inputs)
        assert 3 <= branches <= 4  # 5-8 branches summed in pairs
        if cell >= 2:  # preps read the previous two cells
            preps = [j for j in range(concats[cell - 1], i) if profile.layers[j].op == "prep"]
            assert {profile.layers[j].inputs[0] for j in preps} == {
                concats[cell - 1],
                concats[cell - 2],
            }
