"""BatchNorm running statistics on replicated stages, as one process would compute them.

One process running a minibatch's ``M`` microbatches in order updates a BatchNorm's running
statistic ``r`` once per microbatch: ``r_{i+1} = (1 - a) r_i + a x_i`` (``a`` the module's
momentum, ``x_i`` microbatch ``i``'s batch mean or unbiased variance). After the minibatch::

    r_M = (1 - a)^M r_0 + sum_i (1 - a)^(M - 1 - i) a x_i

Each term of the sum depends on one microbatch only. A replica that runs microbatch ``i`` learns
``a x_i`` exactly as ``r_after - (1 - a) r_before`` around that forward, whatever its own
``r_before`` is, weights it by ``(1 - a)^(M - 1 - i)`` and adds it to its share; at the flush the
replicas sum their shares (one all-reduce) and add ``(1 - a)^M r_0``, ``r_0`` being the statistic
they all started the minibatch from. ``num_batches_tracked`` grows by ``M``. So a replicated stage
ends every minibatch with the running statistics of single-process training, not per-replica
ones. Unreplicated stages need nothing: they run their microbatches in order.

BatchNorm with ``momentum=None`` (a cumulative average) is averaged over the replicas instead,
which is not exact. Under ``pipedream`` (no flush) replicated stages keep per-replica statistics.

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> sync = BufferSync(bn, microbatches=2, group=None)
    >>> sync.microbatch = 0; _ = bn(torch.randn(4, 2)); sync.finish()  # one process: a no-op sum
    >>> int(bn.num_batches_tracked)
    1
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BufferSync", "frozen_buffers"]


class BufferSync:
    """Collects each BatchNorm's per-microbatch updates and combines them at the flush.

    Args:
        module: The stage's module.
        microbatches: Microbatches per minibatch (``M``).
        group: The stage's replica group (None: nothing to combine, :meth:`finish` only resets).
    """

    def __init__(self, module: torch.nn.Module, *, microbatches: int, group: Any) -> None:
        self.microbatches = microbatches
        self.group = group
        self.microbatch = 0  # set by the executor before each forward
        self.recording = True
        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
        self.norms = [m for m in self.norms if m.track_running_stats and m.training]
        self._start: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._share: dict[int, list[torch.Tensor]] = {}
        self._count: dict[int, int] = {}
        self._before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for norm in self.norms:
            norm.register_forward_pre_hook(self._pre)
            norm.register_forward_hook(self._post)

    def _pre(self, norm: torch.nn.Module, _args: Any) -> None:
        if not self.recording or not norm.training:
            return
        key = id(norm)
        assert isinstance(norm, _BatchNorm)
        mean, var, tracked = norm.running_mean, norm.running_var, norm.num_batches_tracked
        assert mean is not None and var is not None and tracked is not None
        if key not in self._start:
            self._start[key] = (mean.detach().clone(), var.detach().clone(), tracked.clone())
        self._before[key] = (mean.detach().clone(), var.detach().clone())

    def _post(self, norm: torch.nn.Module, _args: Any, _out: Any) -> None:
        if not self.recording or not norm.training:
            return
        assert isinstance(norm, _BatchNorm)
        key = id(norm)
        before_mean, before_var = self._before.pop(key)
        self._count[key] = self._count.get(key, 0) + 1
        a = norm.momentum
        if a is None:
            return
        weight = (1 - a) ** (self.microbatches - 1 - self.microbatch)
        assert norm.running_mean is not None and norm.running_var is not None
        terms = [
            (norm.running_mean.detach() - (1 - a) * before_mean) * weight,
            (norm.running_var.detach() - (1 - a) * before_var) * weight,
        ]
        share = self._share.get(key)
        self._share[key] = (
            terms if share is None else [s + t for s, t in zip(share, terms, strict=True)]
        )

    def finish(self) -> None:
        """The flush: set every BatchNorm's statistics to the single-process values."""
        if self.group is not None:
            for norm in self.norms:
                self._combine(norm)
        self._start.clear()
        self._share.clear()
        self._count.clear()

    def _combine(self, norm: _BatchNorm) -> None:
        key = id(norm)
        assert norm.running_mean is not None and norm.running_var is not None
        assert norm.num_batches_tracked is not None
        mean, var = norm.running_mean, norm.running_var
        start = self._start.get(key)
        count = torch.tensor([float(self._count.get(key, 0))], device=mean.device)
        if norm.momentum is None:  # cumulative average: average the replicas (not exact)
            flat = torch.cat([mean.reshape(-1), var.reshape(-1), count])
            dist.all_reduce(flat, group=self.group)
            n = dist.get_world_size(self.group)
            with torch.no_grad():
                mean.copy_(flat[: mean.numel()].view_as(mean) / n)
                var.copy_(flat[mean.numel() : -1].view_as(var) / n)
                if start is not None:
                    norm.num_batches_tracked.copy_(start[2] + int(flat[-1].item()))
            return
        zeros = [torch.zeros_like(mean), torch.zeros_like(var)]
        share = self._share.get(key, zeros)
        flat = torch.cat([share[0].reshape(-1), share[1].reshape(-1), count])
        dist.all_reduce(flat, group=self.group)
        if start is None:  # this replica ran no microbatch: its buffers are r_0 still
            start = (mean.detach().clone(), var.detach().clone(), norm.num_batches_tracked.clone())
        decay = (1 - norm.momentum) ** self.microbatches
        with torch.no_grad():
            mean.copy_(decay * start[0] + flat[: mean.numel()].view_as(mean))
            var.copy_(decay * start[1] + flat[mean.numel() : -1].view_as(var))
            norm.num_batches_tracked.copy_(start[2] + int(flat[-1].item()))


@contextlib.contextmanager
def frozen_buffers(module: torch.nn.Module, sync: BufferSync | None = None) -> Iterator[None]:
    """Run a forward again (recomputation) without updating running statistics a second time.

    BatchNorm momentum is 0 inside (``r = 1 r + 0 x``, unchanged) and ``num_batches_tracked`` is
    put back after: the statistics are updated in place by the op autograd saves them from, so
    copying old values back afterwards would break the backward.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [
        (m, m.momentum, None if m.num_batches_tracked is None else int(m.num_batches_tracked))
        for m in norms
    ]
    if sync is not None:
        sync.recording = False
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        if sync is not None:
            sync.recording = True
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(tracked)
