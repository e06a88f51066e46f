"""The simulator's per-operation runtime overhead (``Topology.op_overhead_s``)."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from planner.schedules import Schedule
from planner.simulate import SimStage, simulate_stages
from planner.topology import GB, Level, Topology


def _topology(devices: int, overhead_s: float, latency_s: float = 0.0) -> Topology:
    return Topology(
        levels=(Level(devices=devices, bandwidth_bytes_per_s=1 * GB, latency_s=latency_s),),
        memory_bytes=1e12,
        op_overhead_s=overhead_s,
    )


@pytest.mark.parametrize("schedule", [Schedule.GPIPE, Schedule.ONE_F_ONE_B, Schedule.PIPEDREAM])
@pytest.mark.parametrize("microbatches", [1, 3, 8])
def test_one_stage_pays_ops_times_the_overhead(schedule: Schedule, microbatches: int) -> None:
    """One stage on one rank never waits: a minibatch is its 2M operations, each f or b plus the
    overhead, so the overhead adds exactly 2M x overhead."""
    stage = [SimStage(forward_s=1.0, backward_s=2.0, ranks=(0,))]
    overhead = 0.125
    base = simulate_stages(
        stage, schedule=schedule, microbatches=microbatches, topology=_topology(1, 0.0)
    )
    charged = simulate_stages(
        stage, schedule=schedule, microbatches=microbatches, topology=_topology(1, overhead)
    )
    assert base.minibatch_s == pytest.approx(3.0 * microbatches)
    assert charged.minibatch_s == pytest.approx(base.minibatch_s + 2 * microbatches * overhead)
    spans = charged.events["end_s"] - charged.events["start_s"]
    forward = charged.events["kind"] == "forward"
    assert spans[forward].to_numpy() == pytest.approx(1.0 + overhead)
    assert spans[~forward].to_numpy() == pytest.approx(2.0 + overhead)


@pytest.mark.parametrize("schedule", [Schedule.GPIPE, Schedule.ONE_F_ONE_B])
def test_zero_overhead_changes_nothing(schedule: Schedule) -> None:
    """With a topology whose overhead is 0 the closed form of a flushed pipeline still holds
    exactly: (M + S - 1)(f + b) for free transfers."""
    stages = [SimStage(forward_s=1.0, backward_s=2.0, ranks=(r,), send_bytes=0.0) for r in range(3)]
    result = simulate_stages(
        stages, schedule=schedule, microbatches=4, minibatches=2, topology=_topology(3, 0.0)
    )
    assert result.minibatch_s == pytest.approx((4 + 3 - 1) * 3.0)


@pytest.mark.parametrize(
    "schedule", [Schedule.GPIPE, Schedule.ONE_F_ONE_B, Schedule.PIPEDREAM, Schedule.ZB_H1]
)
def test_overhead_is_compute_the_rank_spends_on_every_operation(schedule: Schedule) -> None:
    """The independent reference: the same pipeline without overhead, each operation's compute
    longer by the overhead (B and W are two operations under zb-h1). Unequal stages, real
    transfers with latency, two replicas under pipedream's round robin."""
    overhead, latency = 0.3, 0.05
    split = schedule is Schedule.ZB_H1
    ranks = ((0,), (1,), (2,)) if schedule is not Schedule.PIPEDREAM else ((0, 1), (2,), (3,))
    stages = [
        SimStage(
            forward_s=f,
            backward_s=b,
            ranks=r,
            send_bytes=2e8,
            **({"backward_weight_s": b / 2} if split else {}),
        )
        for f, b, r in zip((1.0, 0.5, 1.5), (2.0, 1.5, 2.5), ranks, strict=True)
    ]
    devices = sum(len(r) for r in ranks)
    charged = simulate_stages(
        stages, schedule=schedule, microbatches=4, topology=_topology(devices, overhead, latency)
    )
    longer = [
        dataclasses.replace(
            st,
            forward_s=st.forward_s + overhead,
            backward_s=st.backward_s + (2 if split else 1) * overhead,
            backward_weight_s=st.backward_weight_s + (overhead if split else 0.0),
        )
        for st in stages
    ]
    reference = simulate_stages(
        longer, schedule=schedule, microbatches=4, topology=_topology(devices, 0.0, latency)
    )
    assert charged.minibatch_s == pytest.approx(reference.minibatch_s)
    assert (
        charged.minibatch_s
        > simulate_stages(
            stages, schedule=schedule, microbatches=4, topology=_topology(devices, 0.0, latency)
        ).minibatch_s
    )

    def timeline(events: pd.DataFrame) -> list[tuple[int, str, int, float, float]]:
        rows = events[["rank", "kind", "microbatch", "start_s", "end_s"]].itertuples(index=False)
        return sorted((r, str(k), m, round(t0, 9), round(t1, 9)) for r, k, m, t0, t1 in rows)

    assert timeline(charged.events) == timeline(reference.events)


def test_no_topology_means_no_overhead() -> None:
    stage = [SimStage(forward_s=1.0, backward_s=2.0, ranks=(0,))]
    result = simulate_stages(stage, schedule=Schedule.GPIPE, microbatches=2)
    assert result.minibatch_s == pytest.approx(6.0)


