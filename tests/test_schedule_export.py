"""Exporting schedules to torch.distributed.pipelining: classes, layouts and the schedule CSV
that torch's own runtime loads, validates and lowers to sends and receives."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from planner.errors import PlanError
from planner.schedule_export import (
    TORCH_SCHEDULE_CLASSES,
    schedule_actions,
    schedule_csv,
    torch_schedule,
    write_schedule_csv,
)
from planner.schedules import Schedule

CASES = [
    (Schedule.ONE_F_ONE_B, 1),
    (Schedule.GPIPE, 1),
    (Schedule.INTERLEAVED_1F1B, 2),
    (Schedule.INTERLEAVED_1F1B, 3),
    (Schedule.ZB_H1, 1),
    (Schedule.ZBV, 2),
]


def torch_runtime_loads(path: Path, ranks: int, stages: int, microbatches: int):
    """torch's ``_PipelineScheduleRuntime._load_csv`` on ``path``, without processes: the same
    validation (every stage on one rank, F before B/I before W, M of each) and lowering to
    SEND/RECV actions (which fails on an order that cannot make progress) a real rank runs."""
    runtime = object.__new__(torch_schedules._PipelineScheduleRuntime)
    runtime.pipeline_order = {}
    runtime.pp_group_size, runtime._num_stages = ranks, stages
    runtime._n_microbatches, runtime._stages, runtime._defer_pp_recv = microbatches, [], False
    runtime._load_csv(str(path))
    return runtime


@pytest.mark.parametrize(("schedule", "chunks"), CASES, ids=str)
@pytest.mark.parametrize(("ranks", "m"), [(2, 4), (4, 8), (3, 6)])
def test_torch_loads_and_lowers_the_csv(
    tmp_path: Path, schedule: Schedule, chunks: int, ranks: int, m: int
) -> None:
    path = tmp_path / "schedule.csv"
    write_schedule_csv(path, schedule, ranks=ranks, microbatches=m, chunks=chunks)
    runtime = torch_runtime_loads(path, ranks, ranks * chunks, m)
    actions = schedule_actions(schedule, ranks=ranks, microbatches=m, chunks=chunks)
    assert {r: [str(a) for a in row] for r, row in runtime.pipeline_order.items()} == {
        r: list(row) for r, row in enumerate(actions)
    }
    spec = torch_schedule(schedule, ranks=ranks, microbatches=m, chunks=chunks)
    assert runtime.stage_index_to_group_rank == dict(enumerate(spec.stage_to_rank))
    assert dict(enumerate(spec.stage_to_rank)) == generate_stage_to_rank_mapping(
        ranks, ranks * chunks, style=spec.style
    )
    lowered = {str(a) for row in runtime.pipeline_order_with_comms.values() for a in row}
    if ranks * chunks > 1:
        assert any("SEND_F" in a for a in lowered) and any("RECV_B" in a for a in lowered)
    assert hasattr(torch_schedules, spec.class_name)
    assert [spec.stages_of(r) for r in range(ranks)] == [
        tuple(s for s, owner in enumerate(spec.stage_to_rank) if owner == r) for r in range(ranks)
    ]


def test_csv_text_and_split_backward_names() -> None:
    text = schedule_csv(Schedule.ZB_H1, ranks=2, microbatches=2)
    assert text == "0F0,0F1,0I0,0W0,0I1,0W1\n1F0,1I0,1F1,1I1,1W0,1W1\n"
    assert schedule_csv(Schedule.ONE_F_ONE_B, ranks=2, microbatches=2) == (
        "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n"
    )
    assert set(TORCH_SCHEDULE_CLASSES) == set(Schedule) - {Schedule.PIPEDREAM}


def test_what_torch_cannot_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"Schedule1F1B needs at least as many microbatches"):
        torch_schedule(Schedule.ONE_F_ONE_B, ranks=4, microbatches=2)
    path = tmp_path / "few.csv"  # the CSV itself runs: torch's generic runtime has no such limit
    write_schedule_csv(path, Schedule.ONE_F_ONE_B, ranks=4, microbatches=2)
    assert torch_runtime_loads(path, 4, 4, 2).pipeline_order_with_comms

    with pytest.raises(PlanError, match=r"pipedream .* has no torch.distributed.pipelining class"):
        torch_schedule(Schedule.PIPEDREAM, ranks=2, microbatches=4)
    with pytest.raises(PlanError, match="exactly 2 chunks"):
        schedule_csv(Schedule.ZBV, ranks=2, microbatches=4, chunks=1)
    with pytest.raises(PlanError, match="use 8 or 10 microbatches"):
        write_schedule_csv(
            tmp_path / "x.csv",
            Schedule.INTERLEAVED_1F1B,
            ranks=4,
            microbatches=9,
            chunks=2,
        )
    assert not (tmp_path / "x.csv").exists()


# --- torch runs the exported CSV: 2 gloo ranks, gradients equal a single process -----------------

RUN_CASES = [
    (Schedule.ONE_F_ONE_B, 1),
    (Schedule.GPIPE, 1),
    (Schedule.INTERLEAVED_1F1B, 2),
    (Schedule.ZB_H1, 1),
    (Schedule.ZBV, 2),
]
_BLOCKS, _WIDTH, _BATCH, _MICRO = 4, 8, 8, 4


def _blocks() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(_WIDTH, _WIDTH), torch.nn.Tanh())
        for _ in range(_BLOCKS)
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(_BATCH, _WIDTH, generator=gen), torch.randn(_BATCH, _WIDTH, generator=gen)


def _run_rank(rank: int, port: int, folder: str) -> None:
    """One rank: every case's stages of this rank, torch's runtime on our CSV, one step."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        x, y = _data()
        for schedule, chunks in RUN_CASES:
            spec = torch_schedule(schedule, ranks=2, microbatches=_MICRO, chunks=chunks)
            num = 2 * chunks
            blocks, per = _blocks(), _BLOCKS // num
            stages = [
                PipelineStage(
                    torch.nn.Sequential(*blocks[s * per : (s + 1) * per]),
                    s,
                    num,
                    torch.device("cpu"),
                )
                for s in spec.stages_of(rank)
            ]
            runtime = torch_schedules._PipelineScheduleRuntime(
                stages, _MICRO, loss_fn=torch.nn.functional.mse_loss
            )
            path = Path(folder) / f"{schedule}.csv"
            if rank == 0:
                write_schedule_csv(path, schedule, ranks=2, microbatches=_MICRO, chunks=chunks)
            dist.barrier()
            runtime._load_csv(str(path))
            mine = spec.stages_of(rank)
            args = (x,) if 0 in mine else ()
            kwargs = {"target": y, "losses": []} if num - 1 in mine else {}
            runtime.step(*args, **kwargs)
            grads = {
                f"{s}.{name}": p.grad.clone()
                for s, stage in zip(mine, stages, strict=True)
                for name, p in stage.submod.named_parameters()
            }
            torch.save(grads, Path(folder) / f"{schedule}.rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_torch_runs_the_exported_csv_with_single_process_gradients(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.spawn(_run_rank, args=(port, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 600  # generous: the machine is shared
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("torch's runtime did not finish the exported schedules in 600 s")
    blocks = _blocks()
    x, y = _data()
    out = x
    for block in blocks:
        out = block(out)
    torch.nn.functional.mse_loss(out, y).backward()
    for schedule, chunks in RUN_CASES:
        grads = {}
        for rank in range(2):
            grads.update(torch.load(tmp_path / f"{schedule}.rank{rank}.pt", weights_only=True))
        per = _BLOCKS // (2 * chunks)
        assert len(grads) == 2 * _BLOCKS
        for key, grad in grads.items():
            s, name = key.split(".", 1)
            index, rest = name.split(".", 1)
            block = blocks[int(s) * per + int(index)]
            torch.testing.assert_close(
                grad, block.get_parameter(rest).grad, msg=f"{schedule} {key}"
            )
