"""Checkpoints: every rank saves its own stage; a checkpoint counts once every rank has saved.

Layout under ``--checkpoint-dir``::

    step-000004/rank-0.pt     one file per rank: the stage's parameters and buffers, optimizer
    step-000004/rank-1.pt     state, the weight-stash counter, the RNG state, the step
    latest                    "4": the newest checkpoint every rank finished (written last)
    lock                      the pid of the run using the folder (while it runs)

Each file is written to a temporary name and renamed, and ``latest`` moves only after a barrier,
so a crash mid-save leaves the previous checkpoint in force. Files are loaded with
``torch.load(weights_only=True)``, so a checkpoint cannot run code. A checkpoint remembers the
plan it was made with (sha256 of the plan's JSON) and refuses to resume another; a tensor of
another shape than the stage's is named in a one-line error.

One run at a time uses a folder: :func:`checkpoint_lock` holds an advisory lock (``flock``) on
``lock`` for the whole run. The kernel drops it when the holder dies, so the lock of a killed run
is simply taken over; a second live run is refused with the first one's pid.

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

import errno
import hashlib
import io
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from planner._io import (
    atomic_write_bytes,
    atomic_write_text,
    check_input_file,
    printable,
    read_input_bytes,
)
from planner.runtime.config import RunError

__all__ = [
    "Checkpointer",
    "check_state_shapes",
    "checkpoint_lock",
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
    """The newest complete checkpoint's step, or None if there is none.

    Raises:
        RunError: The marker is not a regular file or not a whole number of steps.
    """
    marker = Path(root) / "latest"
    if not marker.exists() and not marker.is_symlink():
        return None
    data = read_input_bytes(marker, RunError, "checkpoint marker", max_bytes=64)
    text = data.decode("ascii", errors="replace").strip()
    if not text.isdigit() or not text.isascii():
        raise RunError(
            f"checkpoint marker {marker} holds {printable(text, limit=40)!r}, not a step number; "
            "delete it (and resume from scratch) or write the step of a complete checkpoint"
        )
    return int(text)


def load_rank(root: str | os.PathLike[str], *, step: int, rank: int) -> dict[str, Any]:
    """One rank's state of checkpoint ``step``.

    Raises:
        RunError: The file is missing or unreadable.
    """
    path = _step_dir(root, step) / f"rank-{rank}.pt"
    if not path.exists():
        raise RunError(f"checkpoint {path} is missing; resume with the plan and ranks that made it")
    check_input_file(path, RunError, "checkpoint", max_bytes=_MAX_CHECKPOINT_BYTES)
    try:  # weights_only: tensors and plain containers only, never code (a pickle's classes)
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # a truncated or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RunError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {printable(reason, limit=200)}"
        ) from None
    if not isinstance(state, dict):
        raise RunError(f"checkpoint {path} holds a {type(state).__name__}, not a rank's state")
    state.setdefault("path", str(path))
    return state


_MAX_CHECKPOINT_BYTES = 1 << 40


def check_state_shapes(
    saved: dict[str, Any], module: torch.nn.Module, *, source: str = "the checkpoint"
) -> None:
    """Refuse a saved ``state_dict`` whose tensors are not exactly the module's, naming one.

    Raises:
        RunError: A tensor missing, unexpected, or of another shape.
    """
    own = module.state_dict()
    for name, tensor in own.items():
        if name not in saved:
            raise RunError(
                f"{source} has no tensor {name!r} for this stage; it was made for another "
                "model or plan: resume with the plan that made it or start afresh"
            )
        value = saved[name]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise RunError(
                f"{source}: tensor {name!r} has shape {shape} but the stage's has "
                f"{tuple(tensor.shape)}; it was made for another model: start afresh"
            )
    extra = sorted(set(saved) - set(own))
    if extra:
        raise RunError(
            f"{source} has tensor {printable(extra[0], limit=80)!r} that this stage lacks; it "
            "was made for another model or plan: resume with the plan that made it"
        )


@contextmanager
def checkpoint_lock(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``root/lock`` while inside: the only run using this checkpoint folder.

    Creates ``root`` if needed. The lock is an ``flock``, which the kernel releases when the
    holding process ends, so a lock left by a killed run is taken over; the file records the
    holder's host and pid for the message a second run gets. Removed on exit.

    Raises:
        RunError: Another live run holds the folder, or the lock cannot be created.
    """
    import fcntl

    folder = Path(root)
    path = folder / "lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(
            f"cannot create checkpoint folder {folder}: {exc.strerror}; give a writable "
            "--checkpoint-dir"
        ) from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise RunError(
                f"cannot create the lock {path}: {exc.strerror}; give a writable --checkpoint-dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 200).decode("utf-8", errors="replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunError(f"cannot lock {path}: {exc.strerror}") from None
            raise RunError(
                f"checkpoint folder {folder} is in use by another run "
                f"({printable(holder, limit=80) or 'pid unknown'}); wait for it to end or give "
                "another --checkpoint-dir"
            ) from None
        try:  # the file may have been removed by its last holder between open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)  # before unlocking: nobody locks a file on its way out
        finally:
            os.close(fd)


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
        """Put a loaded state back: parameters, buffers, optimizer state, RNG.

        Raises:
            RunError: The saved tensors or optimizer state do not fit the stage (one line).
        """
        source = f"checkpoint {state.get('path', '')}".rstrip()
        check_state_shapes(state["module"], module, source=source)
        module.load_state_dict(state["module"])
        if optimizer is not None and state["optimizer"] is not None:
            try:
                optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, RuntimeError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise RunError(
                    f"{source}: the optimizer state does not fit this run's optimizer ({reason}); "
                    "resume with the same --optimizer, or start afresh"
                ) from None
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
