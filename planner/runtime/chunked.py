"""Several stages per rank, and split backwards: ``interleaved-1f1b``, ``zb-h1`` and ``zbv``.

A rank of these schedules holds ``v`` (virtual) stages, its *chunks*, and walks its list from
:func:`planner.rank_schedules.rank_orders` once per minibatch, the same lists the simulator and
torch's schedules walk (they are torch's orders):

- ``F m`` on stage ``s``: the forward of chunk ``s``; its input comes from stage ``s - 1``,
  over point-to-point from another rank, or handed over in memory when this rank holds
  ``s - 1`` too (``zbv``'s turn of the V), never sent to itself;
- ``B m``: under ``interleaved-1f1b`` the whole backward; under ``zb-h1`` and ``zbv`` the input
  gradient only, sent upstream at once, the graph kept for
- ``W m``: the weight gradient, accumulated into the chunk's parameters' ``.grad``. The split
  is torch.distributed.pipelining's own (``stage_backward_input`` saves the gradients flowing
  into the parameters' operations, ``stage_backward_weight`` finishes from them), so B and W
  together cost one backward; stage 0 has no input gradient and runs its whole backward in W,
  as torch does.

The minibatch ends with the flush, as for ``1f1b``: wait for the sends, clip the whole model's
gradient, one optimizer step over every chunk's parameters. BatchNorm running statistics need
nothing more: a stage runs its forwards in microbatch order on one rank, as one process would.

Messages between two ranks are kept apart by boundary as well as microbatch (:class:`ChunkLink`):
in ``interleaved-1f1b`` rank 0 sends stage 0's and stage 2's outputs of one microbatch to the
same rank 1. Values skipping stages are relayed through the stages between, virtual or not,
as everywhere in the runtime (:mod:`planner.runtime.stage`).

Example (rank 1 of ``zbv`` on two ranks holds stages 1 and 2, the turn of the V):
    >>> layout = ChunkLayout.of("zbv", ranks=2, chunks=2, microbatches=2)
    >>> layout.stage_to_rank, layout.stages_of(1), " ".join(map(str, layout.ops(1)))
    ((0, 1, 1, 0), (1, 2), '1F0 2F0 1F1 2F1 2B0 2W0 1B0 1W0 2B1 2W1 1B1 1W1')
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from planner.plan import Plan
from planner.rank_schedules import rank_orders, stage_ranks
from planner.runtime.comm import BoundaryMeta, PendingRecv, Placement, PointToPoint, TensorMeta
from planner.runtime.executors import InputsFn, StageExecutor, TargetsFn
from planner.runtime.optim import GradientClipper
from planner.schedules import Op, Schedule, splits_backward

__all__ = [
    "ChunkExecutor",
    "ChunkLayout",
    "ChunkLink",
    "ChunkedSchedule",
    "build_executors",
]


@dataclass(frozen=True, kw_only=True)
class ChunkLayout:
    """Where every (virtual) stage runs and what every rank does in one minibatch.

    Attributes:
        schedule: ``interleaved-1f1b``, ``zb-h1`` or ``zbv``.
        chunks: Stages per rank ``v``.
        microbatches: Microbatches per minibatch ``M``.
        stage_to_rank: The global rank of every stage, ``p v`` of them in pipeline order.
        positions: The global rank at each pipeline position ``0 .. p - 1`` (position ``d``
            runs ``orders[d]``; a plan may put a position on any rank).
        orders: Every position's operations (:func:`planner.rank_schedules.rank_orders`).
    """

    schedule: Schedule
    chunks: int
    microbatches: int
    stage_to_rank: tuple[int, ...]
    positions: tuple[int, ...]
    orders: tuple[tuple[Op, ...], ...]

    @classmethod
    def of(
        cls,
        schedule: Schedule | str,
        *,
        ranks: int,
        chunks: int,
        microbatches: int,
        positions: Sequence[int] | None = None,
    ) -> ChunkLayout:
        """The layout torch uses for ``schedule`` (loop order, V order for ``zbv``).

        Args:
            schedule: A schedule of :data:`planner.schedules.RANK_SCHEDULES`.
            ranks: Pipeline ranks ``p``.
            chunks: Stages per rank ``v``.
            microbatches: ``M``.
            positions: The global rank of each pipeline position (default ``0 .. p - 1``).

        Raises:
            PlanError: A shape torch refuses (:func:`planner.rank_schedules.check_schedule`).
        """
        kind = Schedule(schedule)
        where = tuple(range(ranks)) if positions is None else tuple(positions)
        assert len(where) == ranks, (where, ranks)
        return cls(
            schedule=kind,
            chunks=chunks,
            microbatches=microbatches,
            stage_to_rank=tuple(where[d] for d in stage_ranks(kind, ranks=ranks, chunks=chunks)),
            positions=where,
            orders=rank_orders(kind, ranks=ranks, microbatches=microbatches, chunks=chunks),
        )

    @classmethod
    def of_plan(cls, plan: Plan) -> ChunkLayout:
        """The layout of a plan of a rank schedule (its stages' ranks name the positions)."""
        ranks = len(plan.stages) // plan.chunks
        positional = stage_ranks(plan.schedule, ranks=ranks, chunks=plan.chunks)
        where = [0] * ranks
        for stage, d in zip(plan.stages, positional, strict=True):
            where[d] = stage.ranks[0]
        return cls.of(
            plan.schedule,
            ranks=ranks,
            chunks=plan.chunks,
            microbatches=plan.microbatches,
            positions=where,
        )

    @property
    def num_stages(self) -> int:
        return len(self.stage_to_rank)

    @property
    def split(self) -> bool:
        """Whether backward is split into input (B) and weight (W) gradients."""
        return splits_backward(self.schedule)

    @property
    def placement(self) -> Placement:
        """The executors' view: every stage one replica, on its rank."""
        return Placement(ranks=tuple((r,) for r in self.stage_to_rank))

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages ``rank`` holds, ascending (none for a rank the plan leaves idle)."""
        return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

    def ops(self, rank: int) -> tuple[Op, ...]:
        """``rank``'s operations for one minibatch."""
        return self.orders[self.positions.index(rank)]

    def window(self, rank: int, stage: int) -> int:
        """Receives kept posted for ``stage``: twice the microbatches it holds at once."""
        held = most = 0
        for op in self.ops(rank):
            if op.stage == stage and op.kind != "W":
                held += 1 if op.kind == "F" else -1
                most = max(most, held)
        return 2 * max(most, 1)


@dataclass
class _LocalRecv(PendingRecv):
    """A "receive" from this rank itself: the tensors another chunk handed over in memory."""

    mailbox: dict[tuple[int, int, bool], list[torch.Tensor]] = field(default_factory=dict)
    key: tuple[int, int, bool] = (0, 0, False)

    def wait(self) -> list[torch.Tensor]:
        tensors = self.mailbox.pop(self.key, None)
        if tensors is None:  # the schedule ran an operation before its input's producer
            raise RuntimeError(f"no {self.what} from this rank's own chunk yet")
        return tensors


@dataclass
class ChunkLink(PointToPoint):
    """One chunk's point-to-point: tags per boundary, and in memory between a rank's chunks.

    Boundary ``b`` joins stage ``b`` to ``b + 1``; a stage receives activations and sends
    gradients over ``b = s - 1``, and sends activations and receives gradients over ``b = s``.
    The tag of microbatch ``m`` over boundary ``b`` is the parent's tag of ``m (S - 1) + b``.

    Attributes:
        stage: The chunk's stage ``s``.
        num_stages: Stages in the pipeline ``S``.
        rank: This rank (a peer equal to it is this rank's other chunk).
        mailbox: Tensors handed between this rank's chunks, shared by its links.
    """

    stage: int = 0
    num_stages: int = 1
    rank: int = 0
    mailbox: dict[tuple[int, int, bool], list[torch.Tensor]] = field(default_factory=dict)

    def _channel(self, microbatch: int, boundary: int) -> int:
        return microbatch * max(self.num_stages - 1, 1) + boundary

    def irecv(
        self, metas: Sequence[TensorMeta], *, src: int, microbatch: int, backward: bool
    ) -> PendingRecv:
        boundary = self.stage if backward else self.stage - 1
        what = (
            f"{'gradients' if backward else 'activations'} of microbatch {microbatch} "
            f"between stages {boundary} and {boundary + 1}"
        )
        if src == self.rank:
            return _LocalRecv(
                tensors=[],
                works=[],
                timers=self.timers,
                src=src,
                what=what,
                mailbox=self.mailbox,
                key=(boundary, microbatch, backward),
            )
        pending = super().irecv(
            metas, src=src, microbatch=self._channel(microbatch, boundary), backward=backward
        )
        pending.what = what
        return pending

    def isend(
        self,
        tensors: Sequence[torch.Tensor] | Any,
        *,
        dst: int,
        microbatch: int,
        backward: bool,
    ) -> None:
        boundary = self.stage - 1 if backward else self.stage
        if dst == self.rank:  # a copy: the next chunk may modify its input in place
            self.mailbox[(boundary, microbatch, backward)] = [t.detach().clone() for t in tensors]
            return
        super().isend(
            tensors, dst=dst, microbatch=self._channel(microbatch, boundary), backward=backward
        )


@dataclass
class _Split:
    """What B keeps for W: the parameter groups' saved gradients, or (stage 0) the graph."""

    groups: list[dict[str, Any]] | None
    outputs: list[torch.Tensor]
    grads: list[torch.Tensor] | None


class ChunkExecutor(StageExecutor):
    """A :class:`StageExecutor` that can also split its backward into B and W.

    :meth:`backward` (the whole backward) serves ``interleaved-1f1b``; :meth:`backward_input`
    then :meth:`backward_weight` the zero-bubble schedules.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._params = list(dict.fromkeys(p for p in self.module.parameters() if p.requires_grad))
        self._split: dict[int, _Split] = {}

    def backward_input(self, microbatch: int) -> None:
        """``B m``: the gradient of the chunk's inputs only, sent upstream; the graph is kept."""
        saved = self._saved.pop(microbatch)
        grads = None if self.is_last else self._received(Op("B", microbatch))
        start = time.perf_counter()
        if self.is_first:  # no input gradient: the whole backward runs in W, as torch does
            self._split[microbatch] = _Split(groups=None, outputs=saved.outputs, grads=grads)
            self.compute_s += time.perf_counter() - start
            return
        assert self.in_meta is not None
        inputs = [saved.inputs[i] for i in self.in_meta.grad_indices]
        if saved.outputs:
            # torch's helper frees the graph by detaching the outputs in place, which views (a
            # flatten ending the chunk) refuse and which breaks W when an operation saved the
            # output (a convolution of the next layer in this chunk): hand it copies
            outputs = [o.clone() for o in saved.outputs]
            dinputs, groups = stage_backward_input(outputs, grads, inputs, iter(self._params))
        else:  # nothing differentiable left the chunk
            dinputs, groups = tuple(None for _ in inputs), []
        self._split[microbatch] = _Split(groups=groups, outputs=[], grads=None)
        upstream = [
            g if g is not None else torch.zeros_like(x)
            for g, x in zip(dinputs, inputs, strict=True)
        ]
        self.compute_s += time.perf_counter() - start
        self.p2p.isend(
            upstream,
            dst=self.placement.rank_of(self.stage - 1, microbatch),
            microbatch=microbatch,
            backward=True,
        )

    def backward_weight(self, microbatch: int) -> None:
        """``W m``: the chunk's weight gradients for microbatch ``m``, into ``.grad``."""
        split = self._split.pop(microbatch)
        start = time.perf_counter()
        if split.groups is None:
            if split.outputs:
                torch.autograd.backward(split.outputs, split.grads)
        elif split.groups:
            stage_backward_weight(iter(self._params), split.groups)
        self.compute_s += time.perf_counter() - start


@dataclass
class ChunkedSchedule:
    """One minibatch of a rank's list per :meth:`step`, ending with the flush.

    Attributes:
        layout: The schedule's layout.
        rank: This rank.
        executors: One per chunk, by stage.
        optimizer: Over every chunk's parameters (None when they have none).
        clipper: The whole model's gradient clipping (None: no clipping).
    """

    layout: ChunkLayout
    rank: int
    executors: dict[int, ChunkExecutor]
    optimizer: torch.optim.Optimizer | None
    clipper: GradientClipper | None = None
    step_s: float = 0.0

    @property
    def ops(self) -> tuple[Op, ...]:
        return self.layout.ops(self.rank)

    def step(self, *, inputs: InputsFn | None, targets: TargetsFn | None) -> list[torch.Tensor]:
        """Run one minibatch and update the weights; returns the last stage's losses (if held)."""
        ops = self.ops
        for stage, ex in self.executors.items():
            mine = [Op(op.kind, op.microbatch) for op in ops if op.stage == stage]
            ex.plan_receives(
                [op for op in mine if op.kind != "W"], window=self.layout.window(self.rank, stage)
            )
        split = self.layout.split
        for op in ops:
            assert op.stage is not None
            ex = self.executors[op.stage]
            if op.kind == "F":
                ex.forward(op.microbatch, inputs=inputs, targets=targets)
            elif op.kind == "W":
                ex.backward_weight(op.microbatch)
            elif split:
                ex.backward_input(op.microbatch)
            else:
                ex.backward(op.microbatch)
        for ex in self.executors.values():
            ex.p2p.flush()
        start = time.perf_counter()
        if self.clipper is not None:
            self.clipper.clip()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step_s += time.perf_counter() - start
        last = self.layout.num_stages - 1
        return self.executors[last].take_losses() if last in self.executors else []


def build_executors(
    layout: ChunkLayout,
    *,
    rank: int,
    modules: Mapping[int, torch.nn.Module],
    metas: Sequence[BoundaryMeta],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    p2p: PointToPoint,
) -> dict[int, ChunkExecutor]:
    """One executor per chunk of ``rank``, sharing ``p2p``'s device, timers and tag width."""
    mailbox: dict[tuple[int, int, bool], list[torch.Tensor]] = {}
    placement = layout.placement
    last = layout.num_stages - 1
    out: dict[int, ChunkExecutor] = {}
    for s in layout.stages_of(rank):
        link = ChunkLink(
            device=p2p.device,
            timers=p2p.timers,
            max_tensors=p2p.max_tensors,
            stage=s,
            num_stages=layout.num_stages,
            rank=rank,
            mailbox=mailbox,
        )
        out[s] = ChunkExecutor(
            module=modules[s],
            stage=s,
            placement=placement,
            in_meta=metas[s - 1] if s > 0 else None,
            out_meta=metas[s] if s < last else None,
            microbatches=layout.microbatches,
            loss_fn=loss_fn,
            p2p=link,
        )
    return out
