"""Device and backend of each rank, with CUDA mocked (nobody here has a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_helpers import make_plan, with_profile

from planner.runtime.config import Backend, RunConfig, RunError, resolve_backend
from planner.runtime.loops import condition_notes
from planner.runtime.worker import rank_device


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Set how many GPUs torch sees."""

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")

    return set_count


def test_each_rank_takes_its_local_gpu_under_nccl() -> None:
    assert rank_device("nccl", 0) == torch.device("cuda", 0)
    assert rank_device("nccl", 3) == torch.device("cuda", 3)
    assert rank_device("gloo", 3) == torch.device("cpu")


def test_auto_picks_nccl_only_when_every_local_rank_has_a_gpu(gpus) -> None:  # type: ignore[no-untyped-def]
    gpus(4)
    assert resolve_backend(Backend.AUTO, local_ranks=4) == "nccl"
    assert resolve_backend(Backend.AUTO, local_ranks=5) == "gloo"
    assert resolve_backend(Backend.GLOO, local_ranks=2) == "gloo"
    with pytest.raises(RunError, match="one GPU per local rank: 5 ranks but 4 GPUs"):
        resolve_backend(Backend.NCCL, local_ranks=5)
    gpus(0)
    assert resolve_backend(Backend.AUTO, local_ranks=1) == "gloo"
    with pytest.raises(RunError, match="needs CUDA"):
        resolve_backend(Backend.NCCL, local_ranks=1)


def test_cpu_fallback_on_a_gpu_machine_says_so(gpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plan = with_profile(make_plan("runtime_models:mlp", cuts=["_3"], replicas=[1, 1]), tmp_path)
    config = RunConfig(plan_path=str(tmp_path / "plan.json"), threads=1)
    gpus(1)
    notes = condition_notes(plan, config, backend="gloo")
    assert any("running on the CPU with gloo although this machine has 1 GPU" in n for n in notes)
    # a CPU profile run on the GPU: its times do not apply
    notes = condition_notes(plan, config, backend="nccl")
    assert notes == [
        "the profile was measured on cpu, this run computes on cuda: predicted times do not "
        "apply; profile on the device you run on"
    ]
    gpus(0)
    assert condition_notes(plan, config, backend="gloo") == []
    notes = condition_notes(plan, RunConfig(plan_path=config.plan_path, threads=2), backend="gloo")
    assert notes == []  # the made-up profile records no threads: nothing to compare


def test_run_conditions_against_a_recorded_profile(gpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from planner.plan import file_sha256
    from planner.profile.format import Profile

    gpus(0)
    plan = with_profile(make_plan("runtime_models:mlp", cuts=["_3"], replicas=[1, 1]), tmp_path)
    profile = Profile.load(tmp_path / "profile.json")
    profile = dataclasses.replace(profile, threads=1, timer="cpu", allocator="keep-freed")
    profile.save(tmp_path / "profile.json")
    plan = dataclasses.replace(
        plan,
        profile=dataclasses.replace(plan.profile, sha256=file_sha256(tmp_path / "profile.json")),
    )
    plan.save(tmp_path / "plan.json")
    same = RunConfig(plan_path=str(tmp_path / "plan.json"), threads=1)
    assert condition_notes(plan, same, backend="gloo") == []
    (note,) = condition_notes(plan, dataclasses.replace(same, threads=2), backend="gloo")
    assert "measured with 1 threads per process, this run uses 2" in note


@pytest.mark.distributed
def test_plan_run_says_how_it_differs_before_training(tmp_path: Path) -> None:
    import dataclasses
    import os
    import subprocess
    import sys

    from planner.plan import file_sha256
    from planner.profile.format import Profile

    here = Path(__file__).resolve().parent
    plan = with_profile(make_plan("runtime_models:mlp", cuts=["_3"], replicas=[1, 1]), tmp_path)
    profile = dataclasses.replace(
        Profile.load(tmp_path / "profile.json"), threads=1, timer="cpu", allocator="keep-freed"
    )
    profile.save(tmp_path / "profile.json")
    ref = dataclasses.replace(plan.profile, sha256=file_sha256(tmp_path / "profile.json"))
    dataclasses.replace(plan, profile=ref).save(tmp_path / "plan.json")
    path = os.pathsep.join([str(here), str(here.parent.parent), os.environ.get("PYTHONPATH", "")])
    argv = ["plan.json", "--steps", "2", "--threads", "2", "--optimizer", "adam"]
    ran = subprocess.run(
        [sys.executable, "-m", "planner.commands.run", *argv, "--trust-model", "--backend", "gloo"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 1/2"))
    notes = [line for line in lines[:first_step] if line.startswith("plan run: the ")]
    assert len(notes) == 2, lines[:first_step]
    assert "the plan assumed optimizer sgd; training with adam" in notes[0]
    assert "measured with 1 threads per process, this run uses 2" in notes[1]
