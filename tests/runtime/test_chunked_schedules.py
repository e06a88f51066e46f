"""``interleaved-1f1b``, ``zb-h1`` and ``zbv`` train exactly as one process does.

Unit tier (one process, no torch.distributed): the per-rank driver
(:class:`planner.runtime.chunked.ChunkedSchedule`) runs a whole schedule on one rank that holds
every stage, so every hand-over is in memory; the parameters, BatchNorm statistics and losses
after three steps equal single-process training's. Distributed tier (2 gloo ranks): plans of
each schedule trained by our engine and by ``--engine torch`` (torch's
``ScheduleInterleaved1F1B``, ``ScheduleInterleavedZeroBubble``, ``ScheduleZBVZeroBubble``) give
the reference's parameters and, step by step, its losses and 1f1b's, with sgd and with adam.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from runtime_helpers import assert_matches_reference, make_plan, reference, run_cases

from planner.errors import PlanError
from planner.models import load_model
from planner.plan import Plan
from planner.profile.capture import capture
from planner.rank_schedules import stage_ranks
from planner.runtime.chunked import ChunkedSchedule, ChunkLayout, ChunkLink, build_executors
from planner.runtime.chunked_run import check_runnable
from planner.runtime.comm import BoundaryMeta, CommTimers, PointToPoint
from planner.runtime.config import RunConfig, RunError
from planner.runtime.data import microbatch, minibatch_seed
from planner.runtime.stage import build_stage_module, cut_graph, propagate
from planner.runtime.torch_engine import check_expressible
from planner.schedules import Schedule
from planner.topology import Topology

MLP, CNN, BN = "runtime_models:mlp", "runtime_models:cnn", "runtime_models:cnn_bn"
SHAPES = [(Schedule.INTERLEAVED_1F1B, 2), (Schedule.INTERLEAVED_1F1B, 3), (Schedule.ZBV, 2)]


def chunked_plan(
    model: str,
    schedule: Schedule,
    *,
    cuts: list[str],
    chunks: int,
    microbatches: int = 4,
    **kw: Any,
) -> Plan:
    """A plan of ``schedule`` whose virtual stages start at ``cuts``, placed as torch does."""
    stages = len(cuts) + 1
    base = make_plan(model, cuts=cuts, replicas=[1] * stages, microbatches=microbatches, **kw)
    ranks = stages // chunks
    where = stage_ranks(schedule, ranks=ranks, chunks=chunks)
    return dataclasses.replace(
        base,
        schedule=schedule,
        chunks=chunks,
        topology=Topology.from_args(gpus=ranks),
        stages=tuple(
            dataclasses.replace(stage, ranks=(r,))
            for stage, r in zip(base.stages, where, strict=True)
        ),
    )


# --- unit tier: one process holds every stage -------------------------------------------------


def _train_one_process(
    model: str, layout: ChunkLayout, *, microbatch_size: int = 2, steps: int = 3, lr: float = 0.1
) -> tuple[dict[str, torch.Tensor], list[float]]:
    torch.manual_seed(0)
    spec = load_model(model, batch_size=microbatch_size, seed=0)
    captured = capture(spec.module)
    names = [layer.name for layer in captured.layers]
    count = layout.num_stages
    groups = [names[len(names) * s // count : len(names) * (s + 1) // count] for s in range(count)]
    cut = cut_graph(captured, groups)
    example, _ = microbatch(spec.make_batch(microbatch_size, 0), 0, size=microbatch_size)
    values = propagate(captured, example)
    metas = tuple(BoundaryMeta.from_values(n, values) for n in cut.boundaries)
    modules = {s: build_stage_module(captured, cut, s) for s in range(count)}
    p2p = PointToPoint(device=torch.device("cpu"), timers=CommTimers(), max_tensors=8)
    executors = build_executors(
        layout, rank=0, modules=modules, metas=metas, loss_fn=spec.loss_fn, p2p=p2p
    )
    params = list(dict.fromkeys(p for m in modules.values() for p in m.parameters()))
    runner = ChunkedSchedule(
        layout=layout, rank=0, executors=executors, optimizer=torch.optim.SGD(params, lr=lr)
    )
    losses = []
    size, m_count = microbatch_size, layout.microbatches
    for step in range(steps):
        batch = spec.make_batch(m_count * size, minibatch_seed(0, step))
        out = runner.step(
            inputs=lambda m, b=batch: microbatch(b, m, size=size)[0],
            targets=lambda m, b=batch: microbatch(b, m, size=size)[1],
        )
        assert len(out) == m_count
        losses.append(float(torch.stack(out).mean()))
    state = {}
    for module in modules.values():
        state |= {k: v.detach() for k, v in [*module.named_parameters(), *module.named_buffers()]}
    return state, losses


@pytest.mark.parametrize("model", [MLP, CNN, BN])
@pytest.mark.parametrize(("schedule", "chunks"), SHAPES, ids=str)
def test_one_process_driver_trains_as_a_single_process(
    model: str, schedule: Schedule, chunks: int
) -> None:
    """A rank holding every chunk: in-memory hand-overs, split B/W for zbv, relayed skips (cnn),
    BatchNorm statistics (cnn_bn) all equal single-process training with the same microbatches."""
    torch.set_num_threads(1)
    layout = ChunkLayout.of(schedule, ranks=1, chunks=chunks, microbatches=4)
    state, losses = _train_one_process(model, layout)
    plan = types.SimpleNamespace(microbatch_size=2, minibatch_size=8, microbatches=4)
    expected, expected_losses = reference(model, plan)  # type: ignore[arg-type]
    assert set(state) <= set(expected) and len(state) > 0
    for name, value in state.items():
        torch.testing.assert_close(value, expected[name], msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses))


def test_split_backward_sends_input_gradients_before_weight_gradients() -> None:
    """zbv's B sends the input gradient and leaves the weights alone; W fills ``.grad``."""
    torch.set_num_threads(1)
    layout = ChunkLayout.of(Schedule.ZBV, ranks=1, chunks=2, microbatches=1)
    spec = load_model(MLP, batch_size=2, seed=0)
    captured = capture(spec.module)
    cut = cut_graph(captured, [["_0", "_1", "_2"], ["_3", "_4", "_5", "_6"]])
    example, target = microbatch(spec.make_batch(2, 0), 0, size=2)
    values = propagate(captured, example)
    metas = tuple(BoundaryMeta.from_values(n, values) for n in cut.boundaries)
    modules = {s: build_stage_module(captured, cut, s) for s in range(2)}
    p2p = PointToPoint(device=torch.device("cpu"), timers=CommTimers(), max_tensors=4)
    ex = build_executors(
        layout, rank=0, modules=modules, metas=metas, loss_fn=spec.loss_fn, p2p=p2p
    )
    ex[0].forward(0, inputs=lambda m: example)
    ex[1].forward(0, targets=lambda m: target)
    ex[1].backward_input(0)
    assert all(p.grad is None for p in modules[1].parameters())
    link = ex[1].p2p
    assert isinstance(link, ChunkLink) and (0, 0, True) in link.mailbox  # gradient to stage 0
    ex[1].backward_weight(0)
    assert all(p.grad is not None for p in modules[1].parameters())
    ex[0].backward_input(0)  # stage 0: nothing to send, its whole backward waits for W
    assert all(p.grad is None for p in modules[0].parameters())
    ex[0].backward_weight(0)
    assert all(p.grad is not None for p in modules[0].parameters())
    assert not link.mailbox


