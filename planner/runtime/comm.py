"""Communication: who talks to whom, boundary metadata, point-to-point transfers, gradient sync.

Everything a rank needs to know about its peers follows from the plan alone (:class:`Placement`):
microbatch ``m`` runs on replica ``m % R`` of a stage with ``R`` replicas
(:func:`planner.schedules.replica_of`), so the sender of microbatch ``m``'s activations into stage
``s`` is replica ``m % R[s-1]`` of stage ``s - 1``, and its gradients go back to the same rank.
Non-uniform replication (3 replicas feeding 1) needs nothing more.

Shapes and dtypes of every boundary are agreed once at start-up: each rank propagates one
microbatch through the whole graph (:func:`planner.runtime.stage.propagate`) and builds the same
:class:`BoundaryMeta`; the ranks then compare digests of it (:func:`check_agreement`), so a rank
that built a different model fails at once. Receive buffers are allocated from the metadata and
every outgoing tensor is checked against it.

Gradients are summed, not averaged, within a stage's replicas: the last stage already scales each
microbatch's loss by ``1 / M`` (``M`` microbatches per minibatch), so the sum over all microbatches
is the gradient of the minibatch's mean loss however unevenly the replicas share them. A parameter
held by several stages (tied embeddings) is summed over the union of those stages' ranks.

Example:
    >>> p = Placement(ranks=((0, 1, 2), (3,)))
    >>> [p.rank_of(0, m) for m in range(4)], p.rank_of(1, 2), p.locate(1)
    ([0, 1, 2, 0], 3, (0, 1))
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from planner.runtime.stage import SharedParameter

__all__ = [
    "BoundaryMeta",
    "CommTimers",
    "GradientSync",
    "PendingRecv",
    "Placement",
    "PointToPoint",
    "ProcessGroups",
    "TensorMeta",
    "check_agreement",
    "make_gradient_sync",
    "make_groups",
]


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Ranks of every stage's replicas, in pipeline order (from ``PlanStage.ranks``).

    Attributes:
        ranks: ``ranks[s][r]`` is the global rank of replica ``r`` of stage ``s``.
    """

    ranks: tuple[tuple[int, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.ranks)

    @property
    def replicas(self) -> tuple[int, ...]:
        return tuple(len(r) for r in self.ranks)

    @property
    def world_size_needed(self) -> int:
        return 1 + max(max(r) for r in self.ranks)

    def rank_of(self, stage: int, microbatch: int) -> int:
        """The rank that runs ``microbatch`` on ``stage`` (round-robin over its replicas)."""
        ranks = self.ranks[stage]
        return ranks[microbatch % len(ranks)]

    def locate(self, rank: int) -> tuple[int, int] | None:
        """``(stage, replica)`` of ``rank``, or None if the plan gives it nothing to do."""
        for s, ranks in enumerate(self.ranks):
            if rank in ranks:
                return s, ranks.index(rank)
        return None


@dataclass(frozen=True, kw_only=True)
class TensorMeta:
    """Shape, dtype and whether a gradient flows back for one tensor crossing a boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True, kw_only=True)
class BoundaryMeta:
    """The values crossing one boundary per microbatch: names, structure, tensors, constants.

    Each value is flattened with torch's pytree; tensor leaves travel, other leaves (ints from
    ``x.size()``) are constants every rank computed itself.

    Attributes:
        names: The values' names, in boundary order.
        specs: The pytree structure of each value.
        leaves: Per value, its leaves: a :class:`TensorMeta` or the constant itself.
    """

    names: tuple[str, ...]
    specs: tuple[Any, ...]
    leaves: tuple[tuple[Any, ...], ...]

    @classmethod
    def from_values(cls, names: Sequence[str], values: dict[str, Any]) -> BoundaryMeta:
        specs, leaves = [], []
        for name in names:
            flat, spec = pytree.tree_flatten(values[name])
            specs.append(spec)
            leaves.append(
                tuple(
                    TensorMeta(shape=tuple(x.shape), dtype=x.dtype, requires_grad=x.requires_grad)
                    if isinstance(x, torch.Tensor)
                    else x
                    for x in flat
                )
            )
        return cls(names=tuple(names), specs=tuple(specs), leaves=tuple(leaves))

    @property
    def tensors(self) -> tuple[TensorMeta, ...]:
        """The tensors that travel, in order."""
        return tuple(x for group in self.leaves for x in group if isinstance(x, TensorMeta))

    @property
    def grad_indices(self) -> tuple[int, ...]:
        """Indices (into :attr:`tensors`) of the tensors whose gradients travel back."""
        return tuple(i for i, t in enumerate(self.tensors) if t.requires_grad)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def flatten(self, values: Sequence[Any], *, check_grad: bool = True) -> list[torch.Tensor]:
        """The tensors of ``values`` to send, checked against the agreed metadata."""
        out: list[torch.Tensor] = []
        for name, value, expected in zip(self.names, values, self.leaves, strict=True):
            flat = pytree.tree_leaves(value)
            if len(flat) != len(expected):
                raise RuntimeError(f"boundary value {name} changed structure since start-up")
            for leaf, meta in zip(flat, expected, strict=True):
                if not isinstance(meta, TensorMeta):
                    continue
                if (
                    tuple(leaf.shape) != meta.shape
                    or leaf.dtype != meta.dtype
                    or (check_grad and leaf.requires_grad != meta.requires_grad)
                ):
                    raise RuntimeError(
                        f"boundary value {name} is {tuple(leaf.shape)} {leaf.dtype} "
                        f"(requires_grad={leaf.requires_grad}) but {meta.shape} {meta.dtype} "
                        f"(requires_grad={meta.requires_grad}) was agreed at start-up; shapes must "
                        "not depend on the data"
                    )
                out.append(leaf)
        return out

    def unflatten(self, tensors: Sequence[torch.Tensor]) -> list[Any]:
        """Rebuild the values from received tensors and the constants."""
        it = iter(tensors)
        values = []
        for spec, leaves in zip(self.specs, self.leaves, strict=True):
            flat = [next(it) if isinstance(x, TensorMeta) else x for x in leaves]
            values.append(pytree.tree_unflatten(flat, spec))
        return values

    def digest(self) -> str:
        """A short hash of names, structure, shapes and dtypes, to compare across ranks."""
        text = repr((self.names, [str(s) for s in self.specs], self.leaves))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_agreement(metas: Sequence[BoundaryMeta], *, rank: int) -> None:
    """Compare every rank's boundary metadata; all ranks must call it (a collective).

    Raises:
        RuntimeError: Naming the ranks whose metadata differs from rank 0's.
    """
    mine = [m.digest() for m in metas]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    differ = [r for r, theirs in enumerate(gathered) if theirs != gathered[0]]
    if differ:
        raise RuntimeError(
            f"ranks {differ} computed other boundary shapes than rank 0 (this is rank {rank}); "
            "every rank must build the same model with the same torch version"
        )


@dataclass
class CommTimers:
    """Seconds spent blocked on receives, in sends, and in gradient all-reduce; bytes moved."""

    wait_s: float = 0.0
    send_s: float = 0.0
    sync_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    def reset(self) -> None:
        self.wait_s = self.send_s = self.sync_s = 0.0
        self.bytes_sent = self.bytes_received = 0


@dataclass
class PendingRecv:
    """Receives posted for one microbatch's boundary tensors; :meth:`wait` returns them."""

    tensors: list[torch.Tensor]
    works: list[Any]
    timers: CommTimers
    src: int
    what: str

    def wait(self) -> list[torch.Tensor]:
        start = time.perf_counter()
        try:
            for work in self.works:
                work.wait()
        except RuntimeError as exc:  # gloo: peer closed the connection, or the timeout passed
            raise RuntimeError(
                f"lost rank {self.src}: no {self.what} from it ({_first_line(exc)}); "
                "that rank failed or was stopped"
            ) from exc
        self.timers.wait_s += time.perf_counter() - start
        self.works = []
        return self.tensors


