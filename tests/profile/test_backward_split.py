"""The backward split into input gradient (B) and weight gradient (W): profile format 2, older
files loading with an estimate, and the measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.errors import ProfileError
from planner.profile.format import FORMAT, FORMAT_V1, LayerProfile, Profile


def two_layers(**split: float | None) -> Profile:
    layers = (
        LayerProfile(
            name="fc",
            op="Linear",
            forward_ms=1.0,
            backward_ms=2.0,
            output_bytes=(64,),
            parameter_bytes=100,
            **split,  # type: ignore[arg-type]
        ),
        LayerProfile(
            name="relu",
            op="ReLU",
            forward_ms=0.5,
            backward_ms=0.5,
            output_bytes=(64,),
            parameter_bytes=0,
            inputs=(0,),
        ),
    )
    return Profile(model="m", batch_size=4, layers=layers)


def test_format_2_round_trips_the_split() -> None:
    p = two_layers(backward_input_ms=0.5, backward_weight_ms=1.0)
    doc = json.loads(p.to_json())
    assert doc["format"] == FORMAT == "planner.profile/2"
    assert doc["layers"][0]["backward_input_ms"] == 0.5
    assert Profile.from_json(p.to_json()) == p
    half = p.rescale(2)
    assert (half.layers[0].backward_input_ms, half.layers[0].backward_weight_ms) == (0.25, 0.5)
    # measured apart, B and W are scaled to add up to the measured backward
    assert p.layers[0].split_backward_ms() == pytest.approx((2.0 / 3, 4.0 / 3))
    assert p.layers[1].split_backward_ms() == (0.5, 0.0)  # unknown: parameter-free is all B


def test_format_1_files_load_with_the_split_estimated_and_flagged(tmp_path: Path) -> None:
    doc = json.loads(two_layers().to_json())
    doc["format"] = FORMAT_V1
    for layer in doc["layers"]:
        del layer["backward_input_ms"], layer["backward_weight_ms"]
    del doc["backward_split"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    p = Profile.load(path)
    assert p.backward_split == "estimated"
    # a layer with parameters: half each; without: all input gradient
    assert [(x.backward_input_ms, x.backward_weight_ms) for x in p.layers] == [
        (1.0, 1.0),
        (0.5, 0.0),
    ]
    p.save(tmp_path / "new.json")  # saved as format 2, still flagged
    again = json.loads((tmp_path / "new.json").read_text())
    assert again["format"] == FORMAT and again["backward_split"] == "estimated"
    assert Profile.load(tmp_path / "new.json") == p


def test_shipped_profiles_still_load() -> None:
    shipped = sorted((Path(__file__).resolve().parents[2] / "profiles").glob("*.json"))
    assert shipped
    for path in shipped:
        p = Profile.load(path)
        if json.loads(path.read_text())["format"] == FORMAT_V1:
            assert p.backward_split == "estimated"
        for layer in p.layers:
            b, w = layer.split_backward_ms()
            assert b + w == pytest.approx(layer.backward_ms)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_split_times_are_refused(bad: float) -> None:
    with pytest.raises(ProfileError, match="backward_weight_ms"):
        two_layers(backward_input_ms=1.0, backward_weight_ms=bad)
    doc = json.loads(two_layers().to_json())
    doc["backward_split"] = "guessed"
    with pytest.raises(ProfileError):
        Profile.from_dict(doc)
