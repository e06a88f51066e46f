"""Tests of planner.profile.measure and planner.profile.record: timing, sizes, metadata."""

from __future__ import annotations

import dataclasses
import datetime
import statistics
from typing import ClassVar

import pytest
import torch
import torchvision
from torch.nn import functional as F

from planner.errors import ModelError, ProfileError
from planner.models import GPT, GPT_CONFIGS
from planner.profile import Profile
from planner.profile.capture import capture
from planner.profile.measure import keep_freed_memory, profile_model, profile_module
from planner.profile.record import layer_sizes, record
from planner.profile.timing import glibc_available


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- fake layers of known cost under a fake clock ------------------------------------------------


class FakeClock:
    """A clock (seconds) that only fake layers move."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1e3


class _Cost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, layer):  # type: ignore[override]
        layer.calls += 1
        layer.clock.advance_ms(layer.forward_ms * layer.factor())
        ctx.layer = layer
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, w = ctx.saved_tensors
        ctx.layer.clock.advance_ms(ctx.layer.backward_ms * ctx.layer.factor())
        return grad * w, (grad * x).sum().reshape(1), None


class FakeLayer(torch.nn.Module):
    """Costs ``forward_ms`` and ``backward_ms`` on the fake clock; ``slow_after`` forward calls
    later both cost ``slow_factor`` times as much (to make the whole step disagree)."""

    def __init__(self, clock, forward_ms, backward_ms, slow_after=None, slow_factor=1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.clock, self.forward_ms, self.backward_ms = clock, forward_ms, backward_ms
        self.slow_after, self.slow_factor, self.calls = slow_after, slow_factor, 0

    def factor(self) -> float:
        slow = self.slow_after is not None and self.calls > self.slow_after
        return self.slow_factor if slow else 1.0

    def forward(self, x):
        return _Cost.apply(x, self.weight, self)


class FakeNet(torch.nn.Module):
    """a -> (b, c) -> add -> d: a small DAG with a branch."""

    COSTS: ClassVar[dict[str, tuple[float, float]]] = {
        "a": (2.0, 4.0),
        "b": (1.0, 3.0),
        "c": (5.0, 1.5),
        "d": (0.5, 0.25),
    }

    def __init__(self, clock, **slow):
        super().__init__()
        for name, (f, b) in self.COSTS.items():
            setattr(self, name, FakeLayer(clock, f, b, **slow))

    def forward(self, x):
        a = self.a(x)
        return self.d(self.b(a) + self.c(a))


def test_fake_layers_recover_their_costs():
    clock = FakeClock()
    net = FakeNet(clock)
    p = profile_module(net, (torch.randn(4, 3),), leaf_modules=["FakeLayer"], reps=3, clock=clock)
    assert [layer.name for layer in p.layers] == ["a", "b", "c", "add", "d"]
    assert p.layers[3].inputs == (1, 2)
    for layer in p.layers:
        f, b = FakeNet.COSTS.get(layer.name, (0.0, 0.0))
        assert layer.forward_ms == pytest.approx(f, abs=1e-9), layer.name
        assert layer.backward_ms == pytest.approx(b, abs=1e-9), layer.name
        assert len(layer.forward_samples_ms) == 2  # two agreeing samples: no third
    assert p.whole_step_ms == pytest.approx(sum(f + b for f, b in FakeNet.COSTS.values()))
    assert p.total_compute_ms == pytest.approx(p.whole_step_ms)
    assert p.calibration is None
    # record pass, 2 rounds and the single whole step that agrees: 4 forwards per layer
    assert net.a.calls == 4


def test_disagreeing_whole_step_is_remeasured_and_calibrates_with_raw_samples_kept():
    clock = FakeClock()
    # After the recording and 2 rounds (3 forwards) every layer becomes twice as slow.
    net = FakeNet(clock, slow_after=3, slow_factor=2.0)
    p = profile_module(net, (torch.randn(4, 3),), leaf_modules=["FakeLayer"], reps=3, clock=clock)
    raw = sum(f + b for f, b in FakeNet.COSTS.values())
    assert p.whole_step_ms == pytest.approx(2 * raw)
    assert net.a.calls == 3 + 3  # the whole step was timed reps times
    assert p.calibration is not None and "scaled by 2.0000" in p.calibration
    a = p.layers[p.index("a")]
    assert a.forward_ms == pytest.approx(4.0) and a.backward_ms == pytest.approx(8.0)
    assert a.forward_samples_ms == pytest.approx((2.0, 2.0))
    assert p.total_compute_ms == pytest.approx(p.whole_step_ms)


def test_disagreeing_samples_earn_more_repetitions_and_the_median():
    clock = FakeClock()
    net = FakeNet(clock)
    # Layer b's second timed run is disturbed (3x); its third agrees with the first.
    net.b.factor = lambda: 3.0 if net.b.calls == 3 else 1.0
    p = profile_module(net, (torch.randn(4, 3),), leaf_modules=["FakeLayer"], reps=5, clock=clock)
    b, a = p.layers[p.index("b")], p.layers[p.index("a")]
    assert b.forward_samples_ms == pytest.approx((1.0, 3.0, 1.0))
    assert b.forward_ms == pytest.approx(1.0) and b.backward_ms == pytest.approx(3.0)
    assert len(a.forward_samples_ms) == 2  # undisturbed layers stop at two
    assert p.reps == 5


def test_calibration_can_be_switched_off():
    clock = FakeClock()
    net = FakeNet(clock, slow_after=3, slow_factor=2.0)
    p = profile_module(
        net, (torch.randn(4, 3),), leaf_modules=["FakeLayer"], clock=clock, calibrate=False
    )
    assert p.calibration is None
    assert p.layers[0].forward_ms == pytest.approx(2.0)


# --- sizes ----------------------------------------------------------------------------------------


def test_resnet50_sizes_at_batch_8():
    graph = capture(torchvision.models.resnet50())
    sizes = layer_sizes(graph, (torch.randn(8, 3, 224, 224),))
    assert sum(s.parameter_bytes for s in sizes) == 25_557_032 * 4
    conv1 = sizes[0]
    assert graph.layers[0].name == "conv1"
    assert conv1.output_bytes == (8 * 64 * 112 * 112 * 4,)
    assert conv1.saved_bytes == 8 * 3 * 224 * 224 * 4  # its input; the weight is not counted
    bn1 = sizes[1]
    assert bn1.parameter_bytes == 2 * 64 * 4 and bn1.buffer_bytes == 2 * 64 * 4 + 8


def test_linear_relu_sizes_and_inplace_detection():
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(inplace=True))
    graph = capture(net)
    rec = record(graph, (torch.randn(8, 16),))
    assert {n.name for n in rec.inplace} == {"_1"}
    lin, relu = layer_sizes(graph, (), rec)
    assert lin.output_bytes == (8 * 32 * 4,) and lin.parameter_bytes == (16 * 32 + 32) * 4
    assert lin.saved_bytes == 8 * 16 * 4  # the input only
    assert relu.saved_bytes == 8 * 32 * 4 and relu.parameter_bytes == 0


def test_shared_parameters_count_once_for_their_first_user():
    cfg = dataclasses.replace(GPT_CONFIGS["gpt2-tiny"], tie_weights=True)
    model = GPT(cfg)
    graph = capture(model, ["Block"])
    sizes = dict(
        zip(
            (layer.name for layer in graph.layers),
            layer_sizes(graph, (torch.zeros(2, 32, dtype=torch.long),)),
            strict=True,
        )
    )
    assert sizes["tok_emb"].parameter_bytes == 256 * 64 * 4
    assert sizes["lm_head"].parameter_bytes == 0
    unique = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields shared ones once
    assert sum(s.parameter_bytes for s in sizes.values()) == unique
    assert sizes["positions"].buffer_bytes == 32 * 8  # the long positions buffer


class Functional(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return F.linear(x, self.weight).tanh()


def test_get_attr_layer_owns_the_parameter_it_fetches():
    p = profile_module(Functional(), (torch.randn(2, 5),), warmup=0, reps=1)
    weight, linear = p.layers[p.index("weight")], p.layers[p.index("linear")]
    assert weight.parameter_bytes == 15 * 4 and linear.parameter_bytes == 0
    assert linear.inputs == (p.index("weight"),)


# --- behaviour ------------------------------------------------------------------------------------


def test_profile_restores_mode_buffers_and_threads():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.set_num_threads(1)
    p = profile_module(net, (torch.randn(16, 4),), threads=2, warmup=1, reps=2)
    assert p.threads == 2 and torch.get_num_threads() == 1
    assert not net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(param.grad is None for param in net.parameters())
    bn = p.layers[1]
    assert bn.buffer_bytes == 8 * 4 * 2 + 8 and bn.parameter_bytes == 8 * 4 * 2


def test_inplace_layers_are_profiled_on_clones():
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2)
    )
    x = torch.randn(3, 4)
    expected = net(x).detach()
    p = profile_module(net, (x,), warmup=1, reps=3)
    assert p.layers[1].op == "ReLU(inplace=True)" and p.layers[1].backward_ms > 0
    torch.testing.assert_close(net(x), expected)


def test_layers_without_anything_differentiable_have_zero_backward():
    class Indexing(torch.nn.Module):
        def forward(self, ids):
            return (ids * 2).float().mean()

    p = profile_module(Indexing(), (torch.arange(6).reshape(2, 3),), warmup=0, reps=2)
    assert all(layer.backward_ms == 0.0 for layer in p.layers)
    assert p.whole_step_ms is not None


def test_gpt_tiny_profile_metadata_and_json_round_trip(tmp_path):
    p = profile_model("gpt2-tiny", batch_size=2, leaf_modules=["Block"], progress=False)
    assert [layer.name for layer in p.layers] == [
        "tok_emb",
        "positions",
        "pos_emb",
        "add",
        "blocks_0",
        "blocks_1",
        "ln_f",
        "lm_head",
    ]
    assert p.layers[4].op == "Block()" and p.layers[4].target == "blocks.0"
    assert p.layers[4].output_bytes == (2 * 32 * 64 * 4,)
    assert (p.model, p.batch_size, p.input_shape, p.dtype, p.device) == (
        "gpt2-tiny",
        2,
        (32,),
        "float32",
        "cpu",
    )
    assert p.source == "planner" and p.torch_version == torch.__version__
    assert p.leaf_modules == ("Block",) and p.threads == 1 and (p.warmup, p.reps) == (1, 3)
    assert p.graph_hash == capture(GPT(GPT_CONFIGS["gpt2-tiny"]), ["Block"]).graph_hash
    assert p.machine and datetime.datetime.fromisoformat(p.created)
    assert p.whole_step_ms is not None and p.whole_step_ms > 0
    assert_layers_add_up(p)
    assert p.allocator == ("keep-freed" if glibc_available() else "default")
    assert p.device_name is None
    assert Profile.from_json(p.to_json()) == p
    p.save(tmp_path / "p.json")
    assert Profile.load(tmp_path / "p.json") == p


def assert_layers_add_up(p: Profile) -> None:
    """Per-layer times add up to the whole step within 10%, calibrated or not; a calibrated
    profile's times are its raw medians scaled to the whole step, and it says by how much."""
    assert p.whole_step_ms is not None and p.whole_step_ms > 0
    assert abs(p.total_compute_ms / p.whole_step_ms - 1) <= 0.10
    raw = sum(
        statistics.median(layer.forward_samples_ms) + statistics.median(layer.backward_samples_ms)
        for layer in p.layers
    )
    if p.calibration is None:
        assert raw == pytest.approx(p.total_compute_ms)
    else:
        assert p.total_compute_ms == pytest.approx(p.whole_step_ms, rel=1e-9)
        assert f"summed to {raw:.3f} ms against a whole step of {p.whole_step_ms:.3f} ms" in (
            p.calibration
        )


