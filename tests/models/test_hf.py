"""Tests of planner.models.hf and planner.profile.export_capture: Hugging Face models from config.

Skipped when transformers is absent (CI installs the ``hf`` extra, so they run there).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from planner.cli import main
from planner.errors import ModelError
from planner.models import load_model
from planner.models.hf import parse_reference, with_model_config
from planner.models.registry import check_trusted, is_builtin
from planner.profile.capture import capture
from planner.profile.export_capture import layer_fqns

TINY = {
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 128, "n_positions": 32},
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 128,
        "max_position_embeddings": 32,
    },
    "bert": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 128,
        "max_position_embeddings": 32,
    },
}
BLOCKS = {
    "gpt2": ["transformer.h.0", "transformer.h.1"],
    "llama": ["model.layers.0", "model.layers.1"],
    "bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
}


def tiny(model_type: str) -> str:
    return with_model_config(f"hf:{model_type}", json.dumps(TINY[model_type]))


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _reference_model(model_type: str):
    """The same transformers model built directly (same seed, same planner defaults)."""
    import transformers

    from planner.models.hf import _build, _config

    torch.manual_seed(0)
    model, _ = _build(_config(model_type, TINY[model_type]))
    assert isinstance(model, transformers.PreTrainedModel)
    return model


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_hf_model_is_one_layer_per_block_and_computes_what_transformers_computes(model_type):
    spec = load_model(tiny(model_type), batch_size=2, input_shape=(16,))
    graph = capture(spec.module)
    fqns = layer_fqns(spec.module)
    layer_modules = [fqns[layer.target] for layer in graph.layers if layer.target in fqns]
    for block in BLOCKS[model_type]:
        assert layer_modules.count(block) == 1  # a block is one layer
    assert len(set(layer_modules)) == len(layer_modules)  # every layer names one module
    # Equal to the model transformers builds, on a batch size other than the exported one.
    reference = _reference_model(model_type).train()
    ids = torch.randint(128, (3, 16), generator=torch.Generator().manual_seed(1))
    kwargs = {} if model_type == "bert" else {"use_cache": False}
    expected = reference(input_ids=ids, **kwargs).logits
    torch.testing.assert_close(graph.module(ids), expected)
    # Gradients reach every parameter.
    (inputs, targets) = spec.make_batch(2, 0)
    spec.loss_fn(spec.module(*inputs), targets).backward()
    assert all(p.grad is not None for p in spec.module.parameters())


def test_hf_defaults_are_small_dropout_free_and_untied():
    spec = load_model("hf:gpt2", batch_size=2)
    assert spec.name == "hf:gpt2" and spec.input_shape == (128,)
    blocks = [v for v in layer_fqns(spec.module).values() if v.startswith("transformer.h.")]
    assert blocks == [f"transformer.h.{i}" for i in range(4)]
    # Untied: the LM head's weight is not the token embedding's.
    params = dict(spec.module.named_parameters())
    head = next(v for k, v in params.items() if k.endswith("lm_head.weight"))
    wte = next(v for k, v in params.items() if k.endswith("wte.weight"))
    assert head.data_ptr() != wte.data_ptr()
    (ids,), _ = spec.make_batch(2, 0)
    torch.testing.assert_close(spec.module(ids), spec.module(ids))  # no dropout


def test_model_config_merges_into_a_canonical_reference():
    ref = with_model_config('hf:gpt2{"n_layer":3}', '{"n_embd": 64, "n_layer": 2}')
    assert ref == 'hf:gpt2{"n_embd":64,"n_layer":2}'
    assert parse_reference(ref) == ("gpt2", {"n_embd": 64, "n_layer": 2})
    assert with_model_config("hf:gpt2", None) == "hf:gpt2"
    spec = load_model(ref, batch_size=1, input_shape=(8,))
    assert spec.name == ref
    assert is_builtin(ref)
    check_trusted(ref)  # a config, not code: no --trust-model needed


@pytest.mark.parametrize(
    ("reference", "config", "match"),
    [
        ("hf:gpt3", None, r"no model_type 'gpt3'; did you mean .*gpt2"),
        ("hf:gpt2", '{"n_layers": 2}', r"no field 'n_layers'; did you mean n_layer"),
        ("hf:gpt2", '{"n_layer": "two"}', r"n_layer takes a int like its default"),
        ("hf:gpt2", '{"n_layer": 2', r"not valid JSON"),
        ("hf:gpt2", "[2]", r"must be a JSON object"),
        ("resnet18", '{"n_layer": 2}', r"applies to Hugging Face models"),
        ("hf:", None, r"names no model_type"),
    ],
)
def test_bad_references_and_configs_are_one_line_model_errors(reference, config, match):
    with pytest.raises(ModelError, match=match) as info:
        load_model(with_model_config(reference, config), batch_size=1)
    assert "\n" not in str(info.value)


def test_sequence_longer_than_the_positions_is_refused():
    with pytest.raises(ModelError, match=r"has 32 positions but --input-shape asks for 64"):
        load_model(tiny("gpt2"), batch_size=1, input_shape=(64,))


def own_llama():
    """A user's own transformers model (``--model test_hf:own_llama``)."""
    import transformers

    config = transformers.LlamaConfig(**TINY["llama"], attention_dropout=0.0)
    return transformers.LlamaForCausalLM(config)


def test_users_transformers_model_through_a_factory(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    spec = load_model("test_hf:own_llama", batch_size=2, input_shape=(16,))
    names = list(layer_fqns(spec.module).values())
    assert "model.layers.1" in names and "lm_head" in names
    (ids,), targets = spec.make_batch(2, 0)
    assert spec.module(ids).shape == (2, 16, 128)
    assert spec.loss_fn(spec.module(ids), targets).isfinite()


def test_cli_profiles_and_plans_an_hf_model(tmp_path, capsys):
    profile = tmp_path / "p.json"
    status = main(
        [
            "profile",
            "--model",
            "hf:llama",
            "--model-config",
            json.dumps(TINY["llama"]),
            "--input-shape",
            "16",
            "--batch-size",
            "2",
            "--reps",
            "1",
            "-o",
            str(profile),
        ]
    )
    assert status == 0, capsys.readouterr().err
    data = json.loads(profile.read_text())
    assert data["model"].startswith("hf:llama{")
    names = [layer["name"] for layer in data["layers"]]
    assert "model_layers_0" in names and "lm_head" in names
    plan = tmp_path / "plan.json"
    status = main(
        [
            "--profile",
            str(profile),
            "--gpus",
            "2",
            "--straight",
            "--batch-size",
            "4",
            "-o",
            str(plan),
        ]
    )
    assert status == 0, capsys.readouterr().err
    stages = json.loads(plan.read_text())["stages"]
    assert sum(len(s["layers"]) for s in stages) == len(names)


def test_model_config_is_refused_for_other_models(capsys):
    status = main(
        ["profile", "--model", "resnet18", "--model-config", "{}", "--batch-size", "1", "-o", "x"]
    )
    assert status == 2
    assert "applies to Hugging Face models" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("model_type", "cut"), [("gpt2", "transformer_h_1"), ("llama", "model_layers_1")]
)
def test_two_stage_run_equals_single_device_training(model_type, cut, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))
    from runtime_helpers import assert_matches_reference, make_plan, reference, run_cases

    model = tiny(model_type)
    plan = make_plan(model, cuts=[cut], replicas=[1, 1], microbatches=2, microbatch_size=2)
    results = run_cases({"hf": plan}, tmp_path, steps=2, timeout_s=120.0)
    expected, losses = reference(model, plan, steps=2)
    assert_matches_reference(model, results["hf"], expected, losses)
