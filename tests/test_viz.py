"""Pictures: the PNGs are written atomically, have the expected size and show something."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from planner.plan import Plan, PlanStage, Prediction, ProfileRef
from planner.profile.format import LayerProfile, Profile
from planner.rank_schedules import stage_ranks
from planner.schedules import PER_STAGE_SCHEDULES, OptimizerKind, Schedule
from planner.simulate import SimStage, SimulationResult, simulate, simulate_stages
from planner.topology import Topology
from planner.viz import (
    COLORS,
    default_until_s,
    draw_gantt,
    draw_memory,
    draw_partition,
    gantt_figure,
)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def colours(path: Path) -> set[tuple[int, ...]]:
    pixels = (imread(path)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    return {tuple(p) for p in np.unique(pixels, axis=0)}


def hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def small_run(schedule: Schedule = Schedule.ONE_F_ONE_B) -> SimulationResult:
    stages = [
        SimStage(
            forward_s=2e-3,
            backward_s=4e-3,
            ranks=(0, 1),
            send_bytes=2e7,
            allreduce_s=1e-3,
            static_bytes=2e9,
            activation_bytes=3e8,
        ),
        SimStage(
            forward_s=1e-3,
            backward_s=2e-3,
            ranks=(2,),
            send_bytes=1e7,
            static_bytes=1e9,
            activation_bytes=2e8,
        ),
        SimStage(
            forward_s=1e-3, backward_s=2e-3, ranks=(3,), static_bytes=1e9, activation_bytes=1e8
        ),
    ]
    return simulate_stages(
        stages,
        schedule=schedule,
        microbatches=4,
        minibatches=3,
        topology=Topology.from_args(gpus=4, bandwidth_gbps=10),
    )


@pytest.mark.parametrize("schedule", list(PER_STAGE_SCHEDULES))
def test_gantt_png(tmp_path: Path, schedule: Schedule) -> None:
    path = tmp_path / "sub" / "gantt.png"
    draw_gantt(small_run(schedule), path)
    assert png_size(path) == (1200, int(100 * (1.8 + 0.42 * 4)))
    assert 10_000 < path.stat().st_size < 200_000
    seen = colours(path)
    for kind in ("forward", "backward", "communication", "allreduce"):
        assert hex_rgb(COLORS[kind]) in seen, kind
    assert [p.name for p in path.parent.iterdir()] == ["gantt.png"]  # no temporary left


def test_gantt_shows_two_flushed_minibatches_by_default() -> None:
    r = small_run(Schedule.GPIPE)
    ends = r.events.groupby("minibatch")["end_s"].max().to_numpy()
    assert default_until_s(r) == ends[1]
    axes = gantt_figure(r, title="custom").axes[0]
    assert axes.get_title(loc="left") == "custom"
    labels = [t.get_text() for t in axes.get_yticklabels()]
    assert labels == [
        "rank 0 / stage 0",
        "rank 1 / stage 0",
        "rank 2 / stage 1",
        "rank 3 / stage 2",
    ]
    assert axes.get_xlabel() == "time (ms)"


def test_memory_png(tmp_path: Path) -> None:
    path = tmp_path / "memory.png"
    draw_memory(small_run(), path)
    assert png_size(path) == (1200, 460)
    assert hex_rgb(COLORS["limit"]) in colours(path)  # the device memory line


def test_partition_png(tmp_path: Path) -> None:
    layers = tuple(
        LayerProfile(
            name=f"l{i}",
            op="Linear",
            forward_ms=1.0 + i % 3,
            backward_ms=2.0,
            output_bytes=(1000,),
            parameter_bytes=100,
            inputs=(i - 1,) if i else (),
        )
        for i in range(12)
    )
    profile = Profile(model="chain", batch_size=8, layers=layers)
    bounds = [(0, 6), (6, 9), (9, 12)]
    replicas = [2, 1, 1]
    stages, rank = [], 0
    for (lo, hi), m in zip(bounds, replicas, strict=True):
        stages.append(
            PlanStage(
                layers=tuple(f"l{i}" for i in range(lo, hi)),
                replicas=m,
                ranks=tuple(range(rank, rank + m)),
                compute_s=0.0,
                comm_s=0.0,
                allreduce_s=0.0,
                time_s=0.0,
                memory_bytes=0.0,
            )
        )
        rank += m
    plan = Plan(
        profile=ProfileRef(path="chain.json", sha256="0" * 64, model="chain", batch_size=8),
        topology=Topology.from_args(gpus=4),
        schedule=Schedule.ONE_F_ONE_B,
        optimizer=OptimizerKind.SGD,
        minibatch_size=16,
        microbatch_size=4,
        microbatches=4,
        stages=tuple(stages),
        predicted=Prediction(
            bottleneck_s=1.0,
            minibatch_s=1.0,
            samples_per_s=16.0,
            single_device_s=1.0,
            data_parallel_s=None,
        ),
    )
    path = tmp_path / "partition.png"
    draw_partition(plan, profile, path)
    assert png_size(path) == (1200, 520)
    assert path.stat().st_size > 10_000
    path2 = tmp_path / "gantt.png"
    draw_gantt(simulate(plan, profile), path2)
    assert path2.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("schedule", "chunks"),
    [
        (Schedule.INTERLEAVED_1F1B, 2),
        (Schedule.ZB_H1, 1),
        (Schedule.ZBV, 2),
    ],
    ids=str,
)
def test_gantt_shows_chunks_and_split_backward(
    tmp_path: Path, schedule: Schedule, chunks: int
) -> None:
    layout = stage_ranks(schedule, ranks=3, chunks=chunks)
    stages = [
        SimStage(
            forward_s=2e-3,
            backward_s=4e-3,
            backward_weight_s=2e-3,
            ranks=(layout[s],),
            send_bytes=1e7,
            activation_bytes=1e8,
        )
        for s in range(3 * chunks)
    ]
    r = simulate_stages(
        stages,
        schedule=schedule,
        microbatches=6,
        chunks=chunks,
        topology=Topology.from_args(gpus=3, bandwidth_gbps=10),
    )
    path = tmp_path / "gantt.png"
    draw_gantt(r, path)
    seen = colours(path)
    split = schedule is not Schedule.INTERLEAVED_1F1B
    kinds = ("forward", "backward_input", "backward_weight") if split else ("forward", "backward")
    for kind in kinds:
        assert hex_rgb(COLORS[kind]) in seen, kind
    assert (hex_rgb(COLORS["backward"]) in seen) is not split
    axes = gantt_figure(r, until_s=r.first_minibatch_s).axes[0]  # wide enough for labels
    labels = [t.get_text() for t in axes.get_yticklabels()]
    texts = {t.get_text() for t in axes.texts}
    legend = {t.get_text() for t in axes.figure.legends[0].get_texts()}
    if chunks == 2:
        assert labels[0] == (
            "rank 0 / stages 0,5" if schedule is Schedule.ZBV else "rank 0 / stages 0,3"
        )
        assert {"a0", "b0"} <= texts
        assert "lighter: a later chunk (a, b, ...)" in legend
    else:
        assert labels[0] == "rank 0 / stage 0" and "0" in texts
    if split:
        assert "backward, weight gradient (W)" in legend
