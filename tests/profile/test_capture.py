"""Tests of planner.profile.capture: the layer DAG, leaf modules and untraceable models."""

from __future__ import annotations

import pytest
import torch
import torchvision

from planner.errors import ModelError
from planner.models import GPT, GPT_CONFIGS
from planner.profile.capture import capture


@pytest.fixture(scope="module")
def resnet50_graph():
    return capture(torchvision.models.resnet50())


def test_resnet50_layers_are_in_topological_order(resnet50_graph):
    layers = resnet50_graph.layers
    assert layers[0].name == "conv1" and layers[0].inputs == () and layers[0].reads_model_input
    for index, layer in enumerate(layers):
        assert all(0 <= source < index for source in layer.inputs), layer.name
    assert resnet50_graph.output_layers == (len(layers) - 1,)


def test_resnet50_residual_adds_have_two_inputs(resnet50_graph):
    adds = [layer for layer in resnet50_graph.layers if layer.op == "add"]
    assert len(adds) == 16  # 3 + 4 + 6 + 3 bottleneck blocks
    by_name = {layer.name: i for i, layer in enumerate(resnet50_graph.layers)}
    for add in adds:
        assert len(add.inputs) == 2, add.name
    # The first block's shortcut comes through the downsample branch.
    first = resnet50_graph.layers[by_name["add"]]
    sources = {resnet50_graph.layers[i].name for i in first.inputs}
    assert sources == {"layer1_0_bn3", "layer1_0_downsample_1"}


def test_capture_describes_ops_and_targets(resnet50_graph):
    conv1 = resnet50_graph.layers[0]
    assert conv1.op.startswith("Conv2d(3, 64, kernel_size=(7, 7)")
    assert conv1.target == "conv1"
    flatten = next(layer for layer in resnet50_graph.layers if layer.name == "flatten")
    assert flatten.op == "flatten"


def test_graph_hash_is_stable_and_sees_leaf_modules():
    model = GPT(GPT_CONFIGS["gpt2-tiny"])
    assert capture(model).graph_hash == capture(GPT(GPT_CONFIGS["gpt2-tiny"])).graph_hash
    assert capture(model).graph_hash != capture(model, ["Block"]).graph_hash


def test_leaf_modules_by_type_keep_each_block_whole():
    model = GPT(GPT_CONFIGS["gpt2-tiny"])
    fine = capture(model)
    coarse = capture(model, ["Block"])
    names = [layer.name for layer in coarse.layers]
    assert names == [
        "tok_emb",
        "positions",
        "pos_emb",
        "add",
        "blocks_0",
        "blocks_1",
        "ln_f",
        "lm_head",
    ]
    assert coarse.layers[4].op == "Block()" and coarse.layers[4].inputs == (3,)
    assert coarse.layers[5].inputs == (4,)
    assert len(fine.layers) > 4 * len(coarse.layers)


def test_leaf_modules_by_qualified_name_keep_one_block_whole():
    graph = capture(GPT(GPT_CONFIGS["gpt2-tiny"]), ["blocks.1"])
    names = [layer.name for layer in graph.layers]
    assert "blocks_1" in names and "blocks_0_attn_qkv" in names
    assert not any(name.startswith("blocks_1_") for name in names)


def test_unknown_leaf_module_is_an_error():
    with pytest.raises(ModelError, match="--leaf-modules Blok names no module"):
        capture(GPT(GPT_CONFIGS["gpt2-tiny"]), ["Blok"])


class Gate(torch.nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_model_names_the_construct_and_suggests_leaf_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Gate(), torch.nn.Linear(4, 2))
    with pytest.raises(ModelError) as info:
        capture(model)
    message = str(info.value)
    assert "control flow" in message  # fx's words for the failing construct
    assert "in module '1'" in message  # the submodule that holds it
    assert "--leaf-modules" in message
    # Keeping the offending module whole is the fix the message suggests.
    graph = capture(model, ["Gate"])
    assert [layer.op for layer in graph.layers][1] == "Gate()"
