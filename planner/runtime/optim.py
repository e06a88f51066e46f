"""The optimizer a run trains with: the plan's kind and settings, and global gradient clipping.

A plan names the optimizer it budgeted memory for (``plan.optimizer``: sgd, momentum, adam,
adamw), and may carry ``weight_decay`` and ``clip_grad_norm``; ``plan run`` options override
them (``--optimizer``, ``--lr``, ``--momentum``, ``--weight-decay``, ``--clip-grad``). The run
says in one line each where it trains with something other than what the plan counted
(:meth:`OptimizerSettings.differences`).

* ``sgd``: ``torch.optim.SGD`` without momentum (no state); ``momentum``: SGD with momentum
  (default 0.9, one buffer per parameter); ``adam`` / ``adamw``: ``torch.optim.Adam`` /
  ``AdamW`` (two buffers). Weight decay is SGD's and Adam's L2 term, AdamW's decoupled one.
* Under ``pipedream`` weight stashing the stash keeps old *weights* only; the optimizer state
  exists once, for the live weights, which is what the cost model counts
  (``P (versions + 1 + state factor)``).
* Gradient clipping is by the norm of the whole model's gradient, as
  ``torch.nn.utils.clip_grad_norm_`` on one process: every stage adds the squares of its
  gradients (replica 0 only, since replicas hold the same summed gradient after the
  all-reduce; a parameter tied across stages counted by its first stage), one all-reduce over
  the active ranks sums them, and every stage scales by ``min(1, max_norm / (norm + 1e-6))``.
  ``pipedream`` has no global step (every stage updates on its own cadence), so clipping there
  is refused.

Example:
    >>> import torch
    >>> s = OptimizerSettings(kind=TrainOptimizer.ADAMW, lr=1e-3, weight_decay=0.01)
    >>> type(s.build([torch.nn.Parameter(torch.zeros(2))])).__name__
    'AdamW'
    >>> s.state_factor
    2
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
import torch.distributed as dist

from planner.runtime.config import RunError

__all__ = [
    "DEFAULT_MOMENTUM",
    "GradientClipper",
    "OptimizerSettings",
    "TrainOptimizer",
]

DEFAULT_MOMENTUM = 0.9
"""SGD momentum for the ``momentum`` kind when neither the plan nor ``--momentum`` says."""


class TrainOptimizer(StrEnum):
    """What the runtime trains with (the plan's ``optimizer`` names one of these)."""

    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"
    ADAMW = "adamw"


_STATE_FACTOR = {
    TrainOptimizer.SGD: 0,
    TrainOptimizer.MOMENTUM: 1,
    TrainOptimizer.ADAM: 2,
    TrainOptimizer.ADAMW: 2,
}


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """The optimizer of a run.

    Attributes:
        kind: Which optimizer.
        lr: Learning rate.
        momentum: SGD momentum (``momentum`` kind; 0 for ``sgd``).
        weight_decay: L2 penalty (decoupled for ``adamw``).
        clip_grad_norm: Clip the whole model's gradient to this norm; None: no clipping.
    """

    kind: TrainOptimizer
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise RunError(f"the learning rate must be positive, got {self.lr}; pass --lr")
        if not 0 <= self.momentum < 1:
            raise RunError(f"momentum must be in [0, 1), got {self.momentum}; pass --momentum")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise RunError(f"weight decay must be 0 or more, got {self.weight_decay}")
        if self.clip_grad_norm is not None and not (
            math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0
        ):
            raise RunError(f"--clip-grad must be a positive norm, got {self.clip_grad_norm}")

    @property
    def state_factor(self) -> int:
        """Optimizer state per parameter byte (the cost model's factor)."""
        if self.kind is TrainOptimizer.SGD and self.momentum > 0:
            return 1
        return _STATE_FACTOR[self.kind]

    @classmethod
    def resolve(
        cls,
        *,
        plan_kind: str,
        plan_weight_decay: float = 0.0,
        plan_clip: float | None = None,
        kind: str | None = None,
        lr: float,
        momentum: float | None = None,
        weight_decay: float | None = None,
        clip_grad_norm: float | None = None,
    ) -> OptimizerSettings:
        """The plan's settings with the run's options (those not None) taking precedence."""
        chosen = TrainOptimizer(kind or plan_kind)
        if momentum is None:
            momentum = DEFAULT_MOMENTUM if chosen is TrainOptimizer.MOMENTUM else 0.0
        if momentum > 0 and chosen in (TrainOptimizer.ADAM, TrainOptimizer.ADAMW):
            raise RunError(
                f"--momentum {momentum} does not apply to {chosen} (it has betas); drop --momentum"
            )
        return cls(
            kind=chosen,
            lr=lr,
            momentum=momentum,
            weight_decay=plan_weight_decay if weight_decay is None else weight_decay,
            clip_grad_norm=plan_clip if clip_grad_norm is None else clip_grad_norm,
        )

    def differences(
        self, *, plan_kind: str, plan_factor: int, plan_weight_decay: float = 0.0
    ) -> list[str]:
        """One line per way this run trains differently from what the plan assumed."""
        lines = []
        if str(self.kind) != plan_kind or self.state_factor != plan_factor:
            extra = ""
            if self.state_factor != plan_factor:
                extra = (
                    f": optimizer state is {self.state_factor}x the parameters, the plan "
                    f"counted {plan_factor}x, so memory differs from the prediction"
                )
            what = f"{self.kind}" + (f" (momentum {self.momentum})" if self.momentum else "")
            lines.append(f"the plan assumed optimizer {plan_kind}; training with {what}{extra}")
        if self.weight_decay != plan_weight_decay:
            lines.append(
                f"the plan says weight decay {plan_weight_decay:g}; training with "
                f"{self.weight_decay:g}"
            )
        return lines

    def build(self, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
        """The optimizer over ``params`` (None when there are none)."""
        params = list(params)
        if not params:
            return None
        if self.kind in (TrainOptimizer.SGD, TrainOptimizer.MOMENTUM):
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        if self.kind is TrainOptimizer.ADAM:
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


class GradientClipper:
    """Clips the whole pipeline's gradient by its global norm (module docstring).

    Args:
        max_norm: The norm to clip to.
        counted: The parameters whose gradients this rank adds to the norm.
        scaled: Every parameter whose gradient this rank scales.
        group: The group of every active rank (None: one process).
        device: Where the partial sum lives (the backend's device).
    """

    def __init__(
        self,
        *,
        max_norm: float,
        counted: Sequence[torch.nn.Parameter],
        scaled: Sequence[torch.nn.Parameter],
        group: Any,
        device: torch.device,
    ) -> None:
        self.max_norm = max_norm
        self.counted = list(counted)
        self.scaled = list(scaled)
        self.group = group
        self.device = device
        self.last_norm = 0.0

    def clip(self) -> float:
        """Scale the gradients in place; returns the global norm before clipping."""
        square = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.counted:
            if p.grad is not None:
                square += p.grad.detach().double().pow(2).sum()
        if self.group is not None:
            dist.all_reduce(square, group=self.group)
        norm = float(square.sqrt())
        coef = self.max_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s formula
        if coef < 1:
            for p in self.scaled:
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.last_norm = norm
        return norm
