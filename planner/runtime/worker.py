"""One rank's training: build its stage, join the run, train, report.

:func:`prepare` does everything that can fail on bad input (plan, model, world size) before any
process group exists, so such a failure is one typed error, not a hung job. :func:`train` then
joins the run, agrees on shapes, creates the groups and runs the steps.

Every rank rebuilds the whole model from the same seed (identical initial weights on every
replica), traces it as the profiler did, checks it against the plan, propagates one microbatch
for the boundary shapes, and keeps only its own stage's submodule.

Buffers (BatchNorm running statistics): batch statistics are per microbatch, as in
single-process training with the same microbatches; on a replicated stage under the flushed
schedules the replicas combine their running statistics at every flush into exactly what one
process would hold (:mod:`planner.runtime.buffers`); under ``pipedream`` each replica keeps its own.

Example (under torchrun, or after :func:`planner.runtime.launch.launch_local` set the
environment)::

    plan = Plan.load("plan.json")
    train(plan, lambda: load_model("gpt2-tiny", batch_size=8), RunConfig(plan_path="plan.json"),
          DistEnv.from_environ())
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from planner.plan import Plan
from planner.profile.timing import keep_freed_memory
from planner.runtime.checkpoint import Checkpointer, plan_digest, resume_state
from planner.runtime.comm import (
    BoundaryMeta,
    CommTimers,
    Placement,
    check_agreement,
    make_gradient_sync,
    make_groups,
)
from planner.runtime.compare import compare_run
from planner.runtime.config import Backend, Engine, RunConfig, RunError, resolve_backend
from planner.runtime.data import DataSource, ModelLike, data_source, microbatch
from planner.runtime.loops import SCHEDULE_LOOPS, StageContext, merge_losses
from planner.runtime.rendezvous import join_process_group
from planner.runtime.report import Comparison, RankStats, RunReport, StageStats, StepStats
from planner.runtime.stage import (
    SharedParameter,
    StageCut,
    build_stage_module,
    capture_for_plan,
    cut_graph,
    propagate,
    release_other_stages,
    shared_parameters,
)
from planner.schedules import RANK_SCHEDULES, Schedule

__all__ = ["DistEnv", "Prepared", "RankResult", "load_spec", "prepare", "rank_device", "train"]


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """Where this process sits in the run (torchrun's environment variables).

    Attributes:
        rank: Global rank (``RANK``).
        world_size: Processes in the run (``WORLD_SIZE``).
        local_rank: Rank on this machine (``LOCAL_RANK``), picks the GPU.
        master_addr: Rendezvous host (``MASTER_ADDR``).
        master_port: Rendezvous port (``MASTER_PORT``).
    """

    rank: int
    world_size: int
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @classmethod
    def from_environ(cls) -> DistEnv:
        """Read torchrun's variables.

        Raises:
            RunError: A variable is missing or not a number.
        """
        try:
            return cls(
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(os.environ.get("MASTER_PORT", "29500")),
            )
        except (KeyError, ValueError) as exc:
            raise RunError(
                f"environment variable {exc} missing or invalid; run under torchrun or use "
                "`plan run PLAN.json`, which starts the processes itself"
            ) from None


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """What a rank knows before joining the run.

    Attributes:
        spec: The rebuilt model.
        placement: Ranks of every stage.
        cut: Stages' nodes and boundaries.
        metas: Metadata of every boundary.
        shared: Parameters held by several stages.
        stage: This rank's stage, or None if the plan leaves it idle.
        replica: Its replica index within the stage.
        module: Its stage's module (None when idle).
    """

    spec: ModelLike
    placement: Placement
    cut: StageCut
    metas: tuple[BoundaryMeta, ...]
    shared: tuple[SharedParameter, ...]
    stage: int | None
    replica: int
    module: fx.GraphModule | None


@dataclass(frozen=True, kw_only=True)
class RankResult:
    """What :func:`train` returns on one rank.

    Attributes:
        rank: Global rank.
        stage: Its stage (None when idle).
        losses: Per-step minibatch losses (filled on the last stage, else empty).
        stats: Its measured times (None when idle).
        state: Its stage's parameters by qualified name, on CPU, if asked for.
        report: The whole run's report (rank 0 only).
    """

    rank: int
    stage: int | None
    losses: tuple[float, ...]
    stats: RankStats | None
    state: dict[str, torch.Tensor]
    report: RunReport | None


def load_spec(plan: Plan, *, seed: int = 0, search_cwd: bool = False) -> ModelLike:
    """Rebuild the plan's model as the profiler built it (``planner.models.load_model``).

    The plan's ``model`` is imported as given: entry points check it first with
    :func:`planner.models.registry.check_trusted`, and pass ``search_cwd=True`` only for a
    reference the user trusts.

    Raises:
        ModelError: The model cannot be built.
    """
    from planner.models import load_model

    shape = plan.profile.input_shape or None
    return load_model(
        plan.profile.model,
        batch_size=plan.microbatch_size,
        input_shape=shape,
        dtype=plan.profile.dtype,
        device="cpu",
        seed=seed,
        search_cwd=search_cwd,
    )


def prepare(plan: Plan, spec: ModelLike, *, rank: int, world_size: int) -> Prepared:
    """Check the plan against the model and the world, and build this rank's stage.

    Raises:
        PlanError: The model does not match the plan.
        RunError: Fewer processes than the plan's ranks, or an unsupported schedule.
        ModelError: The model cannot be traced.
    """
    placement = Placement(ranks=tuple(stage.ranks for stage in plan.stages))
    if placement.world_size_needed > world_size:
        raise RunError(
            f"the plan uses ranks up to {placement.world_size_needed - 1} but only {world_size} "
            f"processes were started; start {placement.world_size_needed} "
            "(torchrun --nnodes/--nproc-per-node) or re-plan for fewer devices"
        )
    if not 0 <= rank < world_size:
        raise RunError(f"rank {rank} is outside a world of {world_size} processes")
    captured = capture_for_plan(plan, spec.module)
    cut = cut_graph(captured, [stage.layers for stage in plan.stages])
    example, _ = microbatch(spec.make_batch(plan.microbatch_size, 0), 0, size=plan.microbatch_size)
    values = propagate(captured, example)
    metas = tuple(BoundaryMeta.from_values(names, values) for names in cut.boundaries)
    shared = shared_parameters(captured, cut)
    if plan.schedule in RANK_SCHEDULES:
        from planner.runtime.chunked_run import check_runnable

        check_runnable(plan, shared=shared)
    if shared and plan.schedule is Schedule.PIPEDREAM:
        raise RunError(
            f"parameters are shared across stages {list(shared[0].stages)} "
            f"({', '.join(shared[0].names)}); under 'pipedream' every stage updates on its own "
            "cadence, so tied copies would drift apart: re-plan with --schedule 1f1b or gpipe"
        )
    where = placement.locate(rank)
    module = build_stage_module(captured, cut, where[0]) if where is not None else None
    return Prepared(
        spec=spec,
        placement=placement,
        cut=cut,
        metas=metas,
        shared=shared,
        stage=None if where is None else where[0],
        replica=0 if where is None else where[1],
        module=module,
    )


def train(
    plan: Plan,
    model_factory: Callable[[], ModelLike],
    config: RunConfig,
    env: DistEnv,
    *,
    return_state: bool = False,
) -> RankResult:
    """Train ``plan`` on this rank: prepare, join the process group, run the steps, report.

    Args:
        plan: The plan.
        model_factory: Builds the model with the same initial weights on every rank.
        config: Steps, learning rate, data, timeout, threads.
        env: This process's rank and the rendezvous address.
        return_state: Put the stage's final parameters in the result (tests compare them).
    """
    if config.engine is Engine.TORCH:  # torch.distributed.pipelining on the same stages
        from planner.runtime.torch_engine import train_torch

        return train_torch(plan, model_factory, config, env, return_state=return_state)
    if plan.schedule in RANK_SCHEDULES:  # several stages per rank, or a split backward
        from planner.runtime.chunked_run import train_chunked

        return train_chunked(plan, model_factory, config, env, return_state=return_state)
    # threads as the profiler assumed: the cores one of this machine's ranks gets
    config = config.with_threads(int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    prep = prepare(plan, model_factory(), rank=env.rank, world_size=env.world_size)
    # keep only this stage's weights: the plan budgets a stage per rank, not the whole model
    release_other_stages(prep.spec.module, prep.module)
    digest = plan_digest(plan.to_json())
    start, saved = 0, None
    if config.resume:
        assert config.checkpoint_dir is not None
        start, saved = resume_state(
            config.checkpoint_dir,
            rank=env.rank,
            stage=prep.stage,
            replica=prep.replica,
            plan=digest,
            steps=config.steps,
        )
    source = None
    if prep.stage in (0, len(plan.stages) - 1):  # inputs for stage 0, targets for the last
        source = data_source(
            prep.spec,
            data=config.data,
            minibatch_size=plan.minibatch_size,
            seed=config.seed,
            input_shape=plan.profile.input_shape,
        )
    backend = _backend(config.backend, env.world_size)
    device = rank_device(backend, env.local_rank)
    join_process_group(  # under torchrun its agent's store; a local run's store on loopback
        backend,
        rank=env.rank,
        world_size=env.world_size,
        master_addr=env.master_addr,
        master_port=env.master_port,
        timeout_s=config.timeout_s,
    )
    try:
        check_agreement(prep.metas, rank=env.rank)
        groups = make_groups(prep.placement, prep.shared)
        checkpointer = Checkpointer(
            config.checkpoint_dir,
            every=config.checkpoint_every,
            rank=env.rank,
            plan=digest,
            group=groups.active,
            leader=env.rank == min(prep.placement.ranks[0]),
        )
        resume = _Resume(start_step=start, saved=saved, checkpointer=checkpointer)
        # on the CPU, the allocator setting the profiler measured under (keep freed memory)
        memory = keep_freed_memory() if device.type == "cpu" else contextlib.nullcontext()
        with memory:
            result = _run(
                plan, prep, config, env, groups, device, backend, source, resume, return_state
            )
    finally:
        dist.destroy_process_group()
    return result


def _run(
    plan: Plan,
    prep: Prepared,
    config: RunConfig,
    env: DistEnv,
    groups: Any,
    device: torch.device,
    backend: str,
    source: DataSource | None,
    resume: _Resume,
    return_state: bool,
) -> RankResult:
    timers = CommTimers()
    stats: RankStats | None = None
    steps: list[StepStats] = []
    losses: list[tuple[int, float, float]] = []
    state: dict[str, torch.Tensor] = {}
    if prep.stage is not None:
        assert prep.module is not None
        module = prep.module.to(device)
        sync = make_gradient_sync(
            groups, prep.shared, stage=prep.stage, module=module, timers=timers
        )
        ctx = StageContext(
            plan=plan,
            config=config,
            rank=env.rank,
            stage=prep.stage,
            replica=prep.replica,
            placement=prep.placement,
            module=module,
            metas=prep.metas,
            loss_fn=prep.spec.loss_fn,
            sync=sync,
            stage_group=groups.stages[prep.stage],
            source=source,
            device=device,
            timers=timers,
            start_step=resume.start_step,
            saved=resume.saved,
            checkpointer=resume.checkpointer,
            active_group=groups.active,
            shared=prep.shared,
        )
        loop = SCHEDULE_LOOPS[plan.schedule](ctx)
        steps, stats, losses = loop.steps, loop.stats, loop.losses
        if return_state:  # parameters and buffers (BatchNorm statistics)
            state = {k: v.detach().cpu().clone() for k, v in module.named_parameters()}
            state |= {k: v.detach().cpu().clone() for k, v in module.named_buffers()}
    gathered: list[Any] = [None] * env.world_size if env.rank == 0 else []
    dist.gather_object((stats, steps, losses), gathered if env.rank == 0 else None, dst=0)
    report = None
    if env.rank == 0:
        report = _report(plan, config, env, backend, gathered)
        report = dataclasses.replace(report, comparison=_compare(report, plan, config))
        report.save(config.report_file)
        if (
            config.log_every
            and plan.schedule is Schedule.PIPEDREAM
            and plan.stages[-1].replicas > 1
        ):  # no single replica saw every loss: log them now
            for step in report.step_stats:
                if (step.step + 1) % config.log_every == 0:
                    print(
                        f"step {step.step + 1}/{config.steps}  loss {step.loss:.4f}  "
                        f"{step.samples_per_s:.1f} samples/s",
                        flush=True,
                    )
        if config.log_every:
            print(report.describe(), flush=True)
            if report.comparison is not None:
                print(report.comparison.describe(), flush=True)
            print(f"report written to {config.report_file}", flush=True)
    if plan.schedule is Schedule.PIPEDREAM and report is not None:
        steps = list(report.step_stats)
    return RankResult(
        rank=env.rank,
        stage=prep.stage,
        losses=tuple(s.loss for s in steps),
        stats=stats,
        state=state,
        report=report,
    )


@dataclass(frozen=True, kw_only=True)
class _Resume:
    start_step: int
    saved: dict[str, Any] | None
    checkpointer: Checkpointer


def _compare(report: RunReport, plan: Plan, config: RunConfig) -> Comparison | None:
    """The predicted-vs-measured table; a run never fails for want of it."""
    try:
        return compare_run(report, plan, config.plan_path)
    except Exception as exc:  # a profile that no longer fits the plan: report, do not fail
        print(f"(no predicted-vs-measured table: {type(exc).__name__}: {exc})", flush=True)
        return None


def rank_device(backend: str, local_rank: int) -> torch.device:
    """Where a rank computes: with nccl the GPU of its local rank (one GPU per rank, checked
    before launch by :func:`resolve_backend`), with gloo the CPU."""
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def _backend(choice: Backend, world_size: int = 1) -> str:
    # without torchrun's LOCAL_WORLD_SIZE (train() called directly) every rank is local
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return resolve_backend(choice, local_ranks=local)


def _report(
    plan: Plan, config: RunConfig, env: DistEnv, backend: str, gathered: list[Any]
) -> RunReport:
    ranks = [s for s, _, _ in gathered if s is not None]
    if plan.schedule is Schedule.PIPEDREAM:  # losses are spread over the last stage's replicas
        steps = merge_losses(
            [x for _, _, losses in gathered for x in losses],
            microbatches=plan.microbatches,
            minibatch_size=plan.minibatch_size,
        )
    else:
        steps = next(
            (
                st
                for s, st, _ in gathered
                if s is not None and s.stage == len(plan.stages) - 1 and s.replica == 0
            ),
            [],
        )
    measured = steps[1:] if len(steps) > 1 else steps
    mean_s = sum(s.wall_s for s in measured) / max(len(measured), 1)
    stages = tuple(
        StageStats.of(s, [r for r in ranks if r.stage == s]) for s in range(len(plan.stages))
    )
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
        stages=stages,
        backend=backend,
        threads=config.threads,
        torch_version=torch.__version__,
    )
