"""PipeDream's asynchronous 1F1B with weight stashing (SOSP'19 §3.3), no flush.

The run is one long operation list per replica (:func:`planner.schedules.replica_order` over all
``M x steps`` microbatches); after the warm-up each stage alternates one forward and one
backward. Weight stashing: every forward runs against the stage's newest weights and records that
version; the microbatch's backward runs against the same version, whatever updates happened in
between (:class:`WeightStash`). Stage ``s`` of ``S`` has at most ``S - s`` microbatches in flight,
so it never holds more than ``S - s`` versions; the stash counts them and fails loudly otherwise.

Updates: a stage steps its optimizer at the points :func:`planner.schedules.sync_points` gives:
after every backward when unreplicated, once per round of ``R`` microbatches when replicated (the
replicas all-reduce there, each having run one backward of the round). ``update_interval = k``
steps every ``k``-th point instead, accumulating. The gradient applied is the mean over the
microbatches since the last update (each microbatch's loss unscaled, the sum divided by ``k R``).
Microbatches after the last update point of the run leave their gradients unapplied.

Parameters shared across stages (tied embeddings) are refused: each stage updates on its own
cadence, so the two copies would drift apart.

Example:
    >>> import torch
    >>> stash = WeightStash(torch.nn.Linear(2, 2), limit=2)
    >>> w0 = stash.forward_weights(0)["weight"]
    >>> stash.updated(); w1 = stash.forward_weights(1)["weight"]
    >>> w0 is stash.backward_weights(0)["weight"], stash.versions, w0 is w1
    (True, 2, False)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from planner.runtime.comm import GradientSync
from planner.runtime.executors import InputsFn, StageExecutor, TargetsFn
from planner.schedules import Schedule, in_flight, replica_order, sync_points

__all__ = ["PipeDreamSchedule", "WeightStash"]


class WeightStash:
    """The weight versions of one replica of a stage, one per update still in use.

    Gradients computed against a version are added to the live parameters' ``.grad``; the
    optimizer updates the live parameters; the next forward snapshots them as a new version.

    Args:
        module: The stage's module (its parameters are the live weights).
        limit: Most versions allowed at once (``S - s``); more raises RuntimeError.
        version: Updates applied before this run (a resumed checkpoint's ``stash_version``).
    """

    def __init__(self, module: torch.nn.Module, *, limit: int, version: int = 0) -> None:
        self.live = dict(module.named_parameters())
        self.limit = limit
        self.version = version  # updates applied so far: the version the next forward uses
        self.max_versions = 0
        self._versions: dict[int, dict[str, torch.Tensor]] = {}
        self._users: dict[int, int] = {}  # version -> microbatches in flight on it
        self._of: dict[int, int] = {}  # microbatch -> its version

    @property
    def versions(self) -> int:
        """Versions held now."""
        return len(self._versions)

    def version_of(self, microbatch: int) -> int:
        return self._of[microbatch]

    def forward_weights(self, microbatch: int) -> dict[str, torch.Tensor]:
        v = self.version
        if v not in self._versions:
            self._versions[v] = {
                name: p.detach().clone().requires_grad_(p.requires_grad)
                for name, p in self.live.items()
            }
            self.max_versions = max(self.max_versions, len(self._versions))
            if len(self._versions) > self.limit:
                raise RuntimeError(
                    f"weight stash holds {len(self._versions)} versions, more than the "
                    f"{self.limit} the schedule allows; the operation order is broken"
                )
        self._of[microbatch] = v
        self._users[v] = self._users.get(v, 0) + 1
        return self._versions[v]

    def backward_weights(self, microbatch: int) -> dict[str, torch.Tensor]:
        return self._versions[self._of[microbatch]]

    def backward_done(self, microbatch: int) -> None:
        v = self._of.pop(microbatch)
        for name, tensor in self._versions[v].items():
            if tensor.grad is not None:
                live = self.live[name]
                live.grad = tensor.grad if live.grad is None else live.grad.add_(tensor.grad)
                tensor.grad = None
        self._users[v] -= 1
        if self._users[v] == 0 and v != self.version:
            self._release(v)

    def updated(self) -> None:
        """The optimizer stepped: later forwards use a new version."""
        old, self.version = self.version, self.version + 1
        if self._users.get(old, 0) == 0:
            self._release(old)

    def _release(self, version: int) -> None:
        self._versions.pop(version, None)
        self._users.pop(version, None)


@dataclass
class PipeDreamSchedule:
    """The whole run of one replica under ``pipedream``.

    Attributes:
        executor: The stage's executor, built with ``loss_divisor=1`` and ``weights=stash``.
        replica: Which replica of its stage this rank is.
        sync: Gradient all-reduce among the stage's replicas.
        optimizer: The stage's optimizer (None for a stage without parameters).
        stash: The executor's weight stash.
        update_interval: Update points per optimizer step (``k``).
    """

    executor: StageExecutor
    replica: int
    sync: GradientSync
    optimizer: torch.optim.Optimizer | None
    stash: WeightStash
    update_interval: int = 1
    step_s: float = 0.0
    updates: int = 0
    loss_times: list[tuple[int, float, float]] = field(default_factory=list)

    @staticmethod
    def version_limit(replicas: tuple[int, ...], stage: int, microbatches: int) -> int:
        """Most versions a replica of ``stage`` may hold: its most microbatches in flight."""
        return in_flight(
            Schedule.PIPEDREAM,
            num_stages=len(replicas),
            stage=stage,
            microbatches=microbatches,
            replicas=replicas,
        )

    def run(
        self,
        *,
        minibatches: int,
        inputs: InputsFn | None,
        targets: TargetsFn | None,
        on_loss: Callable[[int, float], Any] | None = None,
        first_microbatch: int = 0,
    ) -> None:
        """Run ``minibatches x M`` microbatches to the end (drained).

        Args:
            minibatches: Minibatches in this run (or segment between checkpoints).
            inputs: Stage 0's inputs of a microbatch, by its number in the whole run.
            targets: The last stage's targets, likewise.
            on_loss: Called as ``on_loss(m, loss)`` after each loss (last stage).
            first_microbatch: The whole run's number of this segment's first microbatch.
        """
        ex = self.executor
        offset = first_microbatch
        if inputs is not None:
            inputs = _shifted(inputs, offset)
        if targets is not None:
            targets = _shifted(targets, offset)
        replicas, stage = ex.placement.replicas, ex.stage
        total = ex.microbatches * minibatches
        ops = replica_order(
            Schedule.PIPEDREAM,
            replicas=replicas,
            stage=stage,
            replica=self.replica,
            microbatches=total,
        )
        points = sync_points(
            Schedule.PIPEDREAM,
            replicas=replicas,
            stage=stage,
            replica=self.replica,
            microbatches=ex.microbatches,
            minibatches=minibatches,
        )
        steps_at = set(points[self.update_interval - 1 :: self.update_interval])
        divisor = replicas[stage] * self.update_interval
        ex.plan_receives(ops, window=2 * self.version_limit(replicas, stage, total))
        for done, op in enumerate(ops, start=1):
            if op.kind == "F":
                ex.forward(op.microbatch, inputs=inputs, targets=targets)
                for m, loss in ex.losses:
                    self.loss_times.append((m + offset, loss.item(), time.time()))
                    if on_loss is not None:
                        on_loss(m + offset, self.loss_times[-1][1])
                ex.losses.clear()
            else:
                ex.backward(op.microbatch)
            if done in steps_at:
                self._update(divisor)
        ex.p2p.flush()

    def _update(self, divisor: int) -> None:
        """All-reduce (replicated stages), average, step, and start a new weight version."""
        self.sync.all_reduce()
        start = time.perf_counter()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(divisor)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.stash.updated()
        self.updates += 1
        self.step_s += time.perf_counter() - start


def _shifted(fn: Callable[[int], Any], offset: int) -> Callable[[int], Any]:
    return lambda m: fn(m + offset)
