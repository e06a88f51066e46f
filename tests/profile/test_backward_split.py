"""The backward split into input gradient (B) and weight gradient (W): profile format 2, older
files loading with an estimate, and the measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from planner.errors import ProfileError
from planner.profile.format import FORMAT, FORMAT_V1, LayerProfile, Profile
from planner.profile.measure import measure_backward_split, profile_model, profile_module


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


def test_profiling_measures_the_split() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.BatchNorm1d(256),
    )
    x = (torch.randn(32, 64),)
    plain = profile_module(net, x, warmup=1, reps=2)
    assert plain.backward_split is None  # profile_module alone leaves the split unmeasured
    stats = net[3].running_mean.clone()
    p = measure_backward_split(plain, net, x, reps=2)
    assert torch.equal(net[3].running_mean, stats) and net.training  # the module is unchanged
    assert p.backward_split == "measured"
    first, relu, second, norm = p.layers
    # the model's input needs no gradient: the first layer's B is nothing; ReLU has no W
    assert first.backward_input_ms == 0.0 and first.backward_weight_ms > 0
    assert relu.backward_weight_ms == 0.0 and relu.backward_input_ms > 0
    assert second.backward_input_ms > 0 and second.backward_weight_ms > 0
    assert norm.backward_input_ms > 0 and norm.backward_weight_ms > 0
    assert [(a.forward_ms, a.backward_ms) for a in p.layers] == [
        (a.forward_ms, a.backward_ms) for a in plain.layers
    ]
    assert Profile.from_json(p.to_json()) == p
    other = torch.nn.Sequential(torch.nn.Linear(64, 4))
    with pytest.raises(ProfileError, match="measure the split on the profiled model"):
        measure_backward_split(plain, other, x)


def test_plan_profile_measures_the_split() -> None:
    p = profile_model("gpt2-tiny", batch_size=2, leaf_modules=["Block"], progress=False, reps=1)
    assert p.backward_split == "measured"
    blocks = [layer for layer in p.layers if layer.name.startswith("blocks_")]
    assert blocks and all(b.backward_input_ms > 0 and b.backward_weight_ms > 0 for b in blocks)


def _repeated_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(64, 128)]
    for _ in range(3):
        layers += [torch.nn.ReLU(), torch.nn.Linear(128, 128)]
    return torch.nn.Sequential(*layers)


def test_profiling_splits_on_its_own_recording_once_per_kind_of_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import planner.profile.measure as measure
    from planner.profile.timing import LayerRunner

    torch.set_num_threads(1)
    recordings: list[object] = []
    splits: list[str] = []
    real_record, real_split = measure.record, LayerRunner.run_split

    def counting_record(*args: object, **kwargs: object) -> object:
        recordings.append(args)
        return real_record(*args, **kwargs)  # type: ignore[arg-type]

    def counting_split(self: LayerRunner, timer: object) -> tuple[float, float]:
        splits.append(self.node.name)
        return real_split(self, timer)  # type: ignore[arg-type]

    monkeypatch.setattr(measure, "record", counting_record)
    monkeypatch.setattr(LayerRunner, "run_split", counting_split)
    x = (torch.randn(32, 64),)
    p = profile_module(_repeated_net(), x, warmup=1, reps=2, split_backward=True)
    assert len(recordings) == 1  # no second recording pass for the split
    assert p.backward_split == "measured"
    # three kinds: the first Linear (its input needs no gradient), ReLU, Linear(128, 128);
    # each split once untimed and twice timed, on the first layer of its kind
    assert splits == ["_0"] * 3 + ["_1"] * 3 + ["_2"] * 3
    first, *rest = p.layers
    assert first.backward_input_ms == 0.0 and first.backward_weight_ms > 0
    relus, linears = rest[0::2], rest[1::2]
    assert all(r.backward_weight_ms == 0.0 and r.backward_input_ms > 0 for r in relus)
    assert all(b.backward_input_ms > 0 and b.backward_weight_ms > 0 for b in linears)
    # layers of a kind share the measured ratios: B / W, and (B + W) / backward_ms
    ratios = {(b.backward_input_ms / b.backward_weight_ms) for b in linears}
    assert max(ratios) == pytest.approx(min(ratios))
    totals = [(b.backward_input_ms + b.backward_weight_ms) / b.backward_ms for b in linears]
    assert max(totals) == pytest.approx(min(totals))
    for layer in p.layers:
        b, w = layer.split_backward_ms()
        assert b + w == pytest.approx(layer.backward_ms)


def test_layer_kinds_tell_configurations_and_shapes_apart() -> None:
    from planner.profile.capture import capture
    from planner.profile.record import record
    from planner.profile.timing import GradOnes, LayerRunner

    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.Conv2d(4, 4, 3, padding=1, stride=2),  # same weights' shape, other config
        torch.nn.Conv2d(4, 4, 3, padding=1),  # same config, smaller input
    )
    graph = capture(net)
    rec = record(graph, (torch.randn(2, 4, 8, 8),))
    kinds = [
        LayerRunner(graph.module, layer, rec, GradOnes()).signature() for layer in graph.layers
    ]
    # the first one's input needs no gradient; the second is alone in its shapes too
    assert len(set(kinds)) == 4
    net2 = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])
    graph2 = capture(net2)
    rec2 = record(graph2, (torch.randn(2, 8),))
    kinds2 = [
        LayerRunner(graph2.module, layer, rec2, GradOnes()).signature() for layer in graph2.layers
    ]
    assert kinds2[0] != kinds2[1] == kinds2[2]
