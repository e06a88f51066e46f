"""Profile and run conditions: defaults that agree, and one line per difference."""

from __future__ import annotations

import argparse

import pytest
import torch

from planner.commands.profile import add_arguments, measure
from planner.profile import conditions
from planner.profile.conditions import (
    RunConditions,
    cuda_device_name,
    default_clock,
    differences,
    rank_threads,
)

CPU_RUN = RunConditions(device="cpu", threads=1, allocator="keep-freed")


def _diff(run: RunConditions = CPU_RUN, **profile):  # type: ignore[no-untyped-def]
    fields = dict(device="cpu", threads=1, timer="cpu", allocator="keep-freed", device_name=None)
    return differences(**(fields | profile), run=run)


def test_rank_threads_divide_the_cores_among_the_ranks() -> None:
    assert rank_threads(ranks_on_host=2, cores=2) == 1
    assert rank_threads(ranks_on_host=2, cores=16) == 8
    assert rank_threads(ranks_on_host=3, cores=16) == 5
    assert rank_threads(ranks_on_host=8, cores=2) == 1  # never 0
    assert rank_threads(ranks_on_host=0, cores=4) == 4


def test_clock_is_cpu_time_only_for_one_cpu_thread() -> None:
    assert default_clock("cpu", 1) == "cpu"
    assert default_clock("cpu", 2) == "wall"
    assert default_clock("cuda", 1) == "wall"


def test_same_conditions_say_nothing() -> None:
    assert _diff() == []
    assert _diff(threads=None, timer=None, allocator=None) == []  # not recorded: not compared


def test_each_difference_is_one_line() -> None:
    (line,) = _diff(threads=4, timer="wall")
    assert "measured with 4 threads per process, this run uses 1" in line
    assert "--threads 4" in line
    (line,) = _diff(allocator="default")
    assert "'default', this run uses 'keep-freed'" in line
    lines = _diff(threads=2, timer="cpu")
    assert len(lines) == 2 and "adds the threads' times up" in lines[1]
    (line,) = _diff(device="cuda", device_name="A100")
    assert "measured on cuda, this run computes on cpu" in line
    assert all("\n" not in line for line in _diff(threads=3, allocator="default", device="cuda"))


def test_gpu_name_mismatch_is_reported() -> None:
    run = RunConditions(device="cuda", threads=1, device_name="NVIDIA H100")
    (line,) = _diff(run, device="cuda", device_name="NVIDIA A100", threads=8, timer="wall")
    assert "measured on NVIDIA A100, this run uses NVIDIA H100" in line
    # threads do not matter for GPU compute
    assert _diff(run, device="cuda", device_name="NVIDIA H100", threads=8, timer="wall") == []


def test_cuda_device_name_with_cuda_mocked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"GPU {i}")
    assert cuda_device_name(1) == "GPU 1"
    assert cuda_device_name(2) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_device_name(0) is None


def _profile_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", "gpt2-tiny", "--batch-size", "2", "-o", "x", *argv])


@pytest.mark.parametrize(
    ("argv", "ranks", "cores", "threads", "clock"),
    [
        ((), None, 2, 1, "cpu"),  # plan profile: a rank of a 2-rank local run
        ((), None, 8, 4, "wall"),
        ((), 8, 8, 1, "cpu"),  # plan --gpus 8: a rank of that plan
        (("--threads", "3"), None, 8, 3, "wall"),
        (("--clock", "wall"), None, 2, 1, "wall"),
    ],
)
def test_profile_command_defaults_follow_the_rank(
    monkeypatch: pytest.MonkeyPatch,
    argv: tuple[str, ...],
    ranks: int | None,
    cores: int,
    threads: int,
    clock: str,
) -> None:
    import time

    import planner.profile.measure as measure_module

    seen: dict = {}
    monkeypatch.setattr(conditions, "_cores", lambda: cores)
    monkeypatch.setattr(measure_module, "profile_model", lambda spec, **kw: seen.update(kw))
    measure(_profile_args(*argv), 2, ranks_on_host=ranks)
    assert seen["threads"] == threads
    assert seen.get("clock", time.perf_counter) is (
        time.process_time if clock == "cpu" else time.perf_counter
    )


def test_profiling_options_with_a_shipped_profile_say_they_do_nothing(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    from planner.cli import main

    out = str(tmp_path / "p.json")
    assert main(["--model", "resnet50", "--gpus", "2", "--threads", "2", "-o", out]) == 0
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "only matter when profiling" in x]
    assert line.startswith("--threads only matter when profiling and the shipped profile")
    assert main(["--model", "resnet50", "--gpus", "2", "-o", out]) == 0
    assert "only matter when profiling" not in capsys.readouterr().err


def test_cuda_timer_synchronises_before_every_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    from planner.profile.timing import Timer

    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    ticks = iter([1.0, 2.5])
    timer = Timer(lambda: next(ticks), torch.device("cuda", 1))
    assert (timer(), timer()) == (1.0, 2.5)
    assert calls == [torch.device("cuda", 1)] * 2
    Timer(lambda: 0.0, torch.device("cpu"))()
    assert len(calls) == 2  # the CPU clock needs no synchronisation
