import json

import pytest

from planner.errors import ProfileError
from planner.profile import LayerProfile, Profile


def _profile(**kw):
    layers = (
        LayerProfile(
            name="a",
            op="Linear",
            forward_ms=1.0,
            backward_ms=2.0,
            output_bytes=(400,),
            parameter_bytes=100,
            saved_bytes=400,
            forward_samples_ms=(1.0, 1.1),
        ),
        LayerProfile(
            name="b",
            op="ReLU",
            forward_ms=0.5,
            backward_ms=0.5,
            output_bytes=(400,),
            parameter_bytes=0,
            inputs=(0,),
        ),
        LayerProfile(
            name="c",
            op="add",
            forward_ms=0.1,
            backward_ms=0.1,
            output_bytes=(200, 200),
            parameter_bytes=0,
            inputs=(0, 1),
        ),
    )
    return Profile(model="toy", batch_size=4, layers=layers, input_shape=(10,), **kw)


def test_round_trip_json_and_file(tmp_path):
    p = _profile(whole_step_ms=4.0, leaf_modules=("Block",))
    assert Profile.from_json(p.to_json()) == p
    path = tmp_path / "sub" / "p.json"
    p.save(path)
    assert Profile.load(path) == p
    assert [f.name for f in path.parent.iterdir()] == ["p.json"]  # no temporary file left


def test_totals_consumers_and_dataframe():
    p = _profile()
    assert p.total_compute_ms == pytest.approx(4.2)
    assert p.consumers() == [[1, 2], [2], []]
    assert p.layers[2].activation_bytes == 400
    frame = p.to_dataframe()
    assert list(frame["name"]) == ["a", "b", "c"]
    assert frame.loc[2, "inputs"] == ["a", "b"]
    assert p.to_networkx().number_of_edges() == 3


def test_rescale_scales_per_sample_costs_and_keeps_parameters():
    p = _profile(whole_step_ms=4.0)
    q = p.rescale(8)
    assert q.batch_size == 8 and q.rescaled_from_batch_size == 4
    assert q.layers[0].forward_ms == pytest.approx(2.0)
    assert q.layers[0].output_bytes == (800,)
    assert q.layers[0].saved_bytes == 800
    assert q.layers[0].parameter_bytes == 100
    assert q.whole_step_ms == pytest.approx(8.0)
    assert q.rescale(2).rescaled_from_batch_size == 4
    with pytest.raises(ProfileError):
        p.rescale(0)


def test_invalid_profiles_are_refused():
    layer = LayerProfile(
        name="a",
        op="x",
        forward_ms=1,
        backward_ms=1,
        output_bytes=(1,),
        parameter_bytes=0,
        inputs=(0,),
    )
    with pytest.raises(ProfileError, match="topological order"):
        Profile(model="m", batch_size=1, layers=(layer,))
    with pytest.raises(ProfileError, match="no layers"):
        Profile(model="m", batch_size=1, layers=())


def test_wrong_version_and_truncated_files(tmp_path):
    doc = _profile().to_dict()
    doc["format"] = "planner.profile/0"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"expected 'planner\.profile/1'"):
        Profile.load(path)
    text = _profile().to_json()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.load(path)
    with pytest.raises(ProfileError, match="does not exist"):
        Profile.load(tmp_path / "missing.json")
    doc = _profile().to_dict()
    doc["layers"][0]["forward_ms"] = "fast"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="layers/0/forward_ms"):
        Profile.load(path)
