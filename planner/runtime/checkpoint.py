"""Checkpoints: every rank saves its own stage; a checkpoint counts once every rank has saved.

Layout under ``--checkpoint-dir``::

    step-000004/rank-0.pt     one file per rank: the stage's parameters and buffers, optimizer
    step-000004/rank-1.pt     state, the weight-stash counter, the RNG state, the step
    latest                    "4": the newest checkpoint every rank finished (written last)

Each file is written to a temporary name and renamed, and ``latest`` moves only after a barrier,
so a crash mid-save leaves the previous checkpoint in force. Files are loaded with
``torch.load(weights_only=True)``. A checkpoint remembers the plan it was made with (sha256 of
the plan's JSON) and refuses to resume another.

Under ``pipedream`` nothing ever flushes, so with ``--checkpoint-every N`` the run drains the
pipeline every ``N`` steps: at that point no microbatch is in flight and no old weight version
is stashed, and a resumed run equals an uninterrupted one with the same ``--checkpoint-every``.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> save_rank(d, step=2, rank=0, state={"step": 2})
    >>> latest_step(d) is None
    True
    >>> mark_complete(d, step=2); latest_step(d), load_rank(d, step=2, rank=0)["step"]
    (2, 2)
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from planner._io import atomic_write_bytes, atomic_write_text
from planner.runtime.config import RunError

__all__ = [
    "Checkpointer",
    "latest_step",
    "load_rank",
    "mark_complete",
    "plan_digest",
    "resume_state",
    "save_rank",
]


def _step_dir(root: str | os.PathLike[str], step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def plan_digest(plan_json: str) -> str:
    """What a checkpoint records of its plan: sha256 of the plan's JSON."""
    return hashlib.sha256(plan_json.encode()).hexdigest()


def save_rank(root: str | os.PathLike[str], *, step: int, rank: int, state: dict[str, Any]) -> None:
    """Write one rank's state of checkpoint ``step`` atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(_step_dir(root, step) / f"rank-{rank}.pt", buffer.getvalue())


def mark_complete(root: str | os.PathLike[str], *, step: int) -> None:
    """Make checkpoint ``step`` the one to resume from (after every rank saved it)."""
    atomic_write_text(Path(root) / "latest", f"{step}\n")


def latest_step(root: str | os.PathLike[str]) -> int | None:
    """The newest complete checkpoint's step, or None if there is none."""
    marker = Path(root) / "latest"
    try:
        return int(marker.read_text().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        raise RunError(f"checkpoint marker {marker} is corrupt; delete it or the folder") from None


def load_rank(root: str | os.PathLike[str], *, step: int, rank: int) -> dict[str, Any]:
    """One rank's state of checkpoint ``step``.

    Raises:
        RunError: The file is missing or unreadable.
    """
    path = _step_dir(root, step) / f"rank-{rank}.pt"
    try:
        state: dict[str, Any] = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise RunError(
            f"checkpoint {path} is missing; resume with the plan and ranks that made it"
        ) from None
    except Exception as exc:  # a truncated or foreign file
        raise RunError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    return state


class Checkpointer:
    """Saves this rank's state every ``every`` steps and marks checkpoints complete.

    Args:
        root: The checkpoint folder, or None for no checkpoints.
        every: Steps between checkpoints (0: never).
        rank: This rank.
        plan: The plan's digest (:func:`plan_digest`).
        group: The process group of every rank with a stage (for the barrier).
        leader: Whether this rank writes the ``latest`` marker.
    """

    def __init__(
        self, root: str | None, *, every: int, rank: int, plan: str, group: Any, leader: bool
    ) -> None:
        self.root, self.every, self.rank, self.plan = root, every, rank, plan
        self.group, self.leader = group, leader

    def due(self, steps_done: int) -> bool:
        """Whether a checkpoint falls after ``steps_done`` steps."""
        return self.root is not None and self.every > 0 and steps_done % self.every == 0

    def save(
        self,
        steps_done: int,
        *,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        stage: int,
        replica: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Save this rank's state after ``steps_done`` steps; all stage ranks call it together."""
        import torch.distributed as dist

        assert self.root is not None
        save_rank(
            self.root,
            step=steps_done,
            rank=self.rank,
            state={
                "step": steps_done,
                "plan": self.plan,
                "stage": stage,
                "replica": replica,
                "module": module.state_dict(),
                "optimizer": None if optimizer is None else optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                **(extra or {}),
            },
        )
        dist.barrier(group=self.group)  # every rank's file is in place
        if self.leader:
            mark_complete(self.root, step=steps_done)
        dist.barrier(group=self.group)  # nobody runs on (or resumes) before the marker moved

    @staticmethod
    def restore(
        state: dict[str, Any], *, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        """Put a loaded state back: parameters, buffers, optimizer state, RNG."""
        module.load_state_dict(state["module"])
        if optimizer is not None and state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])


def resume_state(
    root: str, *, rank: int, stage: int | None, replica: int, plan: str, steps: int
) -> tuple[int, dict[str, Any] | None]:
    """The step to start from and this rank's saved state, checked against the run.

    Raises:
        RunError: No complete checkpoint, another plan, another stage, or nothing left to run.
    """
    step = latest_step(root)
    if step is None:
        raise RunError(f"--resume: no complete checkpoint in {root}; run without --resume")
    if step >= steps:
        raise RunError(
            f"--resume: the checkpoint is after step {step}; --steps {steps} "
            f"leaves nothing to run: pass --steps above {step}"
        )
    if stage is None:
        return step, None
    state = load_rank(root, step=step, rank=rank)
    if state.get("plan") != plan:
        raise RunError(
            f"--resume: checkpoint {root} was made with another plan; "
            "resume with the plan that made it or start afresh"
        )
    if (state.get("stage"), state.get("replica")) != (stage, replica):
        raise RunError(
            f"--resume: rank {rank} ran stage {state.get('stage')} in the checkpoint "
            f"but runs stage {stage} now; the plan's ranks changed"
        )
    return step, state
