"""Executing a replica's operation list: forwards and backwards of microbatches, in plan order.

The order comes from :func:`planner.schedules.replica_order`, the same lists the simulator walks;
this module only carries them out. :class:`StageExecutor` knows how to run one ``F m`` or ``B m``
on its stage (receive, compute, send); :class:`FlushSchedule` runs one minibatch of ``gpipe`` or
``1f1b`` and ends it with the flush: wait for sends, sum gradients across replicas, step the
optimizer. The asynchronous ``pipedream`` schedule is another driver of the same executor
(:mod:`planner.runtime.pipedream`): it walks the run's whole op list and plugs a weight stash
into the executor (:class:`WeightSource`), so forwards and backwards see stashed versions.

Receives are posted early: before an operation runs, the receives of the next few operations
(as many as the stage holds microbatches in flight, twice over) are already posted, so a transfer
overlaps the compute before it.

Gradient scaling: the last stage back-propagates ``loss_m / M`` for each microbatch ``m`` of the
``M`` in a minibatch; gradients accumulate over a replica's microbatches and are summed over the
replicas, which gives the gradient of the mean of the microbatch losses. When the model's loss is
a mean over samples, that is exactly single-process training on the whole minibatch.

Example:
    >>> from planner.schedules import Schedule, format_ops
    >>> format_ops(FlushSchedule.ops_for(Schedule.GPIPE, replicas=(2, 1), stage=0, replica=0,
    ...                                  microbatches=4))
    'F0 F2 B0 B2'
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from planner.runtime.buffers import BufferSync, frozen_buffers
from planner.runtime.comm import BoundaryMeta, GradientSync, PendingRecv, Placement, PointToPoint
from planner.runtime.optim import GradientClipper
from planner.schedules import Op, Schedule, in_flight, replica_order

__all__ = ["FlushSchedule", "StageExecutor", "WeightSource"]

InputsFn = Callable[[int], Sequence[Any]]
TargetsFn = Callable[[int], Any]


class WeightSource(Protocol):
    """Weights per microbatch, for schedules that keep several versions (PipeDream)."""

    def forward_weights(self, microbatch: int) -> dict[str, torch.Tensor]:
        """The weights ``F microbatch`` runs with (by qualified name)."""

    def backward_weights(self, microbatch: int) -> dict[str, torch.Tensor]:
        """The same weights again, for recomputation in ``B microbatch``."""

    def backward_done(self, microbatch: int) -> None:
        """``B microbatch`` finished: collect its gradients, release its version if unused."""


@dataclass
class _Saved:
    """What a forward keeps for its backward."""

    inputs: list[torch.Tensor]  # received tensors (leaves); their .grad goes upstream
    values: list[Any]  # the stage's input values (for recomputation)
    outputs: list[torch.Tensor]  # outputs whose gradients come back (or the scaled loss)
    rng: torch.Tensor | None = None  # RNG state before the forward, when recomputing
    targets: Any = None


class StageExecutor:
    """Runs forwards and backwards of one replica of one stage.

    Args:
        module: The stage's module (:func:`planner.runtime.stage.build_stage_module`).
        stage: Its stage index.
        placement: Ranks of all stages' replicas.
        in_meta: The boundary into this stage (None for stage 0).
        out_meta: The boundary out of it (None for the last stage).
        microbatches: Microbatches per minibatch (``M``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, used on the last stage.
        p2p: Point-to-point transport.
        recompute: Keep only a stage's inputs in forward; recompute in backward.
        loss_divisor: Each microbatch's loss is divided by this before back-propagation
            (default ``M``: the flushed schedules' mean over the minibatch).
        weights: Where forwards and backwards take the weights from (weight stashing); None
            runs the module's own parameters.
        buffers: Collects BatchNorm statistics of a replicated stage (told each forward's
            microbatch); recomputation never updates running statistics a second time.
    """

    def __init__(
        self,
        *,
        module: torch.nn.Module,
        stage: int,
        placement: Placement,
        in_meta: BoundaryMeta | None,
        out_meta: BoundaryMeta | None,
        microbatches: int,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        p2p: PointToPoint,
        recompute: bool = False,
        loss_divisor: int | None = None,
        weights: WeightSource | None = None,
        buffers: BufferSync | None = None,
    ) -> None:
        self.module = module
        self.stage = stage
        self.placement = placement
        self.in_meta = in_meta
        self.out_meta = out_meta
        self.microbatches = microbatches
        self.loss_fn = loss_fn
        self.p2p = p2p
        self.recompute = recompute
        self.loss_divisor = microbatches if loss_divisor is None else loss_divisor
        self.weights = weights
        self.buffers = buffers
        self.compute_s = 0.0
        self.losses: list[tuple[int, torch.Tensor]] = []  # (microbatch, unscaled loss), last stage
        self._saved: dict[int, _Saved] = {}
        self._posted: dict[Op, PendingRecv] = {}
        self._upcoming: deque[Op] = deque()
        self._window = 1

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.placement.num_stages - 1

    # --- receives, posted ahead ----------------------------------------------------------

    def plan_receives(self, ops: Sequence[Op], window: int) -> None:
        """Announce the coming operations; receives for up to ``window`` of them are kept posted."""
        self._upcoming.extend(op for op in ops if self._needs_recv(op))
        self._window = max(1, window)
        self._post_ahead()

    def _needs_recv(self, op: Op) -> bool:
        return not self.is_first if op.kind == "F" else not self.is_last

    def _post_ahead(self) -> None:
        while self._upcoming and len(self._posted) < self._window:
            op = self._upcoming.popleft()
            if op.kind == "F":
                assert self.in_meta is not None
                src = self.placement.rank_of(self.stage - 1, op.microbatch)
                metas = self.in_meta.tensors
            else:
                assert self.out_meta is not None
                src = self.placement.rank_of(self.stage + 1, op.microbatch)
                metas = tuple(self.out_meta.tensors[i] for i in self.out_meta.grad_indices)
            self._posted[op] = self.p2p.irecv(
                metas, src=src, microbatch=op.microbatch, backward=op.kind == "B"
            )

    def _received(self, op: Op) -> list[torch.Tensor]:
        if op not in self._posted:  # not announced: post it now
            self._upcoming = deque(o for o in self._upcoming if o != op)
            self._upcoming.appendleft(op)
            self._window += 1
            self._post_ahead()
            self._window -= 1
        tensors = self._posted.pop(op).wait()
        self._post_ahead()
        return tensors

    # --- operations ----------------------------------------------------------------------

    def forward(
        self, microbatch: int, *, inputs: InputsFn | None = None, targets: TargetsFn | None = None
    ) -> None:
        """``F m``: receive (or read) the stage's inputs, compute, send the outputs on."""
        if self.is_first:
            assert inputs is not None, "stage 0 needs the microbatch's inputs"
            received: list[torch.Tensor] = []
            values = list(inputs(microbatch))
        else:
            assert self.in_meta is not None
            received = self._received(Op("F", microbatch))
            for i in self.in_meta.grad_indices:
                received[i].requires_grad_(True)
            values = self.in_meta.unflatten(received)
        target = None
        if self.is_last:
            assert targets is not None, "the last stage needs the microbatch's targets"
            target = targets(microbatch)
        start = time.perf_counter()
        rng = torch.get_rng_state() if self.recompute else None
        weights = None if self.weights is None else self.weights.forward_weights(microbatch)
        if self.buffers is not None:
            self.buffers.microbatch = microbatch % self.microbatches
        with torch.set_grad_enabled(not self.recompute):
            outputs, sent = self._compute(microbatch, values, target, weights)
        self.compute_s += time.perf_counter() - start
        self._saved[microbatch] = _Saved(
            inputs=received, values=values, outputs=outputs, rng=rng, targets=target
        )
        if sent is not None:
            self.p2p.isend(
                sent,
                dst=self.placement.rank_of(self.stage + 1, microbatch),
                microbatch=microbatch,
                backward=False,
            )

    def _compute(
        self,
        microbatch: int,
        values: list[Any],
        target: Any,
        weights: dict[str, torch.Tensor] | None,
        *,
        record: bool = True,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Run the stage; returns (tensors to back-propagate from, tensors to send or None)."""
        if weights is None:
            out = self.module(*values)
        else:  # a stashed weight version, not the live parameters
            out = torch.func.functional_call(self.module, weights, tuple(values))
        if self.is_last:
            loss = self.loss_fn(out, target)
            if record:
                self.losses.append((microbatch, loss.detach()))
            return [loss / self.loss_divisor], None  # see the module docstring: mean over M
        assert self.out_meta is not None
        flat = self.out_meta.flatten(out, check_grad=not self.recompute)
        return [flat[i] for i in self.out_meta.grad_indices], flat

    def backward(self, microbatch: int) -> None:
        """``B m``: receive the outputs' gradients, back-propagate, send the inputs' upstream."""
        saved = self._saved.pop(microbatch)
        grads = None if self.is_last else self._received(Op("B", microbatch))
        start = time.perf_counter()
        outputs = saved.outputs
        if self.recompute:
            assert saved.rng is not None
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(saved.rng)
                weights = (
                    None if self.weights is None else self.weights.backward_weights(microbatch)
                )
                with torch.enable_grad(), frozen_buffers(self.module, self.buffers):
                    outputs, _ = self._compute(
                        microbatch, saved.values, saved.targets, weights, record=False
                    )
        if outputs:
            torch.autograd.backward(outputs, grads)
        if self.weights is not None:
            self.weights.backward_done(microbatch)
        upstream: list[torch.Tensor] | None = None
        if not self.is_first:
            assert self.in_meta is not None
            upstream = [_grad_or_zeros(saved.inputs[i]) for i in self.in_meta.grad_indices]
        self.compute_s += time.perf_counter() - start
        if upstream is not None:
            self.p2p.isend(
                upstream,
                dst=self.placement.rank_of(self.stage - 1, microbatch),
                microbatch=microbatch,
                backward=True,
            )

    def run_ops(
        self, ops: Sequence[Op], *, inputs: InputsFn | None = None, targets: TargetsFn | None = None
    ) -> None:
        """Run ``ops`` in order."""
        for op in ops:
            if op.kind == "F":
                self.forward(op.microbatch, inputs=inputs, targets=targets)
            else:
                self.backward(op.microbatch)

    def take_losses(self) -> list[torch.Tensor]:
        """The unscaled losses of the microbatches run since the last call (last stage)."""
        losses, self.losses = self.losses, []
        return [loss for _, loss in losses]


def _grad_or_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """An input's gradient; zeros when the stage did not use it differentiably."""
    return tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)


@dataclass
class FlushSchedule:
    """One minibatch of ``gpipe`` or ``1f1b`` per :meth:`step`, ending with the flush.

    Attributes:
        executor: The stage's executor.
        schedule: ``gpipe`` or ``1f1b``.
        replica: Which replica of its stage this rank is.
        sync: Gradient all-reduce among the ranks holding each parameter.
        optimizer: The stage's optimizer (None for a stage without parameters).
        clipper: Clips the whole model's gradient after the all-reduce (None: no clipping).
        buffers: Combines a replicated stage's BatchNorm statistics at the flush.
        loss_group: On the last stage when replicated: the group of its replicas. Each step
            then sums the replicas' losses in the gradient all-reduce (one collective fewer)
            into :attr:`loss_sum`.
        loss_sum: After :meth:`step` with a ``loss_group``: the sum of the minibatch's
            microbatch losses over every replica.
    """

    executor: StageExecutor
    schedule: Schedule
    replica: int
    sync: GradientSync
    optimizer: torch.optim.Optimizer | None
    clipper: GradientClipper | None = None
    buffers: BufferSync | None = None
    loss_group: Any = None
    step_s: float = 0.0
    loss_sum: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.schedule is Schedule.PIPEDREAM:
            raise ValueError("FlushSchedule runs gpipe and 1f1b; pipedream has no flush")

    @staticmethod
    def ops_for(
        schedule: Schedule, *, replicas: Sequence[int], stage: int, replica: int, microbatches: int
    ) -> tuple[Op, ...]:
        """The replica's operations for one minibatch: :func:`planner.schedules.replica_order`."""
        return replica_order(
            schedule, replicas=replicas, stage=stage, replica=replica, microbatches=microbatches
        )

    @property
    def ops(self) -> tuple[Op, ...]:
        ex = self.executor
        return self.ops_for(
            self.schedule,
            replicas=ex.placement.replicas,
            stage=ex.stage,
            replica=self.replica,
            microbatches=ex.microbatches,
        )

    def step(self, *, inputs: InputsFn | None, targets: TargetsFn | None) -> list[torch.Tensor]:
        """Run one minibatch and update the weights; returns this replica's microbatch losses."""
        ex = self.executor
        ops = self.ops
        depth = in_flight(
            self.schedule,
            num_stages=ex.placement.num_stages,
            stage=ex.stage,
            microbatches=ex.microbatches,
            replicas=ex.placement.replicas,
        )
        ex.plan_receives(ops, window=2 * depth)
        ex.run_ops(ops, inputs=inputs, targets=targets)
        ex.p2p.flush()
        losses = ex.take_losses()
        local = None
        if self.loss_group is not None:
            local = torch.stack(losses).sum() if losses else torch.zeros((), device=ex.p2p.device)
        self.loss_sum = self.sync.all_reduce(local, extra_group=self.loss_group)
        if self.buffers is not None:
            self.buffers.finish()
        start = time.perf_counter()
        if self.clipper is not None:
            self.clipper.clip()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_s += time.perf_counter() - start
        return losses
