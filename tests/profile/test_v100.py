"""Tests of planner.profile.v100: PipeDream's V100 profiles on the fx layers of torchvision models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from planner.cli import main
from planner.errors import ProfileError
from planner.models import load_model
from planner.planning import PlanOptions, make_plan, shipped_profile
from planner.profile.capture import capture
from planner.profile.format import Profile
from planner.profile.pipedream import read_graph_txt
from planner.profile.v100 import V100_MODELS, map_onto_model, v100_profile
from planner.runtime.stage import capture_for_plan
from planner.topology import Topology


@pytest.mark.parametrize("model", V100_MODELS)
def test_mapping_keeps_every_node_and_is_the_shipped_profile(model, shared_dir):
    pipedream = read_graph_txt(shared_dir / model / "graph.txt")
    mapped = v100_profile(model, shared_dir)
    # every PipeDream cost lands on exactly one fx layer: totals are kept
    real = [layer for layer in pipedream.layers if layer.op != "Input"]
    assert sum(layer.forward_ms for layer in mapped.layers) == pytest.approx(
        sum(layer.forward_ms for layer in real)
    )
    assert sum(layer.backward_ms for layer in mapped.layers) == pytest.approx(
        sum(layer.backward_ms for layer in real)
    )
    assert sum(layer.parameter_bytes for layer in mapped.layers) == sum(
        layer.parameter_bytes for layer in real
    )
    # parameters are the torchvision model's, layer by layer (a check of the match itself)
    spec = load_model(model, batch_size=1)
    graph = capture(spec.module)
    for fx_layer, layer in zip(graph.layers, mapped.layers, strict=True):
        assert fx_layer.name == layer.name
        if fx_layer.node.op == "call_module":
            sub = spec.module.get_submodule(str(fx_layer.node.target))
            assert layer.parameter_bytes == sum(p.numel() * 4 for p in sub.parameters())
    assert mapped.graph_hash == graph.graph_hash
    assert (mapped.device, mapped.source, mapped.batch_size) == (
        "v100",
        "pipedream-mapped",
        pipedream.batch_size,
    )
    assert "PipeDream" in (mapped.machine or "") and "V100" in (mapped.machine or "")
    shipped = shipped_profile(f"{model}-v100")
    assert shipped is not None, f"profiles/{model}-v100.json is not shipped"
    assert Profile.load(shipped).to_json() == mapped.to_json()


def test_a_different_model_does_not_map(shared_dir):
    with pytest.raises(ProfileError, match=r"resnet18: fx layer .* no PipeDream node"):
        map_onto_model(
            read_graph_txt(shared_dir / "vgg16" / "graph.txt"), "resnet18", source_path="x"
        )


def test_a_v100_plan_runs_on_the_model_here(shared_dir):
    torch.set_num_threads(1)
    path = shipped_profile("resnet50-v100")
    assert path is not None
    plan = make_plan(
        Profile.load(path), path, Topology.from_args(gpus=8), PlanOptions(straight=True)
    )
    assert len(plan.stages) == 8
    spec = load_model("resnet50", batch_size=plan.microbatch_size, input_shape=(3, 32, 32))
    capture_for_plan(plan, spec.module)  # the layer names and graph are the model's


def test_plan_device_v100_says_which_device_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "resnet50", "--gpus", "8", "--device", "v100", "-o", "p.json"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("planning for NVIDIA V100 GPUs with PipeDream's V100 profile")
    assert "plan profile --model resnet50 --device cuda" in first
    assert main(["--model", "resnet152", "--gpus", "8", "--device", "v100", "-o", "q.json"]) == 2
    assert "no V100 profile is shipped for resnet152" in capsys.readouterr().err
    assert not Path("q.json").exists()
    assert (
        main(["profile", "--model", "resnet50", "--device", "v100", "--batch-size", "1", "-o", "x"])
        == 2
    )
    assert "only plan uses" in capsys.readouterr().err
