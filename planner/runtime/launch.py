"""Starting the ranks of a plan as local processes, the way torchrun would, and ending them all.

:func:`launch_local` starts ``python -P -m planner.runtime PLAN.json ...`` once per rank with
torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and one CPU thread each by default, then watches every rank:

* one thread per rank waits for it, so exits are seen in the order they happen and the rank that
  failed first (by time) is named, with its exit status or the signal that killed it;
* when any rank fails, the others get SIGTERM and, after :data:`GRACE_S`, SIGKILL: every rank has
  ended within 5 s of the first death, also while the others wait in the rendezvous;
* the store's socket is bound by the launcher on loopback and passed to rank 0 (see
  :mod:`planner.runtime.rendezvous`), so its port cannot be taken in between;
* each rank runs in its own process group, and the whole group is killed at the end, so nothing a
  rank started outlives the run;
* SIGTERM, SIGINT or SIGHUP to the launcher is passed on to the ranks (as SIGTERM; a rank blocked
  in a collective would not see SIGINT), with the same grace period;
* the launcher's own death (even SIGKILL) ends the ranks: each rank asks the kernel for a
  parent-death signal and watches its parent (:func:`follow_launcher`, called first thing by
  ``python -m planner.runtime``), which the launcher names in ``PLANNER_LAUNCHER_PID``.

Example:
    >>> launch_local(RunConfig(plan_path="plan.json", steps=5), world_size=2)  # doctest: +SKIP
    LaunchResult(returncodes=(0, 0), first_failure=None, signal=None)
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import FrameType

from planner.runtime.config import RunConfig
from planner.runtime.rendezvous import STORE_FD_ENV

__all__ = [
    "GRACE_S",
    "LAUNCHER_ENV",
    "LaunchResult",
    "describe_status",
    "follow_launcher",
    "free_port",
    "launch_local",
    "rank_environment",
]

GRACE_S = 3.0
"""Seconds between SIGTERM and SIGKILL when ranks are stopped (under the 5 s the run promises)."""

LAUNCHER_ENV = "PLANNER_LAUNCHER_PID"
"""Environment variable naming the launcher's pid in every rank it starts."""

_TICK_S = 0.05
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def rank_environment(
    rank: int,
    world_size: int,
    *,
    port: int,
    threads: int | None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one local rank: torchrun's variables, the thread count, the launcher."""
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
            LAUNCHER_ENV: str(os.getpid()),
        }
    )
    if threads and threads > 0:  # else (0: automatic) each rank sets torch's thread count itself
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def describe_status(returncode: int) -> str:
    """``"exited with status 1"`` or ``"was killed by SIGKILL"`` for a process's return code."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


@dataclass(frozen=True, kw_only=True)
class LaunchResult:
    """How the local ranks ended.

    Attributes:
        returncodes: Exit status of every rank (negative: killed by that signal).
        first_failure: The rank that failed first, or None when all succeeded.
        signal: The signal that stopped the launcher (SIGTERM, SIGINT, SIGHUP), or None.
    """

    returncodes: tuple[int, ...]
    first_failure: int | None
    signal: int | None = None

    @property
    def status(self) -> int:
        """0 if every rank succeeded; 128 + signal if the launcher was stopped; else the first
        failing rank's status (1 when it was killed by a signal)."""
        if self.signal is not None:
            return 128 + self.signal
        if self.first_failure is None:
            return 0
        code = self.returncodes[self.first_failure]
        return code if code > 0 else 1

    def describe(self) -> str:
        """One line on how the run ended."""
        if self.signal is not None:
            return f"stopped by {signal.Signals(self.signal).name}; every rank was ended"
        if self.first_failure is None:
            return "every rank finished"
        code = self.returncodes[self.first_failure]
        return f"rank {self.first_failure} failed first: it {describe_status(code)}"