def test_layout_follows_the_plan_and_tags_keep_boundaries_apart() -> None:
    plan = chunked_plan(MLP, Schedule.ZBV, cuts=["_2", "_4", "_6"], chunks=2)
    layout = ChunkLayout.of_plan(plan)
    assert layout.stage_to_rank == (0, 1, 1, 0) and layout.positions == (0, 1)
    assert layout.stages_of(0) == (0, 3) and layout.split
    assert [str(op) for op in layout.ops(0)][:3] == ["0F0", "0F1", "0F2"]
    link = ChunkLink(device=torch.device("cpu"), timers=CommTimers(), max_tensors=2, num_stages=4)
    tags = {
        link.tag(link._channel(m, b), backward, i)
        for m in range(4)
        for b in range(3)
        for backward in (False, True)
        for i in range(2)
    }
    assert len(tags) == 4 * 3 * 2 * 2


def test_what_the_rank_schedules_do_not_run_is_refused() -> None:
    plan = chunked_plan(MLP, Schedule.INTERLEAVED_1F1B, cuts=["_2", "_4", "_6"], chunks=2)
    check_runnable(plan, RunConfig(plan_path="p.json"))
    with pytest.raises(RunError, match="does not recompute"):
        check_runnable(dataclasses.replace(plan, recompute=True))
    with pytest.raises(RunError, match="checkpoints"):
        check_runnable(plan, RunConfig(plan_path="p.json", checkpoint_dir="ck", checkpoint_every=1))
    check_expressible(plan, RunConfig(plan_path="p.json"))  # torch runs it
    with pytest.raises(RunError, match="checkpoints"):
        check_expressible(plan, RunConfig(plan_path="p.json", resume=True, checkpoint_dir="ck"))
    with pytest.raises(PlanError, match="multiple of its 2 rounds"):
        chunked_plan(
            MLP, Schedule.INTERLEAVED_1F1B, cuts=["_2", "_4", "_6"], chunks=2, microbatches=5
        )


