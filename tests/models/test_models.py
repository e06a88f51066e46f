"""Tests of planner.models: the GPT decoder and load_model (names, shapes, determinism)."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest
import torch

from planner.errors import ModelError
from planner.models import GPT, GPT_CONFIGS, Block, ModelSpec, load_model
from planner.models.registry import check_trusted, is_builtin
from planner.profile.capture import capture
from planner.profile.record import record


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- the GPT decoder ---------------------------------------------------------------------------


def test_gpt2_small_tied_has_gpt2_parameter_count():
    cfg = dataclasses.replace(GPT_CONFIGS["gpt2-small"], tie_weights=True)
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small


def test_gpt_configs_have_the_issue_sizes():
    small, medium = GPT_CONFIGS["gpt2-small"], GPT_CONFIGS["gpt2-medium"]
    assert (small.n_layers, small.d_model, small.n_heads, small.vocab_size, small.seq_len) == (
        12,
        768,
        12,
        50257,
        1024,
    )
    assert (medium.n_layers, medium.d_model, medium.n_heads) == (24, 1024, 16)


def test_gpt_blocks_are_named_modules_of_class_block():
    model = GPT(GPT_CONFIGS["gpt2-tiny"])
    modules = dict(model.named_modules())
    assert isinstance(modules["blocks.1"], Block)
    assert type(modules["blocks.1"]).__name__ == "Block"


def test_gpt_traces_without_leaf_modules_and_passes_only_tensors():
    model = GPT(GPT_CONFIGS["gpt2-tiny"])
    graph = capture(model)
    ids = torch.zeros(2, 32, dtype=torch.long)
    rec = record(graph, (ids,))
    for layer in graph.layers:
        value = rec.values[layer.node]
        parts = value if isinstance(value, tuple) else (value,)
        assert all(isinstance(v, torch.Tensor) for v in parts), layer.name
    assert not any(layer.target == "size" for layer in graph.layers)


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(GPT_CONFIGS["gpt2-tiny"]).eval()
    ids = torch.randint(256, (1, 32))
    changed = ids.clone()
    changed[0, 20] = (ids[0, 20] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_gpt_rejects_bad_configs():
    with pytest.raises(ModelError, match="not divisible"):
        dataclasses.replace(GPT_CONFIGS["gpt2-tiny"], n_heads=3)
    with pytest.raises(ModelError, match="exceeds the model's 32 positions"):
        GPT_CONFIGS["gpt2-tiny"].with_seq_len(64)


# --- load_model --------------------------------------------------------------------------------


def test_load_gpt_is_deterministic_and_batches_are_shifted_tokens():
    a = load_model("gpt2-tiny", batch_size=4, seed=3)
    b = load_model("gpt2-tiny", batch_size=4, seed=3)
    for (name, pa), pb in zip(
        a.module.state_dict().items(), b.module.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    (ids,), targets = a.make_batch(4, 7)
    (ids2,), targets2 = b.make_batch(4, 7)
    assert torch.equal(ids, ids2) and torch.equal(targets, targets2)
    assert ids.dtype == torch.long and tuple(ids.shape) == (4, 32)
    assert torch.equal(ids[:, 1:], targets[:, :-1])  # targets are the ids shifted by one
    loss = a.loss_fn(a.module(ids), targets)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert a.input_shape == (32,) and a.input_dtype == torch.long


def test_load_model_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    load_model("gpt2-tiny", batch_size=1, seed=5)
    assert torch.equal(state, torch.get_rng_state())


def test_gpt_shorter_sequence_keeps_parameters():
    full = load_model("gpt2-tiny", batch_size=1)
    short = load_model("gpt2-tiny", batch_size=1, input_shape=(16,))
    assert short.input_shape == (16,)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(short.module) == count(full.module)
    (ids,), _ = short.make_batch(2, 0)
    assert tuple(short.module(ids).shape) == (2, 16, 256)


def test_load_vision_model_with_small_images_in_bfloat16():
    spec = load_model("resnet18", batch_size=2, input_shape=(3, 32, 32), dtype="bfloat16")
    (x,), targets = spec.make_batch(2, 0)
    assert x.dtype == torch.bfloat16 and tuple(x.shape) == (2, 3, 32, 32)
    assert targets.dtype == torch.long and int(targets.max()) < 1000
    assert next(spec.module.parameters()).dtype == torch.bfloat16
    assert spec.module.training


def test_unknown_name_lists_close_names():
    with pytest.raises(ModelError, match=r"unknown model 'resnet5'; did you mean resnet50"):
        load_model("resnet5", batch_size=1)
    with pytest.raises(ModelError, match="gpt2-small"):
        load_model("gpt2-smal", batch_size=1)


@pytest.mark.parametrize(
    ("name", "shape", "reason"),
    [
        ("resnet18", (3, 0, 224), "positive integers"),
        ("resnet18", (224, 224), r"shape \(3, height, width\)"),
        ("gpt2-tiny", (4, 8), r"input shape \(seq_len,\)"),
        ("gpt2-tiny", (64,), "exceeds"),
        ("squeezenet1_0", (3, 16, 16), "fails on input shape .* Output size is too small"),
    ],
)
def test_bad_input_shape_raises_model_error(name, shape, reason):
    with pytest.raises(ModelError, match=reason):
        load_model(name, batch_size=1, input_shape=shape)


def test_bad_device():
    with pytest.raises(ModelError, match="unknown device 'gpu0'"):
        load_model("gpt2-tiny", batch_size=1, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_model("gpt2-tiny", batch_size=1, device="cuda")


def test_bad_dtype_and_batch_size():
    with pytest.raises(ModelError, match="unknown dtype 'float8'"):
        load_model("gpt2-tiny", batch_size=1, dtype="float8")
    with pytest.raises(ModelError, match="batch size"):
        load_model("gpt2-tiny", batch_size=0)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """An importable module ``user_models`` with factories returning a module or a ModelSpec."""
    (tmp_path / "user_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from planner.models import load_model

            def mlp():
                return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

            def regressor():
                return torch.nn.Conv1d(2, 2, 3, padding=1)

            def spec():
                return load_model("gpt2-tiny", batch_size=1, input_shape=(8,))

            def broken():
                raise RuntimeError("no weights here")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("user_models", None)


@pytest.mark.usefixtures("factories")
def test_factory_module_needs_and_checks_the_input_shape():
    spec = load_model("user_models:mlp", batch_size=2, input_shape=(4,))
    (x,), targets = spec.make_batch(2, 0)
    assert spec.name == "user_models:mlp" and tuple(x.shape) == (2, 4)
    assert spec.loss_fn(spec.module(x), targets).dim() == 0  # cross-entropy over 3 classes
    assert int(targets.max()) < 3
    with pytest.raises(ModelError, match="give its per-sample input shape"):
        load_model("user_models:mlp", batch_size=2)
    with pytest.raises(ModelError, match="fails on input shape"):
        load_model("user_models:mlp", batch_size=2, input_shape=(5,))


@pytest.mark.usefixtures("factories")
def test_factory_regressor_gets_a_regression_loss():
    spec = load_model("user_models:regressor", batch_size=2, input_shape=(2, 10))
    (x,), targets = spec.make_batch(2, 1)
    assert targets.shape == (2, 2, 10) and targets.is_floating_point()
    assert spec.loss_fn(spec.module(x), targets) > 0


@pytest.mark.usefixtures("factories")
def test_factory_returning_a_model_spec_is_used_as_is():
    spec = load_model("user_models:spec", batch_size=1)
    assert isinstance(spec, ModelSpec) and spec.input_shape == (8,)
    with pytest.raises(ModelError, match="fixes input shape"):
        load_model("user_models:spec", batch_size=1, input_shape=(4,))


@pytest.mark.usefixtures("factories")
@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (
            "user_models:broken",
            "factory 'user_models:broken' failed: RuntimeError: no weights here",
        ),
        ("user_models:nothing", "no factory function 'nothing'"),
        ("no_such_package.mod:make", "cannot import 'no_such_package.mod'"),
        (":make", "package.module:factory"),
    ],
)
def test_bad_factories_raise_model_error(spec, reason):
    with pytest.raises(ModelError, match=reason):
        load_model(spec, batch_size=1, input_shape=(4,))


# --- trust: code named by a file runs only when the user says so ------------------------------


@pytest.mark.parametrize(
    ("reference", "builtin"),
    [
        ("resnet50", True),
        ("gpt2-tiny", True),
        ("mymodels:mlp", False),
        ("sys:exit", False),
        ("resnet50:x", False),
        ("os", False),
        ("", False),
    ],
)
def test_is_builtin(reference, builtin):
    assert is_builtin(reference) is builtin


def test_check_trusted_refuses_code_unless_named_or_trusted():
    check_trusted("resnet18")
    check_trusted("evil:f", trust=True)
    check_trusted("evil:f", named="evil:f")
    with pytest.raises(ModelError, match=r"'evil:f' is code from a file .* --trust-model"):
        check_trusted("evil:f")
    with pytest.raises(ModelError, match="is not the plan's model"):
        check_trusted("evil:f", named="good:f")
    with pytest.raises(ModelError, match="is not the plan's model"):
        check_trusted("resnet18", named="resnet50", trust=True)
    with pytest.raises(ModelError) as info:  # a terminal escape is shown escaped
        check_trusted("evil\x1b[2J:f")
    assert "\x1b" not in str(info.value)


@pytest.fixture
def cwd_model(tmp_path, monkeypatch):
    """``cwd_models.py`` in the current folder (not on the import path), marking its import."""
    (tmp_path / "cwd_models.py").write_text(
        textwrap.dedent(
            """
            import pathlib
            import torch

            pathlib.Path(__file__).with_name("imported").write_text("yes")

            def mlp():
                return torch.nn.Linear(4, 2)
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    sys.modules.pop("cwd_models", None)


def test_a_model_named_by_the_user_is_found_in_the_current_folder(cwd_model):
    spec = load_model("cwd_models:mlp", batch_size=2, input_shape=(4,))
    assert spec.name == "cwd_models:mlp" and (cwd_model / "imported").exists()
    assert str(cwd_model) not in sys.path  # only while importing


def test_without_search_cwd_the_current_folder_is_not_searched(cwd_model):
    with pytest.raises(ModelError, match="cannot import 'cwd_models'"):
        load_model("cwd_models:mlp", batch_size=2, input_shape=(4,), search_cwd=False)
    assert not (cwd_model / "imported").exists()


@pytest.mark.parametrize(
    ("reference", "reason"),
    [
        ("sys:exit", "factory 'sys:exit' failed: SystemExit"),
        ("os:getcwd", "returned str"),
        ("builtins:object", "no factory function 'object'"),
        ("math:pi", "no factory function 'pi'"),
    ],
)
def test_a_factory_must_return_a_module(reference, reason):
    with pytest.raises(ModelError, match=reason):
        load_model(reference, batch_size=1, input_shape=(4,))