def test_rescale_keeps_parameters_and_scales_times_and_activations():
    p = profile_model(
        "gpt2-tiny", batch_size=2, leaf_modules=["Block"], warmup=0, reps=1, progress=False
    )
    q = p.rescale(8)
    assert q.rescaled_from_batch_size == 2 and q.batch_size == 8
    assert q.total_parameter_bytes == p.total_parameter_bytes
    for a, b in zip(p.layers, q.layers, strict=True):
        assert b.forward_ms == pytest.approx(4 * a.forward_ms)
        assert b.backward_ms == pytest.approx(4 * a.backward_ms)
        assert b.output_bytes == tuple(4 * x for x in a.output_bytes)
        assert b.buffer_bytes == a.buffer_bytes
    assert Profile.from_json(q.to_json()) == q


def test_progress_bar_goes_to_stderr(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    profile_module(net, (torch.randn(2, 4),), model_name="tiny-net", progress=True, reps=1)
    assert "profiling tiny-net" in capsys.readouterr().err


def test_untraceable_model_raises_model_error():
    class Gate(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ModelError, match=r"control flow.*--leaf-modules"):
        profile_module(Gate(), (torch.randn(2, 2),))


def test_bad_settings_raise_profile_error():
    net = torch.nn.Linear(2, 2)
    for kwargs in ({"reps": 0}, {"warmup": -1}, {"threads": 0}):
        with pytest.raises(ProfileError):
            profile_module(net, (torch.randn(1, 2),), **kwargs)
    with pytest.raises(ProfileError, match="batched tensor"):
        profile_module(net, ())


def test_keep_freed_memory_nests():
    from planner.profile import timing

    with keep_freed_memory() as applied, keep_freed_memory():
        torch.empty(64 << 20, dtype=torch.uint8)  # a 64 MiB allocation, mmap-sized by default
        assert timing._kept == (2 if applied else 0)
    assert isinstance(applied, bool) and timing._kept == 0


@pytest.mark.slow
def test_resnet50_profile_at_batch_8():
    p = profile_model("resnet50", batch_size=8, warmup=0, reps=1, progress=False)
    assert p.total_parameter_bytes == 25_557_032 * 4
    assert p.layers[p.index("conv1")].output_bytes == (8 * 64 * 112 * 112 * 4,)
    assert all(len(layer.inputs) == 2 for layer in p.layers if layer.op == "add")
    assert all(i < index for index, layer in enumerate(p.layers) for i in layer.inputs)
    assert p.whole_step_ms is not None
    assert_layers_add_up(p)
    assert Profile.from_json(p.to_json()) == p


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_synchronizes_and_records_the_gpu():
    p = profile_model("gpt2-tiny", batch_size=2, device="cuda", progress=False)
    assert p.device == "cuda" and torch.cuda.get_device_name() in (p.machine or "")
    assert all(layer.forward_ms >= 0 for layer in p.layers)
    assert p.whole_step_ms is not None and p.whole_step_ms > 0


def test_the_clock_is_recorded_as_timer():
    import time as _time

    import torch as _torch

    from planner.profile.measure import profile_module

    _torch.manual_seed(0)
    net = _torch.nn.Sequential(_torch.nn.Linear(4, 4), _torch.nn.ReLU())
    x = _torch.randn(2, 4)
    assert profile_module(net, (x,), warmup=0, reps=1, calibrate=False).timer == "wall"
    cpu = profile_module(net, (x,), warmup=0, reps=1, calibrate=False, clock=_time.process_time)
    assert cpu.timer == "cpu"