# --- distributed tier: 2 gloo ranks, our engine and torch's -------------------------------------

FOUR = ["_2", "_4", "_6"]
CASES: dict[str, tuple[str, Schedule, dict[str, Any]]] = {
    "interleaved": (MLP, Schedule.INTERLEAVED_1F1B, dict(cuts=FOUR, chunks=2)),
    "zb-h1": (MLP, Schedule.ZB_H1, dict(cuts=["_3"], chunks=1)),
    "zbv": (MLP, Schedule.ZBV, dict(cuts=FOUR, chunks=2)),
    "interleaved-cnn-relay": (
        CNN,
        Schedule.INTERLEAVED_1F1B,
        dict(cuts=["relu_1", "block1_conv2", "view"], chunks=2, microbatches=6),
    ),
    "zbv-bn": (BN, Schedule.ZBV, dict(cuts=["bn0", "bn1", "bn2"], chunks=2)),
}
ADAM = {"optimizer": "adam", "lr": 0.01}
RUNS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {}  # run -> (case, config, ref)
for _name in CASES:
    RUNS[f"{_name}-sgd"] = (_name, {}, {})
    RUNS[f"{_name}-torch"] = (_name, {"engine": "torch"}, {})
for _name in ("interleaved", "zb-h1", "zbv"):
    RUNS[f"{_name}-adam"] = (_name, ADAM, dict(optimizer="adam", lr=0.01))
    RUNS[f"{_name}-adam-torch"] = (
        _name,
        ADAM | {"engine": "torch"},
        dict(optimizer="adam", lr=0.01),
    )
RUNS["zbv-clip"] = ("zbv", {"clip_grad": 0.05}, dict(clip=0.05))
RUNS["zbv-bn-momentum-sgd"] = (
    "zbv-bn",
    {"optimizer": "momentum"},
    dict(optimizer="momentum", momentum=0.9),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from planner.runtime.config import Engine

    plans = {
        run: chunked_plan(CASES[case][0], CASES[case][1], **CASES[case][2])
        for run, (case, _, _) in RUNS.items()
    }
    plans["mlp-1f1b"] = make_plan(MLP, cuts=["_3"], replicas=[1, 1])
    overrides: dict[str, dict[str, Any]] = {}
    for run, (_, options, _) in RUNS.items():
        fields = {"momentum": None, **options}
        if "engine" in fields:
            fields["engine"] = Engine(fields["engine"])
        overrides[run] = fields
    results = run_cases(plans, Path(tmp_path_factory.mktemp("chunked")), overrides=overrides)
    return {"plans": plans, "results": results}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_two_ranks_train_as_a_single_process(trained: dict[str, Any], run: str) -> None:
    case, _, training = RUNS[run]
    model = CASES[case][0]
    plan = trained["plans"][run]
    expected, losses = reference(model, plan, **training)
    assert_matches_reference(model, trained["results"][run], expected, losses)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    "run",
    ["interleaved-sgd", "zb-h1-sgd", "zbv-sgd", "interleaved-torch", "zb-h1-torch", "zbv-torch"],
)
def test_same_losses_as_1f1b_step_by_step(trained: dict[str, Any], run: str) -> None:
    def losses(name: str) -> list[float]:
        results = trained["results"][name]
        assert not any(r["error"] for r in results.values()), results
        # the rank holding the last stage has the losses (others: none, or NaN)
        held = [list(r["losses"]) for r in results.values() if r["losses"]]
        return next(x for x in held if not any(v != v for v in x))

    assert len(losses(run)) == 3
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses("mlp-1f1b")))
