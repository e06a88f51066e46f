"""Starting the ranks of a plan as local processes, the way torchrun would.

:func:`launch_local` starts ``python -m planner.runtime PLAN.json ...`` once per rank with
torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and one CPU thread each by default, then watches them: when one rank fails, the
others are stopped (terminate, then kill after a grace period) so no process is left behind, and
the launcher names the rank that failed first.

Example:
    >>> port = free_port()                                           # doctest: +SKIP
    >>> launch_local(RunConfig(plan_path="plan.json", steps=5), world_size=2)  # doctest: +SKIP
    0
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from planner.runtime.config import RunConfig

__all__ = ["LaunchResult", "free_port", "launch_local", "rank_environment"]

_GRACE_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def rank_environment(
    rank: int, world_size: int, *, port: int, threads: int, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of one local rank: torchrun's variables and the thread count."""
    env = dict(os.environ if base is None else base)
    env.pop("TORCHELASTIC_RUN_ID", None)  # not under torchrun's agent: rendezvous over TCP
    env.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
    )
    return env


@dataclass(frozen=True, kw_only=True)
class LaunchResult:
    """How the local ranks ended.

    Attributes:
        returncodes: Exit status of every rank (negative: killed by that signal).
        first_failure: The rank that failed first, or None when all succeeded.
    """

    returncodes: tuple[int, ...]
    first_failure: int | None

    @property
    def status(self) -> int:
        """0 if every rank succeeded, else the first failing rank's status (1 for a signal)."""
        if self.first_failure is None:
            return 0
        code = self.returncodes[self.first_failure]
        return code if code > 0 else 1


def launch_local(
    config: RunConfig, *, world_size: int, python: str = sys.executable
) -> LaunchResult:
    """Run ``world_size`` ranks of ``config``'s plan on this machine and wait for them.

    Args:
        config: The run; passed to every rank as command-line arguments.
        world_size: Processes to start (the plan's highest rank plus one).
        python: The interpreter to start them with.
    """
    port = free_port()
    argv = [python, "-m", "planner.runtime", *config.to_argv()]
    procs = [
        subprocess.Popen(
            argv, env=rank_environment(r, world_size, port=port, threads=config.threads)
        )
        for r in range(world_size)
    ]
    first: int | None = None
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if first is None and p.returncode not in (None, 0):
                    first = rank
                    print(
                        f"plan run: rank {rank} exited with status {p.returncode}; "
                        "stopping the other ranks",
                        file=sys.stderr,
                        flush=True,
                    )
                    _stop(procs)
            time.sleep(0.05)
    except BaseException:
        _stop(procs)
        raise
    codes = tuple(p.returncode for p in procs)
    if first is None:
        first = next((r for r, c in enumerate(codes) if c != 0), None)
    return LaunchResult(returncodes=codes, first_failure=first)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the ranks still running; kill those that outlive the grace period."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
