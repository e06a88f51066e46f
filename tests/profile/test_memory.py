"""The profiling memory estimate: exact on hand-counted models, and the refusal it drives."""

from __future__ import annotations

import pytest
import torch

from planner.errors import ProfileError
from planner.profile.measure import profile_model
from planner.profile.memory import (
    MemoryEstimate,
    available_bytes,
    check_profiling_memory,
    estimate_profiling_memory,
)


def test_mlp_activations_counted_by_hand() -> None:
    net = torch.nn.Sequential(
        torch.nn.Linear(100, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10)
    )
    est = estimate_profiling_memory(net, (torch.randn(8, 100),))
    params = (100 * 1000 + 1000 + 1000 * 10 + 10) * 4
    assert (est.parameter_bytes, est.gradient_bytes) == (params, params)
    # outputs: 8x1000 (linear), 8x1000 (relu), 8x10; saved: the input 8x100 (the relu output,
    # saved by relu and the second linear, is counted once; the weights not at all)
    assert est.activation_bytes == (8 * 1000 + 8 * 1000 + 8 * 10 + 8 * 100) * 4
    assert est.batch_size == 8 and est.total_bytes == 2 * params + est.activation_bytes


def test_batchnorm_statistics_are_left_alone() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    before = net[1].running_mean.clone()
    est = estimate_profiling_memory(net, (torch.randn(8, 4),))
    # outputs 8x4 twice, the input 8x4, BatchNorm's saved mean and inverse std (4 each)
    assert est.activation_bytes == (3 * 8 * 4 + 2 * 4) * 4
    assert int(net[1].num_batches_tracked) == 0
    torch.testing.assert_close(net[1].running_mean, before)


def test_largest_batch_and_rescaling() -> None:
    est = MemoryEstimate(
        batch_size=4, parameter_bytes=1000, gradient_bytes=1000, activation_bytes=400
    )
    assert est.at(8).activation_bytes == 800 and est.at(8).new_bytes == 1800
    assert est.largest_batch(1000 + 100 * 10) == 10
    assert est.largest_batch(1099) == 0  # gradients alone nearly fill it: not even one sample


def test_refusal_names_the_numbers_and_the_option() -> None:
    est = MemoryEstimate(
        batch_size=32, parameter_bytes=2 << 30, gradient_bytes=1 << 30, activation_bytes=32 << 30
    )
    check_profiling_memory(est, model="m", option="--batch-size", budget_bytes=40 << 30)
    with pytest.raises(ProfileError) as info:
        check_profiling_memory(
            est, model="gpt", option="--profile-batch-size", budget_bytes=9 << 30
        )
    message = str(info.value)
    assert "profiling gpt at batch 32 needs about 33.00 GiB" in message
    assert "(9.00 GiB); pass --profile-batch-size 8" in message and "\n" not in message
    with pytest.raises(ProfileError, match="even batch 1 does not fit"):
        check_profiling_memory(est, model="gpt", option="--batch-size", budget_bytes=1 << 30)


def test_available_memory_is_read() -> None:
    free = available_bytes()
    assert free is None or free > 0


def test_profile_model_refuses_or_fits_the_batch(capsys: pytest.CaptureFixture[str]) -> None:
    one = estimate_profiling_memory(
        *_gpt_tiny_batch(4), leaf_modules=()
    )  # the budget below fits 2 of 4 samples
    budget = one.gradient_bytes + one.activation_bytes / 4 * 2.5
    with pytest.raises(ProfileError, match="pass --batch-size 2"):
        profile_model("gpt2-tiny", batch_size=4, memory_budget_bytes=budget, progress=False)
    p = profile_model(
        "gpt2-tiny",
        batch_size=4,
        memory_budget_bytes=budget,
        fit_batch=True,
        batch_option="--profile-batch-size",
        warmup=0,
        reps=1,
        progress=False,
    )
    assert p.batch_size == 2
    assert "profiling gpt2-tiny at batch 2: batch 4 would need" in capsys.readouterr().err


def _gpt_tiny_batch(batch: int) -> tuple[torch.nn.Module, tuple]:
    from planner.models import load_model

    spec = load_model("gpt2-tiny", batch_size=batch)
    inputs, _ = spec.make_batch(batch, 0)
    return spec.module, inputs