def launch_local(
    config: RunConfig, *, world_size: int, python: str = sys.executable
) -> LaunchResult:
    """Run ``world_size`` ranks of ``config``'s plan on this machine and wait for them.

    Returns when every rank has ended; when one fails, or the launcher is asked to stop, the
    others are stopped first (see the module docstring).

    Args:
        config: The run; passed to every rank as command-line arguments.
        world_size: Processes to start (the plan's highest rank plus one).
        python: The interpreter to start them with.
    """
    # rank 0 serves the store on this socket: bound here, on loopback, so the port stays ours
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(max(world_size, 128))
    port = listener.getsockname()[1]
    # -P: the current folder is not on the ranks' import path (a model there runs only when
    # trusted, see planner.models.registry.check_trusted)
    argv = [python, "-P", "-m", "planner.runtime", *config.to_argv()]
    exits: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    procs: list[subprocess.Popen[bytes]] = []
    with _stop_signals() as stop, listener:
        try:
            for rank in range(world_size):
                env = rank_environment(rank, world_size, port=port, threads=config.threads)
                fds: tuple[int, ...] = ()
                if rank == 0:
                    env[STORE_FD_ENV] = str(listener.fileno())
                    fds = (listener.fileno(),)
                proc = subprocess.Popen(argv, env=env, process_group=0, pass_fds=fds)
                procs.append(proc)
                waiter = threading.Thread(
                    target=_wait, args=(proc, rank, exits), name=f"rank-{rank}", daemon=True
                )
                waiter.start()
            listener.close()  # rank 0 has it now
            first = _watch(len(procs), exits, stop)
        finally:
            _stop(procs)
    codes = tuple(p.returncode for p in procs)
    if stop.signum is not None:
        return LaunchResult(returncodes=codes, first_failure=first, signal=stop.signum)
    if first is None:
        first = next((r for r, c in enumerate(codes) if c != 0), None)
    return LaunchResult(returncodes=codes, first_failure=first)


def _wait(
    proc: subprocess.Popen[bytes], rank: int, exits: queue.SimpleQueue[tuple[int, int]]
) -> None:
    """Report ``rank``'s exit the moment it happens (one thread per rank)."""
    exits.put((rank, proc.wait()))


def _watch(ranks: int, exits: queue.SimpleQueue[tuple[int, int]], stop: _StopFlag) -> int | None:
    """Wait until every rank ended, one failed (its rank returned), or a stop signal came."""
    ended = 0
    while ended < ranks and stop.signum is None:
        try:
            rank, code = exits.get(timeout=_TICK_S)
        except queue.Empty:
            continue
        ended += 1
        if code != 0:
            print(
                f"plan run: rank {rank} {describe_status(code)}; stopping the other ranks",
                file=sys.stderr,
                flush=True,
            )
            return rank
    if stop.signum is not None:
        print(
            f"plan run: got {signal.Signals(stop.signum).name}; stopping the ranks",
            file=sys.stderr,
            flush=True,
        )
    return None


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """End every rank and everything it started: SIGTERM, then SIGKILL after the grace period."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()
    for p in procs:  # what the ranks started (their group outlives them)
        _signal_group(p, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Send ``signum`` to ``proc``'s process group (it leads its own); nothing if it is gone."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


@dataclass
class _StopFlag:
    signum: int | None = None


@contextmanager
def _stop_signals() -> Iterator[_StopFlag]:
    """While inside, SIGTERM/SIGINT/SIGHUP set the flag instead of ending the launcher.

    Handlers can only be installed from the main thread; elsewhere the flag never fires.
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if flag.signum is None:
            flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def follow_launcher(environ: Mapping[str, str] | None = None) -> None:
    """In a rank started by :func:`launch_local`: end with the launcher.

    Asks Linux for SIGKILL when the launcher dies (``PR_SET_PDEATHSIG``), exits at once if the
    launcher is already gone, and starts a watchdog thread that ends this rank's process group
    when its parent changes (the portable fallback). Does nothing outside ``plan run`` (under
    torchrun, whose agent ends its workers itself).
    """
    value = (os.environ if environ is None else environ).get(LAUNCHER_ENV)
    if not value or not value.isdigit():
        return
    launcher = int(value)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still ends the rank
    if os.getppid() != launcher:  # it died before the parent-death signal was armed
        _end_group()
    watchdog = threading.Thread(
        target=_watch_parent, args=(launcher,), name="planner-launcher-watchdog", daemon=True
    )
    watchdog.start()


def _watch_parent(launcher: int) -> None:
    while os.getppid() == launcher:
        time.sleep(0.5)
    _end_group()


def _end_group() -> None:
    """Kill this rank's process group (itself and what it started) if it leads one, else exit."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(1)
