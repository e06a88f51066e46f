"""The conditions a profile is measured under, and a run's: threads, clock, allocator, device.

A profile's times hold for a rank that runs the way the profiler ran. Both sides therefore use
the same defaults, and ``plan run`` says, one line each, where the run differs from its profile
before training (:func:`differences`).

* **Threads**: on the CPU a rank gets the cores its machine has divided among the ranks that
  share it, ``max(1, cores // ranks_on_this_host)`` (:func:`rank_threads`). ``plan run`` uses that
  by default; ``plan profile`` measures as a rank of a 2-rank local run does, and ``plan`` as a
  rank of the plan it is about to make (its devices on one host). Measuring with all cores and
  running with one made a README run 14x slower than its prediction.
* **Clock**: with one thread, process CPU time (``time.process_time``) is the time the rank
  computes; it leaves out the time other jobs hold the core, so profiles taken on a shared
  machine predict what the machine does when quiet. With several threads CPU time adds the
  threads up, so wall time is used (:func:`default_clock`). On CUDA: wall time with the device
  synchronised before every reading.
* **Allocator**: on Linux/glibc the profiler keeps freed memory in the heap
  (:func:`planner.profile.timing.keep_freed_memory`); the runtime trains under the same setting.
* **Device**: type, and the GPU's name on CUDA.

Example:
    >>> rank_threads(ranks_on_host=2, cores=2), rank_threads(ranks_on_host=8, cores=2)
    (1, 1)
    >>> default_clock("cpu", 1), default_clock("cpu", 4), default_clock("cuda", 1)
    ('cpu', 'wall', 'wall')
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PROFILE_RANKS",
    "RunConditions",
    "cuda_device_name",
    "default_clock",
    "differences",
    "rank_threads",
]

DEFAULT_PROFILE_RANKS = 2
"""``plan profile`` measures as one rank of a local run of this many ranks does."""


def rank_threads(*, ranks_on_host: int, cores: int | None = None) -> int:
    """CPU threads one rank gets when ``ranks_on_host`` ranks share this machine's cores."""
    available = cores if cores is not None else _cores()
    return max(1, available // max(1, ranks_on_host))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_clock(device: str, threads: int) -> str:
    """``"cpu"`` (process time) for one CPU thread, else ``"wall"`` (module docstring)."""
    return "cpu" if device == "cpu" and threads == 1 else "wall"


def cuda_device_name(index: int = 0) -> str | None:
    """The name of CUDA device ``index``, None without CUDA."""
    import torch

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    return str(torch.cuda.get_device_name(index))


@dataclass(frozen=True, kw_only=True)
class RunConditions:
    """How one rank of a run computes.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        threads: CPU threads per rank.
        allocator: ``"keep-freed"`` or ``"default"`` (None: not applicable).
        device_name: The GPU's name on CUDA.
    """

    device: str
    threads: int
    allocator: str | None = None
    device_name: str | None = None


def differences(
    *,
    device: str,
    threads: int | None,
    timer: str | None,
    allocator: str | None,
    device_name: str | None,
    run: RunConditions,
) -> list[str]:
    """One line per condition under which the run differs from the profile (empty: none).

    The first five arguments are the profile's fields (None: not recorded, not compared).

    Example:
        >>> run = RunConditions(device="cpu", threads=1, allocator="keep-freed")
        >>> differences(device="cpu", threads=2, timer="wall", allocator="keep-freed",
        ...             device_name=None, run=run)
        ['the profile was measured with 2 threads per process, this run uses 1 (--threads 2 to match; times scale roughly with threads)']
    """
    lines = []
    if device != run.device:
        lines.append(
            f"the profile was measured on {device}, this run computes on {run.device}: "
            "predicted times do not apply; profile on the device you run on"
        )
    elif device == "cuda" and device_name and run.device_name and device_name != run.device_name:
        lines.append(
            f"the profile was measured on {device_name}, this run uses {run.device_name}: "
            "predicted times do not apply; profile on this GPU"
        )
    if run.device == "cpu" and threads is not None and threads != run.threads:
        lines.append(
            f"the profile was measured with {threads} threads per process, this run uses "
            f"{run.threads} (--threads {threads} to match; times scale roughly with threads)"
        )
    if run.device == "cpu" and timer == "cpu" and (threads or 1) > 1:
        lines.append(
            f"the profile was timed in process CPU time with {threads} threads, which adds the "
            "threads' times up: its times are too high; profile with --clock wall"
        )
    if (
        run.device == "cpu"
        and allocator is not None
        and run.allocator is not None
        and allocator != run.allocator
    ):
        lines.append(
            f"the profile was measured with allocator setting {allocator!r}, this run uses "
            f"{run.allocator!r}: large tensors cost differently"
        )
    return lines