def _measured(devices: int, update_s_per_byte: float) -> Topology:
    return Topology(
        levels=(Level(devices=devices, bandwidth_bytes_per_s=1 * GB),),
        memory_bytes=1e12,
        update_s_per_byte=(("adam", update_s_per_byte),),
    )


@pytest.mark.parametrize("schedule", [Schedule.GPIPE, Schedule.ONE_F_ONE_B])
def test_update_runs_once_per_minibatch_after_the_flush(schedule: Schedule) -> None:
    """A flushed pipeline's minibatch is (M + S - 1)(f + b) plus the slowest stage's optimizer
    step, and each rank's step starts when its own last backward ends."""
    stages = [
        SimStage(forward_s=1.0, backward_s=2.0, ranks=(r,), update_s=u)
        for r, u in enumerate((0.5, 2.0, 0.25))
    ]
    result = simulate_stages(stages, schedule=schedule, microbatches=4, minibatches=3)
    # stage 0's last backward ends last; rank 1's step (2.0) overlaps rank 0's backwards
    updates = result.events[result.events["kind"] == "update"]
    assert sorted(updates["rank"].value_counts().to_dict().items()) == [(0, 3), (1, 3), (2, 3)]
    spans = (updates["end_s"] - updates["start_s"]).groupby(updates["rank"]).first()
    assert spans.to_dict() == pytest.approx({0: 0.5, 1: 2.0, 2: 0.25})
    no_update = simulate_stages(
        [dataclasses.replace(st, update_s=0.0) for st in stages],
        schedule=schedule,
        microbatches=4,
        minibatches=3,
    )
    assert no_update.minibatch_s == pytest.approx((4 + 3 - 1) * 3.0)
    # rank 0's last backward ends the minibatch (18 s) and its step takes 0.5 s more; rank 1's
    # last backward ends 2 s earlier, its 2 s step at 18 s, before the next forward reaches it
    # (19.5 s); rank 2's at 14.25 s. So only rank 0's step delays the next minibatch: 18.5 s.
    assert result.minibatch_s == pytest.approx(18.0 + 0.5)


def test_update_is_the_rank_stepping_every_chunk_under_rank_schedules() -> None:
    """Under interleaved-1f1b each rank steps each of its chunks once per minibatch."""
    stages = [
        SimStage(forward_s=1.0, backward_s=2.0, ranks=(s % 2,), update_s=0.125) for s in range(4)
    ]
    result = simulate_stages(
        stages,
        schedule=Schedule.INTERLEAVED_1F1B,
        microbatches=4,
        minibatches=2,
        chunks=2,
    )
    updates = result.events[result.events["kind"] == "update"]
    assert len(updates) == 2 * 4  # 2 minibatches x 4 chunks
    assert sorted(updates["stage"].unique().tolist()) == [0, 1, 2, 3]
    plain = simulate_stages(
        [dataclasses.replace(st, update_s=0.0) for st in stages],
        schedule=Schedule.INTERLEAVED_1F1B,
        microbatches=4,
        minibatches=2,
        chunks=2,
    )
    assert result.minibatch_s == pytest.approx(plain.minibatch_s + 2 * 0.125)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_plan_stages_charge_the_topologys_update_cost(optimizer: str) -> None:
    """``layer_stages`` sets each stage's step from its parameter bytes and the optimizer kind."""
    from planner.profile.format import LayerProfile, Profile
    from planner.schedules import OptimizerKind
    from planner.simulate_costs import layer_stages

    layers = tuple(
        LayerProfile(
            name=f"l{i}",
            op="",
            forward_ms=1.0,
            backward_ms=2.0,
            output_bytes=(8,),
            parameter_bytes=p,
            inputs=(i - 1,) if i else (),
        )
        for i, p in enumerate((1000, 3000))
    )
    profile = Profile(model="m", batch_size=1, layers=layers)
    topo = _measured(2, 1e-6)
    sims = layer_stages(
        profile,
        [(0,), (1,)],
        [(0,), (1,)],
        schedule=Schedule.ONE_F_ONE_B,
        topology=topo,
        optimizer=OptimizerKind(optimizer),
    )
    expected = (1e-3, 3e-3) if optimizer == "adam" else (0.0, 0.0)  # only adam was measured
    assert [st.update_s for st in sims] == pytest.approx(list(expected))


@pytest.mark.parametrize(
    ("schedule", "steps_per_minibatch"),
    [(Schedule.GPIPE, 1), (Schedule.ONE_F_ONE_B, 1), (Schedule.PIPEDREAM, 4)],
)
def test_one_stage_pays_its_updates_exactly(schedule: Schedule, steps_per_minibatch: int) -> None:
    """One stage on one rank never waits: a minibatch of M = 4 is 4 (f + b) plus its steps (once
    per minibatch when flushed; pipedream steps after every microbatch)."""
    stage = [SimStage(forward_s=1.0, backward_s=2.0, ranks=(0,), update_s=0.375)]
    result = simulate_stages(stage, schedule=schedule, microbatches=4, minibatches=3)
    assert result.minibatch_s == pytest.approx(4 * 3.0 + steps_per_minibatch * 0.375)
