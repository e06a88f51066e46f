"""The simulator: closed forms, replication, communication, memory, and agreement with the
optimizer's objective on real profiles."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from planner.commands import simulate as simulate_command
from planner.errors import PlanError, PlannerError, ProfileError
from planner.plan import Plan, PlanStage, Prediction, ProfileRef, file_sha256
from planner.profile.format import LayerProfile, Profile
from planner.rank_schedules import rank_in_flight, stage_ranks
from planner.schedules import (
    PER_STAGE_SCHEDULES,
    RANK_SCHEDULES,
    OptimizerKind,
    Schedule,
    format_ops,
    replica_order,
)
from planner.simulate import (
    COMPUTE_KINDS,
    EVENT_COLUMNS,
    EVENT_KINDS,
    SimStage,
    compare_schedules,
    default_minibatches,
    plan_stages,
    ring_allreduce_s,
    simulate,
    simulate_stages,
    steady_window,
    virtual_stages,
)
from planner.simulate_costs import balanced_starts, rank_balanced_starts
from planner.topology import GB, Level, Topology

ALL = list(PER_STAGE_SCHEDULES)
SYNC = [Schedule.ONE_F_ONE_B, Schedule.GPIPE]


def equal_stages(num: int, f: float = 1.0, b: float = 2.0, **kw: float) -> list[SimStage]:
    return [SimStage(forward_s=f, backward_s=b, ranks=(s,), **kw) for s in range(num)]


def chain_profile(
    times_ms: Sequence[tuple[float, float]],
    *,
    activation: int = 1000,
    params: int = 100,
    skips: Sequence[tuple[int, int]] = (),
) -> Profile:
    """A chain of layers (plus ``skips`` edges ``(src, dst)``) at batch size 4."""
    layers = []
    for i, (f, b) in enumerate(times_ms):
        inputs = ((i - 1,) if i else ()) + tuple(src for src, dst in skips if dst == i)
        layers.append(
            LayerProfile(
                name=f"l{i}",
                op="Linear",
                forward_ms=f,
                backward_ms=b,
                output_bytes=(activation,),
                parameter_bytes=params,
                inputs=inputs,
            )
        )
    return Profile(model="chain", batch_size=4, layers=tuple(layers))


def make_plan(
    profile: Profile,
    cuts: Sequence[int],
    replicas: Sequence[int],
    *,
    schedule: Schedule = Schedule.ONE_F_ONE_B,
    microbatches: int = 4,
    microbatch_size: int = 4,
    topology: Topology | None = None,
    optimizer: OptimizerKind = OptimizerKind.SGD,
    recompute: bool = False,
) -> Plan:
    """A plan with stages starting at layer indices ``cuts`` (the first is 0)."""
    bounds = [*cuts, len(profile.layers)]
    stages, rank = [], 0
    for s, count in enumerate(replicas):
        names = tuple(layer.name for layer in profile.layers[bounds[s] : bounds[s + 1]])
        stages.append(
            PlanStage(
                layers=names,
                replicas=count,
                ranks=tuple(range(rank, rank + count)),
                compute_s=0.0,
                comm_s=0.0,
                allreduce_s=0.0,
                time_s=0.0,
                memory_bytes=0.0,
            )
        )
        rank += count
    topology = topology or Topology.from_args(gpus=rank)
    return Plan(
        profile=ProfileRef(
            path="chain.json", sha256="0" * 64, model=profile.model, batch_size=profile.batch_size
        ),
        topology=topology,
        schedule=schedule,
        optimizer=optimizer,
        minibatch_size=microbatches * microbatch_size,
        microbatch_size=microbatch_size,
        microbatches=microbatches,
        stages=tuple(stages),
        predicted=Prediction(
            bottleneck_s=1.0,
            minibatch_s=1.0,
            samples_per_s=1.0,
            single_device_s=1.0,
            data_parallel_s=None,
        ),
        recompute=recompute,
    )


# --- closed forms ------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SYNC)
@pytest.mark.parametrize(
    ("stages", "microbatches"), [(1, 1), (2, 4), (4, 4), (4, 8), (4, 2), (3, 1), (8, 16)]
)
def test_flushed_schedules_take_m_plus_s_minus_1_slots(
    schedule: Schedule, stages: int, microbatches: int
) -> None:
    r = simulate_stages(
        equal_stages(stages), schedule=schedule, microbatches=microbatches, minibatches=3
    )
    slots = microbatches + stages - 1
    assert r.minibatch_s == pytest.approx(slots * 3.0, abs=1e-12)
    assert r.first_minibatch_s == pytest.approx(slots * 3.0, abs=1e-12)
    for d in r.devices:  # the bubble: (S - 1) of M + S - 1 slots
        assert d.idle_fraction == pytest.approx((stages - 1) / slots, abs=1e-12)


@pytest.mark.parametrize(("stages", "microbatches"), [(1, 1), (2, 4), (4, 1), (4, 8), (8, 2)])
def test_pipedream_steady_state_is_the_slowest_stage(stages: int, microbatches: int) -> None:
    times = [1.0 + (3 * s) % 5 for s in range(stages)]  # unequal stages
    sim = [SimStage(forward_s=t, backward_s=2 * t, ranks=(s,)) for s, t in enumerate(times)]
    r = simulate_stages(sim, schedule=Schedule.PIPEDREAM, microbatches=microbatches)
    assert r.minibatch_s == pytest.approx(microbatches * 3 * max(times), rel=1e-12)
    assert r.critical_stage == times.index(max(times))
    assert r.devices[r.critical_stage].idle_fraction == pytest.approx(0.0, abs=1e-12)


def test_more_minibatches_do_not_change_a_flushed_minibatch() -> None:
    sim = [SimStage(forward_s=1.0 + s, backward_s=2.0, ranks=(s,)) for s in range(3)]
    times = {
        n: simulate_stages(
            sim, schedule=Schedule.ONE_F_ONE_B, microbatches=4, minibatches=n
        ).minibatch_s
        for n in (1, 2, 5)
    }
    assert times[1] == pytest.approx(times[2]) == pytest.approx(times[5])


def test_transfers_add_two_hops_per_boundary() -> None:
    # 2 stages, 1 GB over a 1 GB/s link both ways: GPipe = (M+S-1)(f+b) + 2(S-1) x 1 s
    topo = Topology(levels=(Level(devices=2, bandwidth_bytes_per_s=1 * GB),), memory_bytes=1e12)
    sim = [
        SimStage(forward_s=2.0, backward_s=4.0, ranks=(0,), send_bytes=1e9),
        SimStage(forward_s=2.0, backward_s=4.0, ranks=(1,)),
    ]
    r = simulate_stages(sim, schedule=Schedule.GPIPE, microbatches=4, minibatches=1, topology=topo)
    assert r.minibatch_s == pytest.approx(5 * 6.0 + 2 * 1.0)
    sends = r.events[r.events["kind"] == "send"]
    assert len(sends) == 8 and set(sends["bytes"]) == {1e9}
    assert len(r.events[r.events["kind"] == "recv"]) == 8
    assert {(link.src, link.dst) for link in r.links} == {(0, 1), (1, 0)}


def test_a_slow_link_serialises_its_transfers() -> None:
    topo = Topology(levels=(Level(devices=2, bandwidth_bytes_per_s=1 * GB),), memory_bytes=1e12)
    sim = [
        SimStage(forward_s=1.0, backward_s=1.0, ranks=(0,), send_bytes=3e9),
        SimStage(forward_s=1.0, backward_s=1.0, ranks=(1,)),
    ]
    r = simulate_stages(sim, schedule=Schedule.GPIPE, microbatches=8, minibatches=1, topology=topo)
    # eight 3 s sends back to back from 1 s to 25 s; stage 1's last forward ends at 26 s and its
    # backwards at 27 + j s; eight gradient sends back to back from 27 s to 51 s; then B7
    assert r.minibatch_s == pytest.approx(52.0)
    for src in (0, 1):
        sends = r.events[(r.events["kind"] == "send") & (r.events["rank"] == src)]
        assert (sends["start_s"].to_numpy()[1:] == sends["end_s"].to_numpy()[:-1]).all()
    assert r.links[0].busy_fraction == pytest.approx(24 / 52)


# --- replication ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ALL)
def test_replicas_take_microbatches_round_robin_in_schedule_order(schedule: Schedule) -> None:
    sim = [
        SimStage(forward_s=3.0, backward_s=6.0, ranks=(0, 1, 2), allreduce_s=0.5),
        SimStage(forward_s=1.0, backward_s=2.0, ranks=(3,)),
    ]
    r = simulate_stages(sim, schedule=schedule, microbatches=6, minibatches=2)
    compute = r.events[r.events["kind"].isin(["forward", "backward"])]
    for (stage, replica), rows in compute.groupby(["stage", "replica"]):
        assert set(rows["microbatch"] % len(sim[stage].ranks)) == {replica}
        ops = rows.sort_values("start_s", kind="stable")
        seen = " ".join(
            f"{'F' if k == 'forward' else 'B'}{m % 6}"
            for k, m in zip(ops["kind"], ops["microbatch"], strict=True)
        )
        want = replica_order(
            schedule,
            replicas=(3, 1),
            stage=stage,
            replica=replica,
            microbatches=12 if schedule is Schedule.PIPEDREAM else 6,
        )
        expected = format_ops(want) if schedule is Schedule.PIPEDREAM else format_ops(want * 2)
        if schedule is Schedule.PIPEDREAM:
            expected = " ".join(f"{t[0]}{int(t[1:]) % 6}" for t in expected.split())
        assert seen == expected
    reduces = r.events[r.events["kind"] == "allreduce"]
    # flushed: once per minibatch on each replica; pipedream: once per round of 3 microbatches
    rounds = 4 if schedule is Schedule.PIPEDREAM else 2
    assert sorted(reduces["rank"]) == sorted([0, 1, 2] * rounds)
    assert (reduces["end_s"] - reduces["start_s"]).eq(0.5).all()


def test_three_to_one_replication_reaches_the_analytic_rate() -> None:
    # stage 0: 9 s per microbatch over 3 replicas = 3 s; stage 1: 3 s; all-reduce 0.5 s
    sim = [
        SimStage(forward_s=3.0, backward_s=6.0, ranks=(0, 1, 2), allreduce_s=0.5),
        SimStage(forward_s=1.0, backward_s=2.0, ranks=(3,)),
    ]
    r = simulate_stages(sim, schedule=Schedule.PIPEDREAM, microbatches=6, minibatches=12)
    assert r.minibatch_s == pytest.approx(6 * (9.0 + 0.5) / 3)  # PipeDream: (C + A) / m
    gpipe = simulate_stages(sim, schedule=Schedule.GPIPE, microbatches=6, minibatches=2)
    # stage 1 runs F0..F5 from 3 s to 9 s, B0..B5 until 21 s; replica 2 of stage 0 gets B5's
    # gradient at 21 s, ends at 27 s; then the 0.5 s all-reduce
    assert gpipe.minibatch_s == pytest.approx(27.5)


@pytest.mark.parametrize("schedule", ALL)
def test_data_parallel_alone(schedule: Schedule) -> None:
    sim = [SimStage(forward_s=1.0, backward_s=2.0, ranks=(0, 1, 2, 3), allreduce_s=0.25)]
    r = simulate_stages(sim, schedule=schedule, microbatches=8, minibatches=6)
    if schedule is Schedule.PIPEDREAM:  # one all-reduce per round of 4 microbatches
        assert r.minibatch_s == pytest.approx(2 * (3.0 + 0.25))
        assert all(d.allreduce_fraction == pytest.approx(0.25 / 3.25) for d in r.devices)
    else:
        assert r.minibatch_s == pytest.approx(2 * 3.0 + 0.25)
        assert all(d.allreduce_fraction == pytest.approx(0.25 / 6.25) for d in r.devices)


def test_pipedream_with_one_microbatch_reduces_once_per_round_of_replicas() -> None:
    sim = [
        SimStage(forward_s=1.0, backward_s=2.0, ranks=(0, 1), allreduce_s=0.5),
        SimStage(forward_s=0.5, backward_s=1.0, ranks=(2,)),
    ]
    r = simulate_stages(sim, schedule=Schedule.PIPEDREAM, microbatches=1, minibatches=40)
    reduces = r.events[(r.events["kind"] == "allreduce") & (r.events["rank"] == 0)]
    assert len(reduces) == 20
    assert r.minibatch_s == pytest.approx((2 * 3.0 / 2 + 0.5) / 2)  # PipeDream: (compute + ar) / m


def test_ring_allreduce_uses_the_slowest_level_spanned() -> None:
    topo = Topology.from_args(
        gpus=8, gpus_per_node=4, bandwidth_gbps=10, inter_node_bandwidth_gbps=1
    )
    assert ring_allreduce_s(topo, (0,), 1e9) == 0.0
    assert ring_allreduce_s(topo, (0, 1), 1e9) == pytest.approx(2 * 0.5 * 1e9 / 10e9)
    assert ring_allreduce_s(topo, (2, 3, 4, 5), 1e9) == pytest.approx(2 * 0.75 * 1e9 / 1e9)


# --- memory ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "held"),
    [
        (Schedule.GPIPE, [8, 8, 8]),
        (Schedule.ONE_F_ONE_B, [3, 2, 1]),
        (Schedule.PIPEDREAM, [3, 2, 1]),
    ],
)
def test_peak_memory_counts_microbatches_in_flight(schedule: Schedule, held: list[int]) -> None:
    sim = equal_stages(
        3,
        static_bytes=100.0,
        activation_bytes=10.0,
        stash_bytes=1.0 if schedule is Schedule.PIPEDREAM else 0.0,
    )
    r = simulate_stages(sim, schedule=schedule, microbatches=8, minibatches=2)
    for d, n in zip(r.devices, held, strict=True):
        stash = (n - 1) if schedule is Schedule.PIPEDREAM else 0
        assert d.peak_memory_bytes == pytest.approx(100 + 10 * n + stash)
    trace = r.memory[r.memory["rank"] == 0]
    assert trace["bytes"].iloc[0] == 100 and trace["bytes"].iloc[-1] == 100
    assert trace["time_s"].is_monotonic_increasing


def test_plan_memory_follows_optimizer_and_recompute() -> None:
    profile = chain_profile([(1.0, 2.0)] * 4, activation=1000, params=100)
    adam = plan_stages(
        make_plan(profile, [0, 2], [1, 1], optimizer=OptimizerKind.ADAM, microbatch_size=8), profile
    )
    assert adam[0].static_bytes == 4 * 200  # weights, gradients, two Adam buffers
    assert adam[0].activation_bytes == 2 * 2000  # two layers' outputs at twice the batch
    again = plan_stages(
        make_plan(profile, [0, 2], [1, 1], recompute=True, microbatch_size=8), profile
    )
    assert again[1].activation_bytes == 2000  # only the stage's input
    assert again[1].backward_extra_bytes == 4000
    assert again[1].backward_s == pytest.approx(3 * 2 * 2.0 / 1e3)  # forward again + backward


# --- from a plan -----------------------------------------------------------------------------


def test_skip_connections_are_relayed_through_middle_stages() -> None:
    # l0 feeds l1 and l3; stages [l0] [l1 l2] [l3]: boundary 0->1 carries l0, 1->2 carries l2 and l0
    profile = chain_profile([(1.0, 1.0)] * 4, activation=1000, skips=[(0, 3)])
    plan = make_plan(profile, [0, 1, 3], [1, 1, 1], microbatch_size=4)
    stages = plan_stages(plan, profile)
    assert [s.send_bytes for s in stages] == [1000, 2000, 0.0]
    r = simulate(plan, profile, minibatches=1)
    sends = r.events[r.events["kind"] == "send"]
    assert set(sends[sends["rank"] == 1]["bytes"]) == {1000, 2000}  # gradients back, activations on


def test_simulate_a_plan_uses_the_rescaled_profile() -> None:
    profile = chain_profile([(1.0, 2.0), (1.0, 2.0), (2.0, 4.0)])
    plan = make_plan(
        profile, [0, 2], [1, 1], schedule=Schedule.GPIPE, microbatches=4, microbatch_size=2
    )
    r = simulate(plan, profile, minibatches=2)
    # per microbatch (half the profiled batch): both stages 1 ms forward, 2 ms backward
    transfer = 2 * plan.topology.transfer_s(500, 0)
    assert r.minibatch_s == pytest.approx((4 + 1) * 3e-3 + transfer)
    assert r.samples_per_s == pytest.approx(8 / r.minibatch_s)
    assert r.memory_limit_bytes == plan.topology.memory_bytes
    assert "samples/s" in r.describe()


def test_a_plan_for_another_profile_is_refused() -> None:
    profile = chain_profile([(1.0, 2.0)] * 3)
    other = chain_profile([(1.0, 2.0)] * 4)
    with pytest.raises(PlanError, match="in no stage"):
        simulate(make_plan(profile, [0, 2], [1, 1]), other)


def test_events_frame_has_the_documented_columns() -> None:
    r = simulate_stages(
        equal_stages(2),
        schedule=Schedule.ONE_F_ONE_B,
        microbatches=2,
        topology=Topology.from_args(gpus=2),
    )
    assert tuple(r.events.columns) == EVENT_COLUMNS
    assert set(r.events["kind"].cat.categories) == set(EVENT_KINDS)
    assert (r.events["end_s"] >= r.events["start_s"]).all()
    assert r.makespan_s == pytest.approx(r.events["end_s"].max())


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"stages": []}, "at least one stage"),
        ({"microbatches": 0}, "at least one microbatch"),
        ({"minibatches": 0}, "at least one minibatch"),
        (
            {
                "stages": [
                    SimStage(forward_s=1, backward_s=1, ranks=(0,)),
                    SimStage(forward_s=1, backward_s=1, ranks=(0,)),
                ]
            },
            "repeat",
        ),
        ({"topology": Topology.from_args(gpus=1)}, "outside the topology"),
    ],
)
def test_bad_inputs_are_refused(bad: dict, message: str) -> None:
    kwargs = {"stages": equal_stages(2), "schedule": Schedule.GPIPE, "microbatches": 2, **bad}
    with pytest.raises(PlanError, match=message):
        simulate_stages(kwargs.pop("stages"), **kwargs)


def test_negative_costs_are_refused() -> None:
    with pytest.raises(PlanError, match="forward_s"):
        SimStage(forward_s=-1.0, backward_s=1.0, ranks=(0,))


def test_steady_window_skips_fill_and_drain() -> None:
    assert steady_window(Schedule.GPIPE, devices=4, microbatches=4, minibatches=1) == (0, 0)
    assert steady_window(Schedule.GPIPE, devices=4, microbatches=4, minibatches=3) == (0, 2)
    lo, hi = steady_window(
        Schedule.PIPEDREAM,
        devices=16,
        microbatches=1,
        minibatches=default_minibatches(Schedule.PIPEDREAM, devices=16, microbatches=1),
    )
    assert lo >= 16 and hi - lo >= 2
    assert math.isfinite(lo)


# --- `plan simulate` -------------------------------------------------------------------------


def _write_plan(tmp_path: Path, *, schedule: Schedule = Schedule.ONE_F_ONE_B) -> tuple[Path, Plan]:
    profile = chain_profile([(1.0, 2.0), (2.0, 3.0), (1.0, 1.0), (3.0, 3.0)], skips=[(0, 2)])
    profile_path = tmp_path / "chain.json"
    profile.save(profile_path)
    plan = make_plan(profile, [0, 1, 3], [2, 1, 1], schedule=schedule)
    plan = dataclasses.replace(
        plan,
        profile=dataclasses.replace(
            plan.profile, path="chain.json", sha256=file_sha256(profile_path)
        ),
    )
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    return plan_path, plan


def _args(plan: Path | str, **options: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate_command.add_arguments(parser)
    argv = [str(plan)]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return parser.parse_args(argv)


@pytest.mark.parametrize("schedule", ALL)
def test_plan_simulate_prints_and_writes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    schedule: Schedule,
) -> None:
    plan_path, _ = _write_plan(tmp_path, schedule=schedule)
    monkeypatch.chdir(tmp_path.parent)  # the recorded path resolves next to the plan
    out = tmp_path / "out"
    status = simulate_command.run(
        _args(plan_path, png=out / "gantt.png", csv=out / "events.csv", minibatches=4)
    )
    assert status == 0
    text = capsys.readouterr().out
    for needle in (
        "time per minibatch",
        "samples/s",
        "idle (bubble)",
        "peak memory",
        "critical stage",
        "plan's prediction",
    ):
        assert needle in text
    for name in ("gantt.png", "gantt.partition.png", "gantt.memory.png"):
        assert (out / name).stat().st_size > 10_000
    frame = pd.read_csv(out / "events.csv")
    assert tuple(frame.columns) == EVENT_COLUMNS
    assert set(frame["kind"]) >= {"forward", "backward", "send", "recv", "allreduce"}
    assert not list(out.glob("*.tmp"))


def test_plan_simulate_refuses_bad_input(tmp_path: Path) -> None:
    plan_path, _ = _write_plan(tmp_path)
    with pytest.raises(PlanError, match="does not exist"):
        simulate_command.run(_args(tmp_path / "missing.json"))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(plan_path.read_text()[:200])
    with pytest.raises(PlanError, match="not valid JSON"):
        simulate_command.run(_args(corrupt))
    other = tmp_path / "other.json"
    chain_profile([(1.0, 2.0)] * 4).save(other)
    with pytest.raises(PlanError, match="sha256"):
        simulate_command.run(_args(plan_path, profile=other))
    with pytest.raises(ProfileError, match="does not exist"):
        simulate_command.run(_args(plan_path, profile=tmp_path / "nope.json"))
    (tmp_path / "chain.json").unlink()
    with pytest.raises(PlanError, match="--profile"):
        simulate_command.run(_args(plan_path))
    with pytest.raises(PlanError, match="--minibatches"):
        simulate_command.run(_args(plan_path, minibatches=0))
    assert issubclass(ProfileError, PlannerError) and issubclass(PlanError, PlannerError)


def test_side_paths() -> None:
    assert [p.name for p in simulate_command.side_paths("out/g.png")] == [
        "g.png",
        "g.partition.png",
        "g.memory.png",
    ]


# --- the engine is causal and greedy -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_every_operation_starts_as_soon_as_its_device_and_input_allow(seed: int) -> None:
    rng = np.random.default_rng(seed)
    schedule = list(PER_STAGE_SCHEDULES)[seed % 3]
    num = int(rng.integers(1, 6))
    replicas = [int(rng.choice([1, 1, 2, 3])) for _ in range(num)]
    topo = Topology.from_args(
        gpus=16, gpus_per_node=4, bandwidth_gbps=1, inter_node_bandwidth_gbps=0.2
    )
    ranks = rng.permutation(16)[: sum(replicas)].tolist()
    stages, at = [], 0
    for m in replicas:
        f = float(rng.uniform(0.5, 2))
        stages.append(
            SimStage(
                forward_s=f,
                backward_s=2 * f,
                ranks=tuple(ranks[at : at + m]),
                send_bytes=float(rng.uniform(0, 1e9)),
                allreduce_s=float(rng.uniform(0, 1)),
            )
        )
        at += m
    r = simulate_stages(
        stages,
        schedule=schedule,
        microbatches=int(rng.integers(1, 7)),
        minibatches=3,
        topology=topo,
    )
    ev = r.events
    stage_of = {rank: s for s, st in enumerate(stages) for rank in st.ranks}
    done = {
        (row.stage, row.microbatch, row.kind): (row.rank, row.end_s)
        for row in ev[ev["kind"].isin(["forward", "backward"])].itertuples()
    }
    arrived = {
        (row.rank, row.microbatch, row.peer): row.end_s
        for row in ev[ev["kind"] == "recv"].itertuples()
    }
    last = len(stages) - 1
    for rank, rows in ev[ev["kind"].isin(["forward", "backward", "allreduce"])].groupby("rank"):
        free = 0.0
        for row in rows.sort_values(["start_s", "end_s"]).itertuples():
            if row.kind == "allreduce":
                assert row.start_s >= free - 1e-12
                free = row.end_s
                continue
            s, m = stage_of[rank], row.microbatch
            if row.kind == "forward":
                source = None if s == 0 else done[(s - 1, m, "forward")]
            else:
                source = None if s == last else done[(s + 1, m, "backward")]
            ready = 0.0
            if source is not None:
                ready = arrived.get((rank, m, source[0]), source[1])
                assert ready >= source[1] - 1e-12
            assert row.start_s == pytest.approx(max(free, ready), abs=1e-9), (rank, row)
            free = row.end_s


# --- agreement with the optimizer's objective ----------------------------------------------------
#
# Issue 14: the number the optimizer ranks plans by agrees with its own simulator within 5%, for
# every schedule. ``make_plan`` ranks its candidates (microbatch counts, the solver's partition
# against the baselines, rank-schedule cuts and shapes, ``auto``'s schedules) by the simulated
# minibatch time and the plan predicts that time (the formula's stays beside it as
# ``cost_model_minibatch_s``). Before that (measured 2026-11-24) the formula alone was up to 1.75x
# optimistic for 1f1b/gpipe and 3.0x for pipedream on hybrid plans (a replicated stage's
# all-reduce re-aligns its replicas every round; 1F1B's warm-up does not hide transfer latency),
# and VGG16 on 3 stages under 1f1b simulated 1.17x its prediction.
#
# The tests plan every shared PipeDream profile and every shipped profile under every schedule and
# ``auto``, on one server and on two (a slow link between them), and require the simulated time
# of the written plan within 5% of its prediction, and exactly 1 where the closed form holds.

AGREEMENT = 0.05
EVERY = [*Schedule, "auto"]


def _pipedream_profile(model: str) -> Profile:
    from conftest import pipedream_graph

    from planner.profile.pipedream import read_graph_txt

    return read_graph_txt(
        pipedream_graph(model), model=model, batch_size=64 if model == "gnmt" else None
    )


def _check_agreement(
    profile: Profile, tmp_path: Path, topology: Topology, schedule: Schedule | str
) -> None:
    from planner.errors import InfeasibleError
    from planner.planning import PlanOptions, make_plan

    path = tmp_path / f"{profile.model}.json"
    profile.save(path)
    options = (
        PlanOptions(auto_schedule=True)
        if schedule == "auto"
        else PlanOptions(schedule=Schedule(schedule))
    )
    try:
        plan = make_plan(profile, path, topology, options)
    except InfeasibleError as exc:
        pytest.skip(f"no plan fits: {exc}")
    assert "too large to simulate" not in plan.note, plan.note
    result = simulate(Plan.load(_saved(plan, tmp_path)), profile)
    ratio = result.minibatch_s / plan.predicted.minibatch_s
    where = (profile.model, str(plan.schedule), [s.replicas for s in plan.stages], ratio)
    assert abs(ratio - 1) <= AGREEMENT, where
    replicas = [s.replicas for s in plan.stages]
    if len(replicas) == 1 and plan.microbatches % replicas[0] == 0:
        assert ratio == pytest.approx(1.0, rel=1e-9)


def _saved(plan: Plan, tmp_path: Path) -> Path:
    """The plan as ``plan simulate`` reads it: written and loaded back."""
    out = tmp_path / "plan.json"
    plan.save(out)
    return out


@pytest.mark.parametrize("schedule", ALL)
@pytest.mark.parametrize("model", ["alexnet", "gnmt", "resnet18", "resnet50", "vgg16"])
def test_simulation_agrees_with_the_objective_on_pipedream_profiles_4_gpus(
    model: str, schedule: Schedule, tmp_path: Path
) -> None:
    _check_agreement(
        _pipedream_profile(model), tmp_path, Topology.from_args(gpus=4, bandwidth_gbps=25), schedule
    )


@pytest.mark.parametrize("schedule", [*RANK_SCHEDULES, "auto"], ids=str)
@pytest.mark.parametrize("model", ["alexnet", "gnmt", "resnet18", "resnet50", "vgg16"])
def test_the_rank_schedules_and_auto_predict_their_simulation_4_gpus(
    model: str, schedule: Schedule | str, tmp_path: Path
) -> None:
    _check_agreement(
        _pipedream_profile(model), tmp_path, Topology.from_args(gpus=4, bandwidth_gbps=25), schedule
    )


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [8, 16])
@pytest.mark.parametrize("schedule", EVERY, ids=str)
@pytest.mark.parametrize("model", ["alexnet", "gnmt", "resnet18", "resnet50", "vgg16"])
def test_simulation_agrees_with_the_objective_on_pipedream_profiles(
    model: str, schedule: Schedule | str, gpus: int, tmp_path: Path
) -> None:
    topology = Topology.from_args(
        gpus=gpus,
        gpus_per_node=8 if gpus > 8 else None,
        bandwidth_gbps=25,
        inter_node_bandwidth_gbps=10,
    )
    _check_agreement(_pipedream_profile(model), tmp_path, topology, schedule)


SHIPPED = sorted((Path(__file__).resolve().parent.parent / "profiles").glob("*.json"))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", EVERY, ids=str)
@pytest.mark.parametrize("gpus", [8, 16])
@pytest.mark.parametrize("path", SHIPPED or [None], ids=[p.stem for p in SHIPPED] or ["none"])
def test_simulation_agrees_with_the_objective_on_shipped_profiles(
    path: Path | None, gpus: int, schedule: Schedule | str, tmp_path: Path
) -> None:
    if path is None:
        pytest.skip("no shipped profiles in profiles/ yet")
    topology = Topology.from_args(gpus=gpus, gpus_per_node=8 if gpus > 8 else None)
    _check_agreement(Profile.load(path), tmp_path, topology, schedule)


# --- interleaved 1F1B, ZB-H1, ZBV: the analytic facts, exactly -------------------------


def chunked(
    schedule: Schedule,
    ranks: int,
    chunks: int,
    f: float,
    b: float,
    w: float = 0.0,
    **kw: float,
) -> list[SimStage]:
    """``ranks x chunks`` equal virtual stages placed as the schedule says; B and W per chunk."""
    layout = stage_ranks(schedule, ranks=ranks, chunks=chunks)
    return [
        SimStage(forward_s=f, backward_s=b + w, backward_weight_s=w, ranks=(layout[s],), **kw)
        for s in range(ranks * chunks)
    ]


@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 6), (4, 4), (4, 8), (4, 12), (8, 16)])
@pytest.mark.parametrize("v", [2, 3, 4])
def test_interleaved_bubble_is_p_minus_1_over_v_m(p: int, m: int, v: int) -> None:
    # chunk times 1 and 2: a rank's compute per minibatch is 3 v m; bubble (p - 1) / (v m) of it
    r = simulate_stages(
        chunked(Schedule.INTERLEAVED_1F1B, p, v, 1.0, 2.0),
        schedule=Schedule.INTERLEAVED_1F1B,
        microbatches=m,
        minibatches=1,
        chunks=v,
    )
    compute = 3.0 * v * m
    assert (r.minibatch_s - compute) / compute == (p - 1) / (v * m)
    plain = simulate_stages(
        equal_stages(p, 1.0 * v, 2.0 * v), schedule=Schedule.ONE_F_ONE_B, microbatches=m
    )  # the same layers on one chunk per rank: 1F1B's (p - 1) / m
    assert (plain.minibatch_s - compute) / compute == (p - 1) / m
    assert r.chunks == v and r.devices[0].stages == tuple(range(0, p * v, p))


@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 6), (4, 4), (4, 8), (4, 12), (8, 16)])
@pytest.mark.parametrize(("f", "b", "w"), [(1, 1, 1), (2, 2, 1), (1, 2, 1), (2, 1, 1), (3, 2, 2)])
def test_zb_h1_bubble_is_p_minus_1_times_f_plus_b_minus_w(
    p: int, m: int, f: float, b: float, w: float
) -> None:
    # exact for M >= p and W <= min(F, B), the ZB-H1 paper's setting; 1F1B pays (p-1)(F+B+W)
    for schedule, bubble in (
        (Schedule.ZB_H1, (p - 1) * (f + b - w)),
        (Schedule.ONE_F_ONE_B, (p - 1) * (f + b + w)),
    ):
        for n in (1, 3):  # alone, and back to back
            r = simulate_stages(
                chunked(schedule, p, 1, f, b, w),
                schedule=schedule,
                microbatches=m,
                minibatches=n,
                topology=None,
            )
            assert r.minibatch_s - m * (f + b + w) == bubble


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_zbv_has_no_bubble_in_the_steady_state_when_m_is_at_least_2p_minus_1(p: int) -> None:
    # torch's ZBV promise: zero bubble for F = B = W and M >= 2p - 1; one minibatch alone pays
    # only the ramp, (p - 1) chunk forwards; with fewer microbatches a bubble remains
    for m in (2 * p - 1, 2 * p, 4 * p):
        stages = chunked(Schedule.ZBV, p, 2, 1.0, 1.0, 1.0)
        alone = simulate_stages(
            stages, schedule=Schedule.ZBV, microbatches=m, minibatches=1, chunks=2
        )
        steady = simulate_stages(
            stages, schedule=Schedule.ZBV, microbatches=m, minibatches=4, chunks=2
        )
        compute = 2 * 3.0 * m
        assert alone.minibatch_s - compute == p - 1
        assert steady.minibatch_s == compute
    few = simulate_stages(
        chunked(Schedule.ZBV, p, 2, 1.0, 1.0, 1.0),
        schedule=Schedule.ZBV,
        microbatches=p,
        minibatches=4,
        chunks=2,
    )
    assert few.minibatch_s > 6.0 * p


@pytest.mark.parametrize(
    ("schedule", "chunks", "m", "held"),
    [
        (Schedule.ONE_F_ONE_B, 1, 8, [4, 3, 2, 1]),  # stage i: min(M, p - i)
        (Schedule.ONE_F_ONE_B, 1, 2, [2, 2, 2, 1]),
        (Schedule.ZB_H1, 1, 8, [4, 3, 2, 1]),  # 1F1B's memory
        (Schedule.INTERLEAVED_1F1B, 2, 8, [11, 9, 7, 5]),  # rank 0: v p + p - 1
        (Schedule.INTERLEAVED_1F1B, 4, 16, [19, 17, 15, 13]),
        (Schedule.ZBV, 2, 8, [8, 8, 8, 8]),  # 2p half-stage chunks: 1F1B's rank 0
    ],
    ids=str,
)
def test_peak_activations_per_rank(
    schedule: Schedule, chunks: int, m: int, held: list[int]
) -> None:
    r = simulate_stages(
        chunked(schedule, 4, chunks, 1.0, 2.0, 0.5, activation_bytes=1.0),
        schedule=schedule,
        microbatches=m,
        chunks=chunks,
    )
    assert [d.peak_memory_bytes for d in r.devices] == held
    assert held == list(rank_in_flight(schedule, ranks=4, microbatches=m, chunks=chunks))
    if schedule is Schedule.INTERLEAVED_1F1B and m >= 4 * 4:
        p, v = 4, chunks  # rank 0 holds p (1 + (p - 1) / (p v)) microbatches' worth of layers
        assert held[0] / v == p * (1 + (p - 1) / (p * v))


@pytest.mark.parametrize(
    ("schedule", "chunks"), [(Schedule.INTERLEAVED_1F1B, 3), (Schedule.ZBV, 2)]
)
def test_a_rank_holds_the_static_memory_of_every_chunk_it_runs(
    schedule: Schedule, chunks: int
) -> None:
    # stage s holds 10**s static bytes: each rank's peak is the sum over its own chunks exactly
    layout = stage_ranks(schedule, ranks=3, chunks=chunks)
    stages = [
        SimStage(forward_s=1.0, backward_s=2.0, ranks=(layout[s],), static_bytes=10.0**s)
        for s in range(3 * chunks)
    ]
    r = simulate_stages(stages, schedule=schedule, microbatches=6, chunks=chunks)
    expected = [sum(10.0**s for s, d in enumerate(layout) if d == rank) for rank in range(3)]
    assert [d.peak_memory_bytes for d in r.devices] == expected


def test_split_backward_events_and_free_transfers_inside_a_rank() -> None:
    topo = Topology(
        levels=(Level(devices=2, bandwidth_bytes_per_s=1.0, latency_s=0.0),), memory_bytes=GB
    )
    stages = chunked(Schedule.ZBV, 2, 2, 1.0, 1.0, 1.0, send_bytes=0.5)
    r = simulate_stages(
        stages,
        schedule=Schedule.ZBV,
        microbatches=3,
        minibatches=1,
        topology=topo,
        chunks=2,
    )
    ev = r.events
    assert set(ev["kind"]) == {"forward", "backward_input", "backward_weight", "send", "recv"}
    # stages 1 -> 2 share rank 1 in the V: no transfer; 0 -> 1 and 2 -> 3 cross, both ways
    sends = ev[ev["kind"] == "send"]
    assert sorted(set(zip(sends["rank"], sends["peer"], strict=True))) == [(0, 1), (1, 0)]
    assert len(sends) == 4 * 3
    for (stage, g), rows in ev[ev["kind"].isin(COMPUTE_KINDS)].groupby(["stage", "microbatch"]):
        order = rows.sort_values("start_s")["kind"].tolist()
        assert order == ["forward", "backward_input", "backward_weight"], (stage, g)
    w = ev[ev["kind"] == "backward_weight"]
    assert ((w["end_s"] - w["start_s"]) == 1.0).all()


def test_chunked_layouts_and_shapes_are_checked() -> None:
    good = chunked(Schedule.INTERLEAVED_1F1B, 2, 2, 1.0, 2.0)
    with pytest.raises(PlanError, match="multiple of its 2 rounds"):
        simulate_stages(good * 1, schedule=Schedule.INTERLEAVED_1F1B, microbatches=5, chunks=2)
    with pytest.raises(PlanError, match="not 3 chunks"):
        simulate_stages(good, schedule=Schedule.INTERLEAVED_1F1B, microbatches=4, chunks=3)
    swapped = [
        dataclasses.replace(st, ranks=(1 - st.ranks[0],)) if s >= 2 else st
        for s, st in enumerate(good)
    ]
    with pytest.raises(PlanError, match=r"give stages \[0, 2\] the same rank"):
        simulate_stages(swapped, schedule=Schedule.INTERLEAVED_1F1B, microbatches=4, chunks=2)
    replicated = [dataclasses.replace(good[0], ranks=(0, 5)), *good[1:]]
    with pytest.raises(PlanError, match="without replication"):
        simulate_stages(replicated, schedule=Schedule.INTERLEAVED_1F1B, microbatches=4, chunks=2)
    with pytest.raises(PlanError, match="exceeds backward_s"):
        SimStage(forward_s=1, backward_s=1, backward_weight_s=2, ranks=(0,))
    # ranks may be any ids, as long as the layout's devices stay apart
    renamed = [dataclasses.replace(st, ranks=(7 + st.ranks[0],)) for st in good]
    r = simulate_stages(renamed, schedule=Schedule.INTERLEAVED_1F1B, microbatches=4, chunks=2)
    assert [d.rank for d in r.devices] == [7, 8]


def test_virtual_stages_cost_a_cut_as_a_plan_does() -> None:
    profile = chain_profile([(1.0, 2.0), (2.0, 3.0), (1.0, 1.0), (3.0, 5.0)], skips=[(0, 3)])
    topo = Topology.from_args(gpus=2, bandwidth_gbps=1)
    for schedule in (Schedule.ONE_F_ONE_B, Schedule.GPIPE):
        plan = make_plan(profile, [0, 2], [1, 1], schedule=schedule, topology=topo)
        ours = virtual_stages(
            profile, schedule=schedule, ranks=2, microbatch_size=4, starts=[2], topology=topo
        )
        assert ours == plan_stages(plan, profile)  # B/W split included: one costing for both
        a = simulate(plan, profile)
        b = simulate_stages(
            ours, schedule=schedule, microbatches=4, topology=topo, microbatch_size=4
        )
        assert a.minibatch_s == b.minibatch_s
    # W is the layers' weight-gradient share: half of each backward when unmeasured
    assert [st.backward_weight_s for st in ours] == [2.5e-3, 3e-3]


def test_virtual_stages_split_the_compute_evenly_and_feed_the_new_schedules() -> None:
    profile = chain_profile([(1.0, 2.0)] * 16)  # 3 ms a layer at batch 4
    stages = virtual_stages(profile, schedule=Schedule.ZBV, ranks=4, chunks=2)
    assert [st.forward_s for st in stages] == [2e-3] * 8
    assert [st.ranks for st in stages] == [(0,), (1,), (2,), (3,), (3,), (2,), (1,), (0,)]
    looped = virtual_stages(profile, schedule=Schedule.INTERLEAVED_1F1B, ranks=4, chunks=2)
    assert [st.ranks[0] for st in looped] == [0, 1, 2, 3, 0, 1, 2, 3]
    p, v, m = 4, 2, 8
    r = simulate_stages(
        looped, schedule=Schedule.INTERLEAVED_1F1B, microbatches=m, minibatches=1, chunks=v
    )
    compute = 16 * 3e-3 / p * m
    assert (r.minibatch_s - compute) / compute == pytest.approx((p - 1) / (v * m), rel=1e-12)
    uneven = chain_profile([(1.0, 2.0)] * 3 + [(10.0, 20.0)] + [(1.0, 2.0)] * 4)
    cut = virtual_stages(uneven, schedule=Schedule.ONE_F_ONE_B, ranks=2)
    assert [st.forward_s for st in cut] == [13e-3, 4e-3]  # the heavy layer ends the first half
    with pytest.raises(PlanError, match="cannot fill 16 stages"):
        virtual_stages(uneven, schedule=Schedule.ZBV, ranks=8, chunks=2)
    with pytest.raises(PlanError, match="increasing layer indices"):
        virtual_stages(uneven, schedule=Schedule.ONE_F_ONE_B, ranks=3, starts=[4, 4])


@pytest.mark.parametrize(("p", "v"), [(2, 2), (4, 2), (4, 3)])
def test_interleaving_multiplies_the_point_to_point_traffic_by_about_v(p: int, v: int) -> None:
    topo = Topology.from_args(gpus=p, bandwidth_gbps=100)
    m = 2 * p
    counts = {}
    for schedule, chunks in (
        (Schedule.ONE_F_ONE_B, 1),
        (Schedule.INTERLEAVED_1F1B, v),
        (Schedule.ZBV, 2),
    ):
        stages = chunked(schedule, p, chunks, 1.0, 2.0, send_bytes=1e6)
        r = simulate_stages(
            stages, schedule=schedule, microbatches=m, minibatches=1, topology=topo, chunks=chunks
        )
        counts[schedule] = (r.events["kind"] == "send").sum()
    # every boundary between two ranks carries each microbatch forward and back once
    assert counts[Schedule.ONE_F_ONE_B] == 2 * m * (p - 1)
    assert counts[Schedule.INTERLEAVED_1F1B] == 2 * m * (p * v - 1)  # v (p-1) + (v-1)
    assert counts[Schedule.ZBV] == 2 * m * (2 * p - 2)  # the V's turn stays on a rank


def test_compare_schedules_tabulates_each_schedule_on_its_own_split() -> None:
    profile = chain_profile([(1.0, 2.0)] * 16)
    table, runs = compare_schedules(profile, ranks=4, microbatches=8)
    assert list(table["schedule"]) == ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv"]
    assert list(runs) == ["gpipe", "1f1b", "interleaved-1f1b x2", "zb-h1", "zbv x2"]
    assert (table["note"] == "").all()
    for label, run in runs.items():
        schedule = next(s for s in Schedule if label.split()[0] == str(s))
        chunks = 2 if label.endswith("x2") else 1
        row = table[table["schedule"] == str(schedule)].iloc[0]
        layout = stage_ranks(schedule, ranks=4, chunks=chunks)
        work = [layer.compute_ms for layer in profile.layers]
        starts = (
            balanced_starts(work, 4 * chunks)
            if row["cut"] == "stages"
            else rank_balanced_starts(work, layout)
        )
        assert row["cut"] == "stages" or chunks > 1
        again = simulate_stages(
            virtual_stages(profile, schedule=schedule, ranks=4, chunks=chunks, starts=starts),
            schedule=schedule,
            microbatches=8,
            microbatch_size=4,
            chunks=chunks,
        )
        assert row["samples_per_s"] == again.samples_per_s == run.samples_per_s
        assert row["vs_1f1b"] == again.samples_per_s / runs["1f1b"].samples_per_s
    # equal layers, W half the backward: the zero-bubble schedules beat 1F1B by their bubble
    speedup = table.set_index("schedule")["vs_1f1b"]
    assert speedup["zb-h1"] > 1.1 and speedup["zbv"] > 1.1 and speedup["gpipe"] == 1.0
    assert table["fits"].isna().all()  # no topology, no memory to fit in
    peak = table.set_index("schedule")["peak_memory_gib"]
    small = Topology(
        levels=(Level(devices=4, bandwidth_bytes_per_s=1e10, latency_s=0.0),),
        memory_bytes=float(peak["1f1b"] * 2**30),
    )
    fitting, _ = compare_schedules(profile, ranks=4, microbatches=8, topology=small)
    fits = fitting.set_index("schedule")["fits"]
    assert (fits == (peak * 2**30 <= small.memory_bytes)).all()
    assert fits["1f1b"] and not fits["gpipe"]  # gpipe holds all M microbatches
    odd, odd_runs = compare_schedules(profile, ranks=4, microbatches=9)
    assert set(odd_runs) == {"gpipe", "1f1b", "zbv x2"}  # 9 is not a multiple of 2 rounds
    notes = odd.set_index("schedule")["note"]
    assert "use 8 or 10 microbatches" in notes["interleaved-1f1b"] and notes["zb-h1"]


@pytest.mark.parametrize("seed", range(30))
def test_balanced_starts_equal_the_brute_force_min_max_cut(seed: int) -> None:
    rng = np.random.default_rng(seed)
    costs = list(rng.choice([0.0, 0.5, 1.0, 2.0, 7.0], size=int(rng.integers(1, 9))))
    parts = int(rng.integers(1, len(costs) + 1))

    def worst(starts: Sequence[int]) -> float:
        bounds = [0, *starts, len(costs)]
        return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))

    best = min(worst(c) for c in itertools.combinations(range(1, len(costs)), parts - 1))
    found = balanced_starts(costs, parts)
    assert len(found) == parts - 1 and found == sorted(set(found))
    assert all(0 < i < len(costs) for i in found)
    assert worst(found) == pytest.approx(best, rel=1e-8, abs=1e-12)


def _busiest_rank(costs: Sequence[float], starts: Sequence[int], layout: Sequence[int]) -> float:
    loads: dict[int, float] = {}
    for s, (a, b) in enumerate(itertools.pairwise([0, *starts, len(costs)])):
        loads[layout[s]] = loads.get(layout[s], 0.0) + sum(costs[a:b])
    return max(loads.values())


def test_rank_balanced_cut_never_loads_a_rank_more_than_the_min_max_cut() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        ranks, chunks = int(rng.integers(2, 5)), 2
        costs = list(rng.choice([0.5, 1.0, 2.0, 9.0], size=int(rng.integers(ranks * chunks, 20))))
        for schedule in (Schedule.ZBV, Schedule.INTERLEAVED_1F1B):
            layout = stage_ranks(schedule, ranks=ranks, chunks=chunks)
            mine = rank_balanced_starts(costs, layout)
            assert len(mine) == len(layout) - 1 and mine == sorted(set(mine))
            plain = balanced_starts(costs, len(layout))
            assert _busiest_rank(costs, mine, layout) <= _busiest_rank(costs, plain, layout) + 1e-12
    # one heavy last layer (an LM head) under the V: the min-max cut gives rank 0 far more
    head = [1.0] * 12 + [4.5]
    v_layout = stage_ranks(Schedule.ZBV, ranks=4, chunks=2)
    ours, plain = rank_balanced_starts(head, v_layout), balanced_starts(head, 8)
    assert _busiest_rank(head, ours, v_layout) < _busiest_rank(head, plain, v_layout)


def test_a_split_backward_keeps_the_weight_inputs_until_w() -> None:
    # rank 1 of ZB-H1 on 2 ranks defers one W: F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3
    stages = chunked(Schedule.ZB_H1, 2, 1, 1.0, 1.0, 1.0, activation_bytes=1.0)
    held = [dataclasses.replace(st, weight_held_bytes=0.5) for st in stages]
    peaks = {}
    for name, case in (("freed at B", stages), ("held to W", held)):
        r = simulate_stages(case, schedule=Schedule.ZB_H1, microbatches=4, minibatches=1)
        peaks[name] = [d.peak_memory_bytes for d in r.devices]
        assert r.memory.groupby("rank")["bytes"].last().tolist() == [0.0, 0.0]  # all freed
    assert peaks == {"freed at B": [2.0, 1.0], "held to W": [2.0, 1.5]}
    one_f_one_b = simulate_stages(held, schedule=Schedule.ONE_F_ONE_B, microbatches=4)
    assert [d.peak_memory_bytes for d in one_f_one_b.devices] == [2.0, 1.0]  # ignored there
    with pytest.raises(PlanError, match=r"weight_held_bytes 2\.0 exceeds activation_bytes 1\.0"):
        dataclasses.replace(stages[0], weight_held_bytes=2.0)
    # from a profile: the inputs of the layers with parameters
    profile = chain_profile([(1.0, 2.0)] * 4, activation=1000, params=100)
    (first, second) = virtual_stages(profile, schedule=Schedule.ZB_H1, ranks=2)
    assert (first.weight_held_bytes, second.weight_held_bytes) == (1000.0, 2000.0)


@pytest.mark.parametrize(
    ("schedule", "chunks"),
    [
        (Schedule.INTERLEAVED_1F1B, 2),
        (Schedule.INTERLEAVED_1F1B, 3),
        (Schedule.ZB_H1, 1),
        (Schedule.ZBV, 2),
    ],
    ids=str,
)
def test_every_shape_torch_accepts_runs_to_the_end(schedule: Schedule, chunks: int) -> None:
    kinds = 3 if schedule is not Schedule.INTERLEAVED_1F1B else 2
    for p, m in itertools.product(range(1, 6), range(1, 11)):
        try:
            stages = chunked(schedule, p, chunks, 1.0, 2.0, 1.0)
            r = simulate_stages(
                stages, schedule=schedule, microbatches=m, minibatches=2, chunks=chunks
            )
        except PlanError:
            continue  # torch refuses the shape too (test_rank_schedules checks which)
        compute = r.events[r.events["kind"].isin(COMPUTE_KINDS)]
        assert len(compute) == 2 * m * p * chunks * kinds, (p, m)  # nothing deadlocked
        assert compute.groupby(["stage", "microbatch", "kind"], observed=True).size().eq(1).all()
