"""Placement, boundary metadata and the run configuration, without starting processes."""

from __future__ import annotations

import pytest
import torch

from planner.runtime.comm import BoundaryMeta, Placement, TensorMeta
from planner.runtime.config import RunConfig, RunError
from planner.runtime.executors import FlushSchedule
from planner.schedules import Schedule, replica_order


def test_round_robin_peers_follow_from_the_plan() -> None:
    p = Placement(ranks=((0, 1, 2), (3,), (4, 5)))
    assert p.replicas == (3, 1, 2)
    assert p.world_size_needed == 6
    # microbatch m: replica m % 3 of stage 0 -> rank 3 -> replica m % 2 of stage 2
    assert [(p.rank_of(0, m), p.rank_of(1, m), p.rank_of(2, m)) for m in range(4)] == [
        (0, 3, 4),
        (1, 3, 5),
        (2, 3, 4),
        (0, 3, 5),
    ]
    assert p.locate(5) == (2, 1)
    assert p.locate(9) is None


def test_every_sender_and_receiver_agree_on_each_microbatch() -> None:
    """What replica r of stage s sends is exactly what stage s+1's replicas expect from it."""
    replicas, m_count = (3, 2), 6
    p = Placement(ranks=((0, 1, 2), (3, 4)))
    sent = {
        (p.ranks[0][r], p.rank_of(1, op.microbatch), op.microbatch)
        for r in range(3)
        for op in replica_order(
            Schedule.ONE_F_ONE_B, replicas=replicas, stage=0, replica=r, microbatches=m_count
        )
        if op.kind == "F"
    }
    expected = {
        (p.rank_of(0, op.microbatch), p.ranks[1][r], op.microbatch)
        for r in range(2)
        for op in replica_order(
            Schedule.ONE_F_ONE_B, replicas=replicas, stage=1, replica=r, microbatches=m_count
        )
        if op.kind == "F"
    }
    assert sent == expected and len(sent) == m_count


def _meta() -> BoundaryMeta:
    values = {
        "h": torch.zeros(2, 3, requires_grad=True) * 1,
        "parts": (torch.zeros(2, 4, dtype=torch.long), 7),
        "n": 2,
    }
    return BoundaryMeta.from_values(["h", "parts", "n"], values)


def test_boundary_meta_sends_tensors_and_keeps_constants() -> None:
    meta = _meta()
    assert meta.tensors == (
        TensorMeta(shape=(2, 3), dtype=torch.float32, requires_grad=True),
        TensorMeta(shape=(2, 4), dtype=torch.int64, requires_grad=False),
    )
    assert meta.grad_indices == (0,)
    assert meta.nbytes == 2 * 3 * 4 + 2 * 4 * 8
    h, ids = torch.ones(2, 3, requires_grad=True), torch.ones(2, 4, dtype=torch.long)
    values = meta.unflatten([h, ids])
    assert values[0] is h and values[1][0] is ids and values[1][1] == 7 and values[2] == 2
    assert meta.flatten(values) == [h, ids]


def test_boundary_meta_refuses_a_changed_shape() -> None:
    meta = _meta()
    with pytest.raises(RuntimeError, match="agreed at start-up"):
        meta.flatten(
            [torch.zeros(3, 3, requires_grad=True), (torch.zeros(2, 4, dtype=torch.long), 7), 2]
        )


def test_digest_is_stable_and_sensitive() -> None:
    assert _meta().digest() == _meta().digest()
    other = BoundaryMeta.from_values(["h"], {"h": torch.zeros(2, 3)})
    assert other.digest() != _meta().digest()


def test_flush_schedule_runs_the_shared_operation_lists() -> None:
    for schedule in (Schedule.GPIPE, Schedule.ONE_F_ONE_B):
        for stage, count in enumerate((3, 1)):
            for r in range(count):
                assert FlushSchedule.ops_for(
                    schedule, replicas=(3, 1), stage=stage, replica=r, microbatches=5
                ) == replica_order(
                    schedule, replicas=(3, 1), stage=stage, replica=r, microbatches=5
                )


def test_run_config_round_trips_through_argv() -> None:
    cfg = RunConfig(
        plan_path="a/p.json",
        steps=7,
        lr=0.25,
        momentum=0.9,
        timeout_s=12.5,
        threads=2,
        seed=3,
        report_path="r.json",
        log_every=0,
    )
    assert RunConfig.from_argv(cfg.to_argv()) == cfg
    assert str(RunConfig(plan_path="a/p.json").report_file) == "a/p.report.json"


@pytest.mark.parametrize(
    "bad", [dict(steps=0), dict(lr=0.0), dict(timeout_s=-1.0), dict(threads=-1), dict(momentum=1.0)]
)
def test_run_config_refuses_bad_values(bad: dict) -> None:
    with pytest.raises(RunError):
        RunConfig(plan_path="p.json", **bad)