@dataclass
class _PackedRecv(PendingRecv):
    """Receives of packed messages: after the wait, each message is cut back into its tensors.

    Attributes:
        metas: The tensors expected, in boundary order.
        groups: Per message (``tensors[j]``), the indices into ``metas`` it carries.
    """

    metas: Sequence[TensorMeta] = ()
    groups: Sequence[Sequence[int]] = ()

    def wait(self) -> list[torch.Tensor]:
        buffers = super().wait()
        out: list[torch.Tensor | None] = [None] * len(self.metas)
        for buffer, group in zip(buffers, self.groups, strict=True):
            offset = 0
            for i in group:
                shape = self.metas[i].shape
                count = math.prod(shape)
                # a copy, not a view: views of one buffer share autograd's version counter, so an
                # in-place operation on one input would invalidate another's saved value
                out[i] = buffer[offset : offset + count].view(shape).clone()
                offset += count
        self.tensors = [t for t in out if t is not None]
        return self.tensors


def _message_groups(dtypes: Sequence[torch.dtype]) -> list[list[int]]:
    """The tensors of one boundary that travel as one message: one message per dtype, in order
    of each dtype's first tensor. Sender and receiver derive the same grouping from the agreed
    metadata (the sender's tensors were checked against it)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, dtype in enumerate(dtypes):
        groups.setdefault(dtype, []).append(i)
    return list(groups.values())


@dataclass
class PointToPoint:
    """isend/irecv of one microbatch's boundary tensors, with tags that keep messages apart.

    A tag encodes the microbatch, the direction and the message's index, so messages between the
    same two ranks can never be confused, whatever order they are posted in. The tensors of one
    boundary that share a dtype travel as one message (concatenated, cut apart on arrival): each
    gloo call costs its rank 0.05-0.5 ms on a small CPU machine (``benchmarks/runtime_overhead.py``),
    more than copying the few tensors of a boundary, so gpt2's two hidden-state tensors cost one
    message instead of two.
    """

    device: torch.device
    timers: CommTimers
    max_tensors: int
    _sends: list[tuple[Any, torch.Tensor, int]] = field(default_factory=list)

    def tag(self, microbatch: int, backward: bool, index: int) -> int:
        return (2 * microbatch + int(backward)) * self.max_tensors + index

    def irecv(
        self, metas: Sequence[TensorMeta], *, src: int, microbatch: int, backward: bool
    ) -> PendingRecv:
        """Post receives for ``metas`` from ``src`` now; wait on the result later."""
        groups = _message_groups([m.dtype for m in metas])
        buffers = [
            torch.empty(
                (sum(math.prod(metas[i].shape) for i in group),)
                if len(group) > 1
                else metas[group[0]].shape,
                dtype=metas[group[0]].dtype,
                device=self.device,
            )
            for group in groups
        ]
        works = [
            dist.irecv(t, src=src, tag=self.tag(microbatch, backward, j))
            for j, t in enumerate(buffers)
        ]
        self.timers.bytes_received += sum(t.numel() * t.element_size() for t in buffers)
        what = f"{'gradients' if backward else 'activations'} of microbatch {microbatch}"
        if len(groups) == len(metas):  # one tensor per message: the buffers are the tensors
            return PendingRecv(tensors=buffers, works=works, timers=self.timers, src=src, what=what)
        return _PackedRecv(
            tensors=buffers,
            works=works,
            timers=self.timers,
            src=src,
            what=what,
            metas=tuple(metas),
            groups=groups,
        )

    def isend(
        self, tensors: Iterable[torch.Tensor], *, dst: int, microbatch: int, backward: bool
    ) -> None:
        """Start sending ``tensors`` to ``dst``; they are kept alive until :meth:`flush`."""
        start = time.perf_counter()
        tensors = list(tensors)
        for j, group in enumerate(_message_groups([t.dtype for t in tensors])):
            if len(group) == 1:
                buffer = tensors[group[0]].detach().contiguous()
            else:  # cut apart by the receiver's _PackedRecv
                buffer = torch.cat([tensors[i].detach().reshape(-1) for i in group])
            work = dist.isend(buffer, dst=dst, tag=self.tag(microbatch, backward, j))
            self._sends.append((work, buffer, dst))
            self.timers.bytes_sent += buffer.numel() * buffer.element_size()
        self.timers.send_s += time.perf_counter() - start
        if len(self._sends) > 64:  # bound the buffers kept alive; most have long completed
            self._reap()

    def flush(self) -> None:
        """Wait until every send has completed."""
        start = time.perf_counter()
        for work, _, dst in self._sends:
            try:
                work.wait()
            except RuntimeError as exc:  # the receiver is gone
                raise RuntimeError(
                    f"lost rank {dst}: a send to it failed ({_first_line(exc)}); "
                    "that rank failed or was stopped"
                ) from exc
        self._sends.clear()
        self.timers.send_s += time.perf_counter() - start

    def _reap(self) -> None:
        self._sends = [(w, b, d) for w, b, d in self._sends if not w.is_completed()]


@dataclass
class _Bucket:
    group: Any
    params: list[torch.nn.Parameter]


@dataclass
class GradientSync:
    """Sums gradients over the ranks holding each parameter, one flat all-reduce per bucket."""

    buckets: list[_Bucket]
    timers: CommTimers

    def all_reduce(
        self, extra: torch.Tensor | None = None, *, extra_group: Any = None
    ) -> torch.Tensor | None:
        """Sum every bucket's gradients over its group.

        ``extra`` (a scalar, e.g. the replicas' loss) is summed over ``extra_group`` in the same
        call when a bucket of that group and dtype exists, else by a call of its own: one
        collective fewer per step, which on gloo costs a rank 0.3 ms or more. Returns the summed
        ``extra`` (None without one).
        """
        start = time.perf_counter()
        if extra is not None and extra_group is None:  # nothing to sum it with
            extra = None
        carrier = next(
            (
                i
                for i, b in enumerate(self.buckets)
                if extra is not None and b.group is extra_group and b.params[0].dtype == extra.dtype
            ),
            None,
        )
        summed: torch.Tensor | None = None
        for index, bucket in enumerate(self.buckets):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
            parts = [g.reshape(-1) for g in grads]
            if index == carrier:
                assert extra is not None
                parts.append(extra.detach().reshape(1))
            flat = torch.cat(parts)
            try:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=bucket.group)
            except RuntimeError as exc:
                ranks = dist.get_process_group_ranks(bucket.group)
                raise RuntimeError(
                    f"gradient all-reduce among ranks {ranks} failed "
                    f"({_first_line(exc)}); one of them failed or was stopped"
                ) from exc
            offset = 0
            for p, g in zip(bucket.params, grads, strict=True):
                n = p.numel()
                reduced = flat[offset : offset + n].view_as(p)
                if p.grad is None:
                    p.grad = reduced.clone()
                else:
                    g.copy_(reduced)
                offset += n
            if index == carrier:
                summed = flat[offset].clone()
        if extra is not None and carrier is None:
            summed = extra.detach().clone()
            dist.all_reduce(summed, group=extra_group)
        self.timers.sync_s += time.perf_counter() - start
        return summed


@dataclass(frozen=True, kw_only=True)
class ProcessGroups:
    """The process groups of a run, created on every rank in the same order.

    Attributes:
        stages: Per stage, the group of its replicas (None for an unreplicated stage).
        shared: Per set of stages sharing parameters, the group of all their ranks.
        active: Every rank that runs a stage (checkpoint barriers).
    """

    stages: tuple[Any, ...]
    shared: dict[tuple[int, ...], Any]
    active: Any


def make_groups(placement: Placement, shared: Sequence[SharedParameter]) -> ProcessGroups:
    """Create the groups; every rank must call it (torch's ``new_group`` is collective).

    One group per replicated stage; one per set of stages sharing parameters (the union of their
    ranks). The order depends only on the plan and the model, so it is the same on every rank.
    """
    stage_groups = tuple(
        dist.new_group(list(ranks)) if len(ranks) > 1 else None for ranks in placement.ranks
    )
    shared_groups = {}
    for stages in dict.fromkeys(p.stages for p in shared):
        union = sorted({r for s in stages for r in placement.ranks[s]})
        shared_groups[stages] = dist.new_group(union)
    active = dist.new_group(sorted(r for ranks in placement.ranks for r in ranks))
    return ProcessGroups(stages=stage_groups, shared=shared_groups, active=active)


def make_gradient_sync(
    groups: ProcessGroups,
    shared: Sequence[SharedParameter],
    *,
    stage: int,
    module: torch.nn.Module,
    timers: CommTimers,
) -> GradientSync:
    """This rank's gradient buckets: its stage's own parameters, then each tied set's."""
    buckets: list[_Bucket] = []
    tied_ids: set[int] = set()
    by_stages: dict[tuple[int, ...], list[SharedParameter]] = {}
    for param in shared:
        by_stages.setdefault(param.stages, []).append(param)
    for stages, params in by_stages.items():
        if stage in stages:
            tied = _unique(module.get_parameter(p.name_in(stage)) for p in params)
            tied_ids.update(id(p) for p in tied)
            buckets.append(_Bucket(group=groups.shared[stages], params=tied))
    own = [p for p in _unique(module.parameters()) if id(p) not in tied_ids and p.requires_grad]
    if groups.stages[stage] is not None and own:
        buckets.insert(0, _Bucket(group=groups.stages[stage], params=own))
    return GradientSync(buckets=_split_by_dtype(buckets), timers=timers)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unique(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _split_by_dtype(buckets: list[_Bucket]) -> list[_Bucket]:
    """torch.cat needs one dtype per flat buffer; mixed-precision stages get one per dtype."""
    out: list[_Bucket] = []
    for bucket in buckets:
        dtypes = sorted({p.dtype for p in bucket.params}, key=str)
        out.extend(
            _Bucket(group=bucket.group, params=[p for p in bucket.params if p.dtype == d])
            for d in dtypes
        )
    return out
