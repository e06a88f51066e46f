"""The training loops of one stage replica: flushed schedules step by step, PipeDream in one go.

Both take the same :class:`StageContext` (what :mod:`planner.runtime.worker` set up) and return
the same :class:`LoopResult`: per-step losses and times seen by this replica, and its
:class:`~planner.runtime.report.RankStats`.

Data: minibatch ``k`` of the run is the data source's step ``k``; microbatch ``j`` of it is rows
``j b .. (j + 1) b``. PipeDream numbers microbatches through the run: microbatch ``g`` is
microbatch ``g % M`` of minibatch ``g // M``, so both kinds of schedule see the same samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from planner.errors import PlannerError
from planner.plan import Plan
from planner.runtime.buffers import BufferSync
from planner.runtime.checkpoint import Checkpointer
from planner.runtime.comm import BoundaryMeta, CommTimers, GradientSync, Placement, PointToPoint
from planner.runtime.config import RunConfig, RunError
from planner.runtime.data import Batch, DataSource, microbatch
from planner.runtime.executors import FlushSchedule, StageExecutor
from planner.runtime.optim import GradientClipper, OptimizerSettings
from planner.runtime.pipedream import PipeDreamSchedule, WeightStash
from planner.runtime.report import RankStats, StepStats
from planner.runtime.stage import SharedParameter
from planner.schedules import Schedule

__all__ = [
    "SCHEDULE_LOOPS",
    "LoopResult",
    "StageContext",
    "condition_notes",
    "merge_losses",
    "optimizer_settings",
    "run_flush",
    "run_pipedream",
    "training_notes",
]


@dataclass(frozen=True, kw_only=True)
class StageContext:
    """Everything a replica's loop needs.

    Attributes:
        plan: The plan.
        config: The run's options.
        rank: Global rank.
        stage: Its stage.
        replica: Its replica index.
        placement: Ranks of every stage.
        module: The stage's module, on ``device``.
        metas: Every boundary's metadata.
        loss_fn: The model's loss.
        sync: Gradient all-reduce.
        stage_group: The process group of the stage's replicas (None if unreplicated).
        source: Minibatches by step (stage 0 and the last stage), else None.
        device: Where the stage runs.
        timers: Communication timers shared with ``sync``.
        start_step: The first step to run (after a resumed checkpoint).
        saved: This rank's state from the checkpoint resumed, or None.
        checkpointer: Saves checkpoints when due.
        active_group: The group of every rank running a stage (gradient clipping's norm).
        shared: Parameters held by several stages (counted once in the gradient norm).
    """

    plan: Plan
    config: RunConfig
    rank: int
    stage: int
    replica: int
    placement: Placement
    module: torch.nn.Module
    metas: tuple[BoundaryMeta, ...]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    sync: GradientSync
    stage_group: Any
    source: DataSource | None
    device: torch.device
    timers: CommTimers
    start_step: int = 0
    saved: dict[str, Any] | None = None
    checkpointer: Checkpointer | None = None
    active_group: Any = None
    shared: tuple[SharedParameter, ...] = ()

    @property
    def is_last(self) -> bool:
        return self.stage == self.placement.num_stages - 1

    @property
    def settings(self) -> OptimizerSettings:
        """The optimizer this run trains with: the plan's, with the run's options on top."""
        return optimizer_settings(self.plan, self.config)

    def executor(self, **kwargs: Any) -> StageExecutor:
        max_tensors = max([len(m.tensors) for m in self.metas] + [1])
        last = self.placement.num_stages - 1
        return StageExecutor(
            module=self.module,
            stage=self.stage,
            placement=self.placement,
            in_meta=self.metas[self.stage - 1] if self.stage > 0 else None,
            out_meta=self.metas[self.stage] if self.stage < last else None,
            microbatches=self.plan.microbatches,
            loss_fn=self.loss_fn,
            p2p=PointToPoint(device=self.device, timers=self.timers, max_tensors=max_tensors),
            recompute=self.plan.recompute,
            **kwargs,
        )

    def optimizer(self) -> torch.optim.Optimizer | None:
        """The stage's optimizer (:attr:`settings`); restored from a resumed checkpoint."""
        params = list(dict.fromkeys(p for p in self.module.parameters() if p.requires_grad))
        optimizer = self.settings.build(params)
        if self.saved is not None:
            Checkpointer.restore(self.saved, module=self.module, optimizer=optimizer)
        return optimizer

    def clipper(self) -> GradientClipper | None:
        """Global-norm gradient clipping, when asked for (see :mod:`planner.runtime.optim`)."""
        max_norm = self.settings.clip_grad_norm
        if max_norm is None:
            return None
        params = list(dict.fromkeys(p for p in self.module.parameters() if p.requires_grad))
        not_mine = {
            id(self.module.get_parameter(sp.name_in(self.stage)))
            for sp in self.shared
            if self.stage in sp.stages and sp.stages[0] != self.stage
        }
        counted = [p for p in params if id(p) not in not_mine] if self.replica == 0 else []
        return GradientClipper(
            max_norm=max_norm,
            counted=counted,
            scaled=params,
            group=self.active_group,
            device=self.device,
        )

    def buffer_sync(self) -> BufferSync | None:
        """Single-process BatchNorm statistics for a replicated stage (flushed schedules)."""
        if self.stage_group is None:
            return None
        sync = BufferSync(self.module, microbatches=self.plan.microbatches, group=self.stage_group)
        return sync if sync.norms else None

    def maybe_checkpoint(
        self, steps_done: int, optimizer: torch.optim.Optimizer | None, **extra: Any
    ) -> None:
        if self.checkpointer is not None and self.checkpointer.due(steps_done):
            self.checkpointer.save(
                steps_done,
                module=self.module,
                optimizer=optimizer,
                stage=self.stage,
                replica=self.replica,
                extra=extra,
            )

    def log(self, step: int, loss: float, wall_s: float) -> None:
        every = self.config.log_every
        if every and (step + 1) % every == 0:
            rate = self.plan.minibatch_size / wall_s if wall_s > 0 else float("inf")
            print(
                f"step {step + 1}/{self.config.steps}  loss {loss:.4f}  {rate:.1f} samples/s  "
                f"({wall_s * 1e3:.1f} ms)",
                flush=True,
            )


@dataclass(frozen=True, kw_only=True)
class LoopResult:
    """What one replica's loop measured.

    Attributes:
        steps: Per-step loss and time (complete on the last stage's first replica, else empty).
        stats: The replica's time totals.
        losses: ``(microbatch, loss, unix time)`` of its own microbatches (last stage, pipedream).
    """

    steps: list[StepStats]
    stats: RankStats
    losses: list[tuple[int, float, float]] = field(default_factory=list)


def run_flush(ctx: StageContext) -> LoopResult:
    """``gpipe`` or ``1f1b``: one minibatch per step, flushed; the first step is warm-up."""
    plan, timers = ctx.plan, ctx.timers
    buffers = ctx.buffer_sync()
    executor = ctx.executor(buffers=buffers)
    runner = FlushSchedule(
        executor=executor,
        schedule=plan.schedule,
        replica=ctx.replica,
        sync=ctx.sync,
        optimizer=ctx.optimizer(),
        clipper=ctx.clipper(),
        buffers=buffers,
        loss_group=ctx.stage_group if ctx.is_last else None,
    )
    logs = ctx.replica == 0 and ctx.is_last
    mine = sum(1 for op in runner.ops if op.kind == "F")
    steps: list[StepStats] = []
    started = time.perf_counter()
    for step in range(ctx.start_step, ctx.config.steps):
        if step == ctx.start_step + 1:  # leave the warm-up step out of the totals
            executor.compute_s = runner.step_s = 0.0
            timers.reset()
            started = time.perf_counter()
        t0 = time.perf_counter()
        batch = _to(ctx.source(step), ctx.device) if ctx.source is not None else None
        losses = runner.step(
            inputs=None if batch is None else _slicer(batch, plan.microbatch_size, inputs=True),
            targets=None if batch is None else _slicer(batch, plan.microbatch_size, inputs=False),
        )
        loss = float("nan")
        if ctx.is_last:  # the minibatch's loss: mean of its microbatches' over all replicas
            if runner.loss_sum is not None:  # summed in the gradient all-reduce
                total = runner.loss_sum
            else:
                total = torch.stack(losses).sum() if losses else torch.zeros((), device=ctx.device)
            loss = total.item() / plan.microbatches
        wall = time.perf_counter() - t0
        steps.append(
            StepStats(step=step, loss=loss, wall_s=wall, samples_per_s=plan.minibatch_size / wall)
        )
        if logs:
            ctx.log(step, loss, wall)
        ctx.maybe_checkpoint(step + 1, runner.optimizer)
    run = ctx.config.steps - ctx.start_step
    measured = run - 1 if run > 1 else 1
    return LoopResult(
        steps=steps,
        stats=_stats(ctx, executor, runner.step_s, mine, measured, time.perf_counter() - started),
    )


def run_pipedream(ctx: StageContext) -> LoopResult:
    """``pipedream``: all ``steps x M`` microbatches in one asynchronous run, weights stashed.

    With checkpoints the run drains every ``--checkpoint-every`` steps (see
    :mod:`planner.runtime.checkpoint`).
    """
    plan = ctx.plan
    m_count, replicas = plan.microbatches, ctx.placement.replicas
    total = m_count * ctx.config.steps
    stash = WeightStash(
        ctx.module,
        limit=PipeDreamSchedule.version_limit(replicas, ctx.stage, total),
        # a resumed run continues the version count its checkpoint saved
        version=int(ctx.saved.get("stash_version", 0)) if ctx.saved is not None else 0,
    )
    executor = ctx.executor(loss_divisor=1, weights=stash)
    runner = PipeDreamSchedule(
        executor=executor,
        replica=ctx.replica,
        sync=ctx.sync,
        optimizer=ctx.optimizer(),
        stash=stash,
        update_interval=ctx.config.update_interval,
    )
    batches = _Batches(ctx.source, ctx.device)

    def inputs(g: int) -> Any:
        return microbatch(batches.get(g // m_count), g % m_count, size=plan.microbatch_size)[0]

    def targets(g: int) -> Any:
        return microbatch(batches.get(g // m_count), g % m_count, size=plan.microbatch_size)[1]

    steps: list[StepStats] = []
    pending: dict[int, list[float]] = {}
    started = last_t = time.perf_counter()

    def on_loss(g: int, loss: float) -> None:  # live log when one replica sees every loss
        nonlocal last_t
        pending.setdefault(g // m_count, []).append(loss)
        step = g // m_count
        if len(pending[step]) == m_count:
            now = time.perf_counter()
            mean = sum(pending.pop(step)) / m_count
            steps.append(
                StepStats(
                    step=step,
                    loss=mean,
                    wall_s=now - last_t,
                    samples_per_s=plan.minibatch_size / (now - last_t),
                )
            )
            last_t = now
            ctx.log(step, mean, steps[-1].wall_s)

    alone = ctx.is_last and replicas[ctx.stage] == 1
    # with checkpoints, drain every `every` steps: the only points where nothing is in flight
    every = ctx.config.checkpoint_every if ctx.checkpointer is not None else 0
    every = every if every and ctx.config.checkpoint_dir is not None else ctx.config.steps
    start = ctx.start_step
    while start < ctx.config.steps:
        end = min(ctx.config.steps, (start // every + 1) * every)
        runner.run(
            minibatches=end - start,
            inputs=inputs if ctx.stage == 0 else None,
            targets=targets if ctx.is_last else None,
            on_loss=on_loss if alone else None,
            first_microbatch=start * m_count,
        )
        ctx.maybe_checkpoint(end, runner.optimizer, stash_version=stash.version)
        start = end
    run = ctx.config.steps - ctx.start_step
    mine = sum(1 for g in range(run * m_count) if g % replicas[ctx.stage] == ctx.replica)
    stats = _stats(
        ctx, executor, runner.step_s, mine / run, run, time.perf_counter() - started, stash
    )
    return LoopResult(steps=steps, stats=stats, losses=runner.loss_times)


def optimizer_settings(plan: Plan, config: RunConfig) -> OptimizerSettings:
    """The optimizer a run of ``plan`` trains with (the plan's, the run's options on top).

    Raises:
        RunError: Bad values, momentum for Adam, or clipping under ``pipedream``.
    """
    settings = OptimizerSettings.resolve(
        plan_kind=str(plan.optimizer),
        plan_weight_decay=plan.weight_decay,
        plan_clip=plan.clip_grad_norm,
        kind=config.optimizer,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        clip_grad_norm=config.clip_grad,
    )
    if settings.clip_grad_norm is not None and plan.schedule is Schedule.PIPEDREAM:
        raise RunError(
            "gradient clipping needs a global step, which 'pipedream' lacks (every stage "
            "updates on its own cadence); drop --clip-grad or re-plan with --schedule 1f1b"
        )
    return settings


def training_notes(plan: Plan, config: RunConfig) -> list[str]:
    """One line per way the run trains differently from what the plan assumed (empty if none).

    Raises:
        RunError: The optimizer options are invalid for this plan.
    """
    from planner.runtime.chunked_run import check_runnable

    check_runnable(plan, config)  # what the rank schedules do not run yet
    settings = optimizer_settings(plan, config)
    plan_kind = str(plan.optimizer)
    plan_factor = OptimizerSettings.resolve(plan_kind=plan_kind, lr=config.lr).state_factor
    return settings.differences(
        plan_kind=plan_kind, plan_factor=plan_factor, plan_weight_decay=plan.weight_decay
    )


def condition_notes(plan: Plan, config: RunConfig, *, backend: str) -> list[str]:
    """One line per way a local run's ranks compute differently from the plan's profile.

    ``config.threads`` must be resolved (:meth:`RunConfig.with_threads`). Compares threads, the
    clock, the allocator setting and the device (:func:`planner.profile.conditions.differences`).
    """
    from planner.plan import find_profile_file
    from planner.profile.conditions import RunConditions, cuda_device_name, differences
    from planner.profile.format import Profile
    from planner.profile.timing import glibc_available

    cuda = backend == "nccl"
    notes = []
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not cuda and gpus:
        notes.append(
            f"running on the CPU with gloo although this machine has {gpus} GPU(s): nccl needs "
            "one GPU per local rank (--backend nccl refuses instead)"
        )
    try:
        profile = Profile.load(find_profile_file(plan, config.plan_path))
    except PlannerError as exc:
        return [*notes, f"cannot compare the run's conditions with the profile's ({exc})"]
    run = RunConditions(
        device="cuda" if cuda else "cpu",
        threads=config.threads or 1,
        allocator=None if cuda else "keep-freed" if glibc_available() else "default",
        device_name=cuda_device_name(0) if cuda else None,
    )
    return notes + differences(
        device=profile.device,
        threads=profile.threads,
        timer=profile.timer,
        allocator=profile.allocator,
        device_name=profile.device_name,
        run=run,
    )


def merge_losses(
    losses: list[tuple[int, float, float]], *, microbatches: int, minibatch_size: int
) -> list[StepStats]:
    """Per-step losses and times from every last-stage replica's ``(m, loss, time)`` records."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for m, loss, t in losses:
        by_step.setdefault(m // microbatches, []).append((loss, t))
    out: list[StepStats] = []
    previous = min((t for _, _, t in losses), default=0.0)
    for step in sorted(by_step):
        records = by_step[step]
        if len(records) < microbatches:
            break
        end = max(t for _, t in records)
        wall = max(end - previous, 1e-9)
        out.append(
            StepStats(
                step=step,
                loss=sum(x for x, _ in records) / microbatches,
                wall_s=wall,
                samples_per_s=minibatch_size / wall,
            )
        )
        previous = end
    return out


def _stats(
    ctx: StageContext,
    executor: StageExecutor,
    update_s: float,
    microbatches: float,
    steps: int,
    wall_s: float,
    stash: WeightStash | None = None,
) -> RankStats:
    timers = ctx.timers
    return RankStats(
        rank=ctx.rank,
        stage=ctx.stage,
        replica=ctx.replica,
        microbatches_per_step=round(microbatches),
        samples_per_step=round(microbatches * ctx.plan.microbatch_size),
        steps=steps,
        wall_s=wall_s,
        compute_s=executor.compute_s,
        wait_s=timers.wait_s,
        send_s=timers.send_s,
        sync_s=timers.sync_s,
        update_s=update_s,
        bytes_sent=timers.bytes_sent,
        bytes_received=timers.bytes_received,
        max_weight_versions=0 if stash is None else stash.max_versions,
        weight_version_limit=0 if stash is None else stash.limit,
    )


class _Batches:
    """Minibatches by step, the last two kept (PipeDream's stages straddle two steps)."""

    def __init__(self, source: DataSource | None, device: torch.device) -> None:
        self.source = source
        self.device = device
        self.cache: dict[int, Batch] = {}

    def get(self, step: int) -> Batch:
        if step not in self.cache:
            assert self.source is not None, "only stage 0 and the last stage read data"
            self.cache[step] = _to(self.source(step), self.device)
            for old in [k for k in self.cache if k < step - 1]:
                del self.cache[old]
        return self.cache[step]


def _slicer(batch: Batch, size: int, *, inputs: bool) -> Callable[[int], Any]:
    def get(m: int) -> Any:
        x, y = microbatch(batch, m, size=size)
        return x if inputs else y

    return get


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


SCHEDULE_LOOPS: dict[Schedule, Callable[[StageContext], LoopResult]] = {
    Schedule.GPIPE: run_flush,
    Schedule.ONE_F_ONE_B: run_flush,
    Schedule.PIPEDREAM: run_pipedream,
}
