"""One rank's training under ``interleaved-1f1b``, ``zb-h1`` or ``zbv`` (our engine).

The plan's stages are the ``p v`` virtual stages; this rank builds the module of each stage it
holds (:class:`planner.runtime.chunked.ChunkLayout`), joins the run, and trains: one
:class:`~planner.runtime.chunked.ChunkedSchedule` step per minibatch, the first step left out of
the timings as in every other loop. The report has one row per rank (its time over all its
chunks), named by the rank's first stage.

What these schedules do not run yet, refused in one line before any process starts
(:func:`check_runnable`): activation recomputation, checkpoints, and a parameter shared by
stages on different ranks (tied embeddings on two ranks; on one rank it is one tensor and
needs nothing).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from planner.plan import Plan
from planner.profile.timing import keep_freed_memory
from planner.runtime.chunked import ChunkedSchedule, ChunkLayout, build_executors
from planner.runtime.comm import BoundaryMeta, CommTimers, PointToPoint, check_agreement
from planner.runtime.config import RunConfig, RunError
from planner.runtime.data import ModelLike, data_source, microbatch
from planner.runtime.optim import GradientClipper
from planner.runtime.report import RankStats, RunReport, StageStats, StepStats
from planner.runtime.stage import (
    SharedParameter,
    build_stage_module,
    capture_for_plan,
    cut_graph,
    propagate,
    release_other_stages,
    shared_parameters,
)
from planner.schedules import RANK_SCHEDULES

__all__ = ["ChunkPrepared", "check_runnable", "prepare_chunks", "train_chunked"]


def check_runnable(
    plan: Plan, config: RunConfig | None = None, *, shared: tuple[SharedParameter, ...] = ()
) -> None:
    """Refuse, in one line, what our engine does not run under a rank schedule.

    Raises:
        RunError: Naming what and what to use instead.
    """
    if plan.schedule not in RANK_SCHEDULES:
        return
    if plan.recompute:
        raise RunError(
            f"schedule {plan.schedule} does not recompute activations in this runtime yet; "
            "re-plan without --recompute or with --schedule 1f1b"
        )
    if config is not None and (config.checkpoint_dir is not None or config.resume):
        raise RunError(
            f"schedule {plan.schedule} does not write or resume checkpoints yet; drop "
            "--checkpoint-dir/--resume or re-plan with --schedule 1f1b"
        )
    if config is not None and config.update_interval != 1:
        raise RunError("--update-interval applies to the pipedream schedule only; drop it")
    layout = ChunkLayout.of_plan(plan)
    for param in shared:
        ranks = sorted({layout.stage_to_rank[s] for s in param.stages})
        if len(ranks) > 1:
            raise RunError(
                f"parameter {param.names[0]} is shared by stages {list(param.stages)} on ranks "
                f"{ranks}; schedule {plan.schedule} does not sum tied gradients across ranks "
                "yet: re-plan with --schedule 1f1b"
            )


@dataclass(frozen=True, kw_only=True)
class ChunkPrepared:
    """A rank's share of a rank-schedule plan, built before it joins the run.

    Attributes:
        spec: The rebuilt model (its other stages' weights released).
        layout: Where every stage runs, what every rank does.
        metas: Every boundary's metadata.
        shared: Parameters held by several stages.
        modules: This rank's stage modules, by stage (empty for an idle rank).
    """

    spec: ModelLike
    layout: ChunkLayout
    metas: tuple[BoundaryMeta, ...]
    shared: tuple[SharedParameter, ...]
    modules: dict[int, torch.fx.GraphModule]


def prepare_chunks(plan: Plan, spec: ModelLike, *, rank: int) -> ChunkPrepared:
    """Check the plan against the model and build ``rank``'s chunks (both engines use it).

    Raises:
        PlanError: The model does not match the plan.
        ModelError: The model cannot be traced.
    """
    layout = ChunkLayout.of_plan(plan)
    captured = capture_for_plan(plan, spec.module)
    cut = cut_graph(captured, [stage.layers for stage in plan.stages])
    example, _ = microbatch(spec.make_batch(plan.microbatch_size, 0), 0, size=plan.microbatch_size)
    values = propagate(captured, example)
    metas = tuple(BoundaryMeta.from_values(names, values) for names in cut.boundaries)
    modules = {s: build_stage_module(captured, cut, s) for s in layout.stages_of(rank)}
    # keep only this rank's chunks' weights: the plan budgets its stages, not the whole model
    release_other_stages(spec.module, torch.nn.ModuleList(modules.values()))
    return ChunkPrepared(
        spec=spec,
        layout=layout,
        metas=metas,
        shared=shared_parameters(captured, cut),
        modules=modules,
    )


def train_chunked(
    plan: Plan,
    model_factory: Callable[[], ModelLike],
    config: RunConfig,
    env: Any,
    *,
    return_state: bool = False,
) -> Any:
    """Train ``plan`` (a rank schedule) on this rank; a :class:`~planner.runtime.worker.RankResult`.

    Raises:
        RunError: Too few processes, or what :func:`check_runnable` refuses.
        PlanError: The model does not match the plan.
    """
    from planner.runtime.rendezvous import join_process_group
    from planner.runtime.worker import RankResult, _backend, rank_device

    config = config.with_threads(int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    needed = 1 + max(ChunkLayout.of_plan(plan).stage_to_rank)
    if needed > env.world_size:
        raise RunError(
            f"the plan uses ranks up to {needed - 1} but only {env.world_size} processes were "
            f"started; start {needed} or re-plan for fewer devices"
        )
    prep = prepare_chunks(plan, model_factory(), rank=env.rank)
    check_runnable(plan, config, shared=prep.shared)
    layout, metas, modules, spec = prep.layout, prep.metas, prep.modules, prep.spec
    mine = layout.stages_of(env.rank)
    last = layout.num_stages - 1
    source = None
    if 0 in mine or last in mine:
        source = data_source(
            spec,
            data=config.data,
            minibatch_size=plan.minibatch_size,
            seed=config.seed,
            input_shape=plan.profile.input_shape,
        )
    backend = _backend(config.backend, env.world_size)
    device = rank_device(backend, env.local_rank)
    join_process_group(
        backend,
        rank=env.rank,
        world_size=env.world_size,
        master_addr=env.master_addr,
        master_port=env.master_port,
        timeout_s=config.timeout_s,
    )
    try:
        check_agreement(metas, rank=env.rank)
        active = dist.new_group(sorted(set(layout.stage_to_rank)))  # every rank calls it
        memory = keep_freed_memory() if device.type == "cpu" else contextlib.nullcontext()
        with memory:
            result = _run(plan, config, env, layout, modules, metas, spec, source, device, active)
        steps, stats, state = result
        if not return_state:
            state = {}
        gathered: list[Any] = [None] * env.world_size if env.rank == 0 else []
        dist.gather_object((stats, steps), gathered if env.rank == 0 else None, dst=0)
        report = None
        if env.rank == 0:
            report = _report(plan, config, env, backend, layout, gathered)
            report.save(config.report_file)
            if config.log_every:
                print(report.describe(), flush=True)
                print(
                    "(no predicted-vs-measured table: the simulator's stages are virtual, the "
                    "report's rows are ranks)",
                    flush=True,
                )
                print(f"report written to {config.report_file}", flush=True)
    finally:
        dist.destroy_process_group()
    return RankResult(
        rank=env.rank,
        stage=mine[0] if mine else None,
        losses=tuple(s.loss for s in steps),
        stats=stats,
        state=state,
        report=report,
    )


def _run(
    plan: Plan,
    config: RunConfig,
    env: Any,
    layout: ChunkLayout,
    modules: Mapping[int, torch.nn.Module],
    metas: tuple[BoundaryMeta, ...],
    spec: ModelLike,
    source: Any,
    device: torch.device,
    active: Any,
) -> tuple[list[StepStats], RankStats | None, dict[str, torch.Tensor]]:
    from planner.runtime.loops import _slicer, _to, optimizer_settings

    if not modules:  # a rank the plan leaves idle
        return [], None, {}
    on_device = {s: m.to(device) for s, m in modules.items()}
    timers = CommTimers()
    p2p = PointToPoint(
        device=device, timers=timers, max_tensors=max([len(m.tensors) for m in metas] + [1])
    )
    executors = build_executors(
        layout, rank=env.rank, modules=on_device, metas=metas, loss_fn=spec.loss_fn, p2p=p2p
    )
    settings = optimizer_settings(plan, config)
    params = list(
        dict.fromkeys(p for m in on_device.values() for p in m.parameters() if p.requires_grad)
    )
    clipper = None
    if settings.clip_grad_norm is not None:
        clipper = GradientClipper(
            max_norm=settings.clip_grad_norm,
            counted=params,
            scaled=params,
            group=active,
            device=device,
        )
    runner = ChunkedSchedule(
        layout=layout,
        rank=env.rank,
        executors=executors,
        optimizer=settings.build(params),
        clipper=clipper,
    )
    last = layout.num_stages - 1
    holds_last = last in executors
    ops = runner.ops
    steps: list[StepStats] = []
    started = time.perf_counter()
    for step in range(config.steps):
        if step == 1:  # leave the warm-up step out of the totals
            for ex in executors.values():
                ex.compute_s = 0.0
            runner.step_s = 0.0
            timers.reset()
            started = time.perf_counter()
        t0 = time.perf_counter()
        batch = _to(source(step), device) if source is not None else None
        losses = runner.step(
            inputs=None if batch is None else _slicer(batch, plan.microbatch_size, inputs=True),
            targets=None if batch is None else _slicer(batch, plan.microbatch_size, inputs=False),
        )
        loss = float("nan")
        if holds_last:
            loss = float(torch.stack(losses).sum()) / plan.microbatches
        wall = time.perf_counter() - t0
        steps.append(
            StepStats(step=step, loss=loss, wall_s=wall, samples_per_s=plan.minibatch_size / wall)
        )
        every = config.log_every
        if holds_last and every and (step + 1) % every == 0:
            print(
                f"step {step + 1}/{config.steps}  loss {loss:.4f}  "
                f"{plan.minibatch_size / wall:.1f} samples/s  ({wall * 1e3:.1f} ms)",
                flush=True,
            )
    measured = config.steps - 1 if config.steps > 1 else 1
    forwards = sum(1 for op in ops if op.kind == "F")
    stats = RankStats(
        rank=env.rank,
        stage=min(executors),
        replica=0,
        microbatches_per_step=forwards,
        samples_per_step=forwards * plan.microbatch_size,
        steps=measured,
        wall_s=time.perf_counter() - started,
        compute_s=sum(ex.compute_s for ex in executors.values()),
        wait_s=timers.wait_s,
        send_s=timers.send_s,
        sync_s=timers.sync_s,
        update_s=runner.step_s,
        bytes_sent=timers.bytes_sent,
        bytes_received=timers.bytes_received,
    )
    state: dict[str, torch.Tensor] = {}
    for module in on_device.values():  # parameters and buffers (BatchNorm statistics)
        for name, value in [*module.named_parameters(), *module.named_buffers()]:
            state[name] = value.detach().cpu().clone()
    return steps, stats, state


def _report(
    plan: Plan,
    config: RunConfig,
    env: Any,
    backend: str,
    layout: ChunkLayout,
    gathered: list[Any],
) -> RunReport:
    ranks = sorted((s for s, _ in gathered if s is not None), key=lambda r: r.stage)
    holder = layout.stage_to_rank[-1]
    steps: list[StepStats] = gathered[holder][1] if holder < len(gathered) else []
    measured = steps[1:] if len(steps) > 1 else steps
    mean_s = sum(s.wall_s for s in measured) / max(len(measured), 1)
    return RunReport(
        plan=config.plan_path,
        model=plan.profile.model,
        schedule=str(plan.schedule),
        world_size=env.world_size,
        minibatch_size=plan.minibatch_size,
        microbatches=plan.microbatches,
        steps=config.steps,
        measured_steps=len(measured),
        samples_per_s=plan.minibatch_size / mean_s if mean_s > 0 else 0.0,
        losses=tuple(s.loss for s in steps),
        step_stats=tuple(steps),
        ranks=tuple(ranks),
        stages=tuple(StageStats.of(r.stage, [r]) for r in ranks),
        backend=backend,
        threads=config.threads,
        torch_version=torch.__version__,
    )
