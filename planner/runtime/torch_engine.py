"""``plan run --engine torch``: a plan trained by torch.distributed.pipelining's own engine.

The stages are the ones our runtime runs: the same fx stage cut (:mod:`planner.runtime.stage`),
the same boundary values (tensors that skip stages are relayed, so every stage talks to its
neighbours only, which is what torch's ``PipelineStage`` does), each stage wrapped in a
``PipelineStage`` and driven by ``ScheduleGPipe`` or ``Schedule1F1B`` (``scale_grads=True``: the
gradient of the mean microbatch loss, as our runtime and single-device training compute).

**Replication.** torch's stages have one device each; a plan whose stages all have ``R``
replicas runs as ``R`` copies of the pipeline (ranks ``stage.ranks[r]`` form copy ``r``), copy
``r`` takes microbatches ``r, r + R, ...`` (our runtime's round-robin), and each stage's
gradients are averaged over its replicas before the optimizer step. Plans torch cannot express
get one line saying why and what to use (:func:`check_expressible`): the asynchronous
``pipedream`` schedule, replication that differs between stages, microbatches not divisible by
the replication or fewer per copy than stages, parameters shared by several stages, activation
recomputation, checkpoints.

Example (two local ranks)::

    plan run plan.json --engine torch --steps 20
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from planner.plan import Plan
from planner.runtime.comm import BoundaryMeta
from planner.runtime.config import RunConfig, RunError
from planner.runtime.data import ModelLike, data_source
from planner.schedules import RANK_SCHEDULES, Schedule, splits_backward

__all__ = ["TORCH_CLASSES", "check_expressible", "train_torch"]


def check_expressible(plan: Plan, config: RunConfig, *, shared: Sequence[Any] = ()) -> None:
    """Refuse, in one line, a plan or run torch.distributed.pipelining cannot express.

    Raises:
        RunError: Naming what torch lacks and what to use instead.
    """
    use = "run it with --engine ours"
    if plan.schedule in RANK_SCHEDULES:
        _check_rank_schedule(plan, config, shared=shared, use=use)
        return
    if plan.schedule not in (Schedule.ONE_F_ONE_B, Schedule.GPIPE):
        raise RunError(
            f"torch.distributed.pipelining has no {plan.schedule} schedule (asynchronous, with "
            f"weight stashing); {use}, or re-plan with --schedule 1f1b"
        )
    replicas = [stage.replicas for stage in plan.stages]
    if len(set(replicas)) > 1:
        raise RunError(
            f"torch.distributed.pipelining runs every stage on one device per pipeline copy; "
            f"this plan replicates stages {'-'.join(map(str, replicas))}; {use}, or re-plan "
            "with --straight"
        )
    if plan.microbatches % replicas[0]:
        raise RunError(
            f"{plan.microbatches} microbatches do not split evenly over {replicas[0]} pipeline "
            f"copies; {use}, or re-plan with --microbatches a multiple of {replicas[0]}"
        )
    per_copy = plan.microbatches // replicas[0]
    if per_copy < len(plan.stages):
        raise RunError(
            f"torch's schedules need at least as many microbatches per pipeline copy as stages; "
            f"this plan has {per_copy} for {len(plan.stages)} stages: {use}, or re-plan with "
            f"--microbatches {len(plan.stages) * replicas[0]} or more"
        )
    if shared:
        raise RunError(
            "parameters are shared by several stages (tied weights); torch.distributed."
            f"pipelining would update each stage's copy on its own: {use}"
        )
    if plan.recompute:
        raise RunError(f"torch's schedules do not recompute activations; {use}")
    if config.checkpoint_dir is not None or config.resume:
        raise RunError(f"--engine torch does not write or resume checkpoints; {use}")
    if config.update_interval != 1:
        raise RunError("--update-interval applies to the pipedream schedule only; drop it")


def _check_rank_schedule(plan: Plan, config: RunConfig, *, shared: Sequence[Any], use: str) -> None:
    """:func:`check_expressible` for ``interleaved-1f1b``, ``zb-h1`` and ``zbv``."""
    from planner.runtime.chunked import ChunkLayout

    positions = ChunkLayout.of_plan(plan).positions
    if list(positions) != sorted(positions):
        raise RunError(
            f"torch's {TORCH_CLASSES[plan.schedule]} puts pipeline position d on the d-th rank "
            f"of its group, but this plan places positions on ranks {list(positions)}; {use}"
        )
    if shared:
        raise RunError(
            "parameters are shared by several stages (tied weights); torch.distributed."
            f"pipelining would update each stage's copy on its own: {use}"
        )
    if plan.recompute:
        raise RunError(f"torch's schedules do not recompute activations; {use}")
    if config.checkpoint_dir is not None or config.resume:
        raise RunError(f"--engine torch does not write or resume checkpoints; {use}")
    if config.update_interval != 1:
        raise RunError("--update-interval applies to the pipedream schedule only; drop it")


TORCH_CLASSES = {
    Schedule.GPIPE: "ScheduleGPipe",
    Schedule.ONE_F_ONE_B: "Schedule1F1B",
    Schedule.INTERLEAVED_1F1B: "ScheduleInterleaved1F1B",
    Schedule.ZB_H1: "ScheduleInterleavedZeroBubble",
    Schedule.ZBV: "ScheduleZBVZeroBubble",
}
"""The torch.distributed.pipelining class that runs each schedule under ``--engine torch``."""


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose gradient is made contiguous: gloo and nccl send contiguous tensors
    only, and torch sizes a stage's gradient buffers by the strides the next stage's gives."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _FlatStage(nn.Module):
    """A stage module taking and returning flat tensors, as ``PipelineStage`` passes them.

    Non-tensor boundary values (sizes) are constants every rank computed at start-up.
    """

    def __init__(
        self,
        inner: nn.Module,
        inputs: BoundaryMeta | None,
        outputs: BoundaryMeta | None,
        *,
        copy_outputs: bool = False,
    ) -> None:
        super().__init__()
        self.inner = inner
        self._inputs = inputs
        self._outputs = outputs
        self._copy = copy_outputs

    def forward(self, *tensors: torch.Tensor) -> Any:
        # the input gradients are sent upstream as they come (a transpose's is transposed)
        tensors = tuple(_ContiguousGrad.apply(t) if t.requires_grad else t for t in tensors)
        values = self._inputs.unflatten(tensors) if self._inputs is not None else tensors
        out = self.inner(*values)
        if self._outputs is None:
            return out  # the last stage: the model's output, for the loss
        flat = self._outputs.flatten(out, check_grad=False)
        if self._copy:  # see train_torch: torch's split backward detaches outputs in place
            return tuple(t.clone(memory_format=torch.contiguous_format) for t in flat)
        # torch sends outputs as they are, and gloo/nccl send contiguous tensors only (CPU
        # scaled_dot_product_attention returns a transposed layout: a cut right after it failed)
        return tuple(t.contiguous() for t in flat)


def train_torch(
    plan: Plan,
    model_factory: Callable[[], ModelLike],
    config: RunConfig,
    env: Any,
    *,
    return_state: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> Any:
    """Train ``plan`` on this rank with torch's ``PipelineStage`` and schedules.

    Returns a :class:`planner.runtime.worker.RankResult` (no stats or report: torch's engine
    does not time stages). Losses are the minibatch means, on the last stage's ranks.
    ``on_step(step, seconds)`` is called on every rank after each step (benchmarks).
    Under ``interleaved-1f1b``, ``zb-h1`` and ``zbv`` a rank builds a ``PipelineStage`` for each
    stage it holds and gives them all to the schedule class (:data:`TORCH_CLASSES`).
    """
    from torch.distributed import pipelining

    from planner.runtime.loops import optimizer_settings
    from planner.runtime.rendezvous import join_process_group
    from planner.runtime.worker import RankResult, _backend, prepare, rank_device

    config = config.with_threads(int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    chunked = plan.schedule in RANK_SCHEDULES
    mine: dict[int, nn.Module]  # this rank's stage modules, by stage
    if chunked:
        from planner.runtime.chunked_run import prepare_chunks

        chunks = prepare_chunks(plan, model_factory(), rank=env.rank)
        spec, metas, shared = chunks.spec, chunks.metas, chunks.shared
        mine = dict(chunks.modules)
        replica, copies = 0, 1
    else:
        prep = prepare(plan, model_factory(), rank=env.rank, world_size=env.world_size)
        spec, metas, shared = prep.spec, prep.metas, prep.shared
        mine = (
            {prep.stage: prep.module} if prep.stage is not None and prep.module is not None else {}
        )
        replica, copies = prep.replica, plan.stages[0].replicas
    check_expressible(plan, config, shared=shared)
    settings = optimizer_settings(plan, config)
    num_stages = len(plan.stages)
    last = num_stages - 1
    source = None
    if 0 in mine or last in mine:
        source = data_source(
            spec,
            data=config.data,
            minibatch_size=plan.minibatch_size,
            seed=config.seed,
            input_shape=plan.profile.input_shape,
        )
    backend = _backend(config.backend, env.world_size)  # the same choice as our engine's
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
        # Every rank creates every group, in the same order (torch requires it).
        pipes: list[Any] = [
            dist.new_group(sorted({stage.ranks[r] for stage in plan.stages})) for r in range(copies)
        ]
        replica_groups: list[Any] = [
            dist.new_group(list(stage.ranks)) if copies > 1 else None for stage in plan.stages
        ]
        if not mine:
            return RankResult(
                rank=env.rank, stage=None, losses=(), stats=None, state={}, report=None
            )
        modules = {
            # torch's split backward (stage_backward_input) detaches a stage's outputs in
            # place, which fails for views and for outputs its weight gradient still needs
            # (the input of a convolution in the same stage): the stage returns copies
            s: _FlatStage(
                module,
                metas[s - 1] if s > 0 else None,
                metas[s] if s < last else None,
                copy_outputs=splits_backward(plan.schedule),
            ).to(device)
            for s, module in mine.items()
        }
        stages = [
            pipelining.PipelineStage(module, s, num_stages, device, group=pipes[replica])
            for s, module in modules.items()
        ]
        n_micro = plan.microbatches // copies
        kind = getattr(pipelining, TORCH_CLASSES[plan.schedule])
        # Every rank passes the loss: torch runs the backward only where a loss_fn is given.
        schedule = kind(
            stages if chunked else stages[0],
            n_microbatches=n_micro,
            loss_fn=spec.loss_fn,
            scale_grads=True,
        )
        params = list(
            dict.fromkeys(p for m in modules.values() for p in m.parameters() if p.requires_grad)
        )
        optimizer = settings.build(params)
        losses: list[float] = []
        size = plan.microbatch_size
        times: list[float] = []
        first = min(mine)
        for step in range(config.steps):
            begin = time.perf_counter()
            args: tuple[Any, ...] = ()
            kwargs: dict[str, Any] = {}
            if source is not None:
                batch_inputs, targets = _my_microbatches(source(step), replica, copies, size)
                if 0 in mine:
                    args = tuple(x.to(device) for x in batch_inputs)
                if last in mine:
                    micro_losses: list[torch.Tensor] = []
                    kwargs = {"target": targets.to(device), "losses": micro_losses}
            schedule.step(*args, **kwargs)
            if copies > 1:
                _average_gradients(params, replica_groups[first], copies)
            if settings.clip_grad_norm is not None:
                _clip(params, settings.clip_grad_norm, pipes[replica])
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if last in mine:
                mean = torch.stack([x.detach().float() for x in kwargs["losses"]]).mean()
                if copies > 1:
                    dist.all_reduce(mean, group=replica_groups[last])
                    mean /= copies
                losses.append(float(mean))
            times.append(time.perf_counter() - begin)
            if on_step is not None:
                on_step(step, times[-1])
            logs = last in mine and replica == 0 and config.log_every
            if logs and (step + 1) % config.log_every == 0:
                rate = plan.minibatch_size / times[-1]
                print(
                    f"step {step + 1}/{config.steps}  loss {losses[-1]:.4f}  {rate:.1f} samples/s"
                    f"  ({times[-1] * 1e3:.1f} ms, torch engine)",
                    flush=True,
                )
        if last in mine and replica == 0 and config.log_every and len(times) > 1:
            rate = plan.minibatch_size * (len(times) - 1) / sum(times[1:])
            print(
                f"torch engine: {rate:.1f} samples/s over steps 2-{len(times)} "
                f"({kind.__name__}, {num_stages} stages x {copies} copies)",
                flush=True,
            )
        state: dict[str, torch.Tensor] = {}
        if return_state:
            for module in modules.values():
                for name, value in [*module.named_parameters(), *module.named_buffers()]:
                    state[name.removeprefix("inner.")] = value.detach().to("cpu").clone()
        return RankResult(
            rank=env.rank, stage=first, losses=tuple(losses), stats=None, state=state, report=None
        )
    finally:
        dist.destroy_process_group()


def _my_microbatches(
    batch: Any, copy: int, copies: int, size: int
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Pipeline copy ``copy``'s rows: microbatches ``copy, copy + copies, ...``, concatenated."""
    inputs, targets = batch
    if copies == 1:
        return tuple(inputs), targets
    total = targets.shape[0] // size

    def rows(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[m * size : (m + 1) * size] for m in range(copy, total, copies)])

    return tuple(rows(x) for x in inputs), rows(targets)


def _average_gradients(params: list[nn.Parameter], group: Any, copies: int) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
        p.grad /= copies


def _clip(params: list[nn.Parameter], max_norm: float, pipe: Any) -> None:
    """Clip by the whole pipeline's gradient norm (each stage's parameters counted once)."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    square = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        square += g.detach().double().pow(2).sum()
    dist.all_reduce(square, group=pipe)
    scale = max_norm / (float(square.sqrt()) + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
