"""Faulted runs: whatever dies (a rank, in training or in the rendezvous, or the launcher), every
process of the run ends, and the rank that failed first is named.

Each test starts ``python -m planner.commands.run`` (what ``plan run`` does) with a marker in the
environment, which every rank inherits, and finds the run's processes in ``/proc`` by it: the
test's verdict is that no process with the marker is left, checked by polling the process table
up to a generous deadline (the promise is 10 s; the machine may be busy).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from runtime_helpers import HERE, REPO, make_plan

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc"),
]

MLP = "runtime_models:mlp"
DEADLINE_S = 20.0  # the run promises 10 s; polled generously under load


def _processes(marker: str) -> dict[int, dict[str, str]]:
    """Live processes whose environment holds ``marker``: pid -> (RANK, PPID)."""
    needle = f"PLANNER_FAULT_TEST={marker}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if needle not in environ or stat[0] == "Z":
            continue
        rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), "")
        found[int(entry.name)] = {"rank": rank, "ppid": stat[1]}
    return found


def _ranks(marker: str, launcher: int) -> dict[int, int]:
    """The launcher's ranks: rank -> pid."""
    return {
        int(info["rank"]): pid
        for pid, info in _processes(marker).items()
        if info["rank"] and int(info["ppid"]) == launcher
    }


def _connected(port: int) -> bool:
    """Whether a TCP connection to or from local ``port`` is established (``/proc/net/tcp``)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            ends = (fields[1], fields[2])
            if fields[3] == "01" and any(int(e.rsplit(":", 1)[1], 16) == port for e in ends):
                return True
    return False


def _wait_in_rendezvous(pid: int, run: _Run, timeout: float = 180.0) -> None:
    """Wait until rank ``pid`` serves the store and its own client is connected to it: it is in
    the rendezvous (rank 1, stopped, cannot have connected)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    port = int(environ.split(b"MASTER_PORT=")[1].split(b"\0")[0])
    end = time.monotonic() + timeout
    while not _connected(port):
        assert run.proc.poll() is None and time.monotonic() < end, run.finish()
        time.sleep(0.05)


def _left_after(marker: str, since: float) -> dict[int, dict[str, str]]:
    """The run's processes still alive after polling up to the deadline (empty: all ended).

    Prints how long after ``since`` (the fault) the last one ended, for the record (``-s``).
    """
    end = since + DEADLINE_S
    while (left := _processes(marker)) and time.monotonic() < end:
        time.sleep(0.05)
    print(f"every process of the run ended {time.monotonic() - since:.2f} s after the fault")
    return left


class _Run:
    """``python -m planner.commands.run`` on a plan, its output read with deadlines."""

    def __init__(self, plan: Path, *argv: str, world: int) -> None:
        self.marker = uuid.uuid4().hex
        path = os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path, "PLANNER_FAULT_TEST": self.marker}
        self.world = world
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "planner.commands.run", str(plan), "--model", MLP, *argv],
            env=env,
            cwd=plan.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.out = b""

    def wait_for_output(self, text: str, timeout: float = 120.0) -> None:
        """Read stdout until ``text`` appears (the run is training)."""
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        while text.encode() not in self.out:
            assert time.monotonic() < end, f"no {text!r} in time: {self.out[-2000:]!r}"
            if sel.select(timeout=1.0):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, f"run ended early: {self.finish()[1]}"
                self.out += chunk
        sel.close()

    def ranks(self, timeout: float = 120.0) -> dict[int, int]:
        """rank -> pid once every rank has started."""
        end = time.monotonic() + timeout
        while len(found := _ranks(self.marker, self.proc.pid)) < self.world:
            assert self.proc.poll() is None and time.monotonic() < end, self.finish()
            time.sleep(0.05)
        return found

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        """The launcher's exit status and stderr (killed if it outlives ``timeout``)."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            _, err = self.proc.communicate()
        return self.proc.returncode, err.decode(errors="replace")

    def cleanup(self) -> None:
        """Kill whatever of the run is left (a failed test must not leave processes behind)."""
        for pid in _processes(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.fixture
def plan2(tmp_path: Path) -> Path:
    make_plan(MLP, cuts=["_3"], replicas=[1, 1]).save(tmp_path / "plan.json")
    return tmp_path / "plan.json"


LONG = ("--steps", "1000000", "--timeout", "60")


@pytest.mark.parametrize("victim", [0, 1], ids=["rank-0", "last-rank"])
def test_a_killed_rank_ends_the_run_and_is_named(plan2: Path, victim: int) -> None:
    run = _Run(plan2, *LONG, world=2)
    try:
        run.wait_for_output("step 1/")
        ranks = run.ranks()
        os.kill(ranks[victim], signal.SIGKILL)
        fault = time.monotonic()
        status, err = run.finish()
        left = _left_after(run.marker, fault)
    finally:
        run.cleanup()
    assert status == 1, err
    assert f"rank {victim} was killed by SIGKILL" in err, err
    others = [r for r in range(2) if r != victim]
    assert not any(f"rank {r} failed first" in err for r in others), err
    assert f"rank {victim} failed first" in err, err
    assert "Traceback" not in err
    assert not left, f"processes left: {left}"


def test_a_rank_killed_in_the_rendezvous_ends_the_run(plan2: Path) -> None:
    run = _Run(plan2, *LONG, world=2)
    try:
        ranks = run.ranks()
        os.kill(ranks[1], signal.SIGSTOP)  # rank 1 never reaches the rendezvous
        _wait_in_rendezvous(ranks[0], run)  # rank 0 waits there for rank 1
        os.kill(ranks[1], signal.SIGKILL)
        fault = time.monotonic()
        status, err = run.finish()
        left = _left_after(run.marker, fault)
    finally:
        run.cleanup()
    assert status == 1, err
    assert "rank 1 was killed by SIGKILL" in err and "rank 1 failed first" in err, err
    assert not left, f"processes left: {left}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_ends_every_rank(plan2: Path, signum: signal.Signals) -> None:
    run = _Run(plan2, *LONG, world=2)
    try:
        run.wait_for_output("step 1/")
        run.ranks()
        run.proc.send_signal(signum)
        fault = time.monotonic()
        status, err = run.finish()
        left = _left_after(run.marker, fault)
    finally:
        run.cleanup()
    assert status == 128 + signum, err
    assert f"got {signum.name}; stopping the ranks" in err, err
    assert f"stopped by {signum.name}" in err, err
    assert "Traceback" not in err
    assert not left, f"processes left: {left}"


def test_sigkill_to_the_launcher_ends_every_rank(plan2: Path) -> None:
    run = _Run(plan2, *LONG, world=2)
    try:
        run.wait_for_output("step 1/")
        ranks = run.ranks()
        run.proc.kill()
        fault = time.monotonic()
        run.proc.wait(timeout=60)
        left = _left_after(run.marker, fault)
    finally:
        run.cleanup()
    assert sorted(ranks) == [0, 1]
    assert not left, f"processes left: {left}"


def test_a_rank_refusing_its_input_ends_the_run_and_is_named(plan2: Path) -> None:
    """Rank 1's checkpoint file is missing: rank 1 fails (status 2), not rank 0 waiting for it."""
    folder = plan2.parent / "ckpt"
    first = _Run(
        plan2, "--steps", "2", "--checkpoint-dir", str(folder), "--checkpoint-every", "1", world=2
    )
    try:
        status, err = first.finish(timeout=300)
    finally:
        first.cleanup()
    assert status == 0, err
    (folder / "step-000002" / "rank-1.pt").unlink()
    run = _Run(
        plan2,
        "--steps",
        "4",
        "--checkpoint-dir",
        str(folder),
        "--resume",
        "--timeout",
        "60",
        world=2,
    )
    try:
        status, err = run.finish(timeout=300)
        left = _left_after(run.marker, time.monotonic())
    finally:
        run.cleanup()
    assert status == 2, err
    assert "rank 1 exited with status 2" in err and "rank 1 failed first" in err, err
    assert "rank-1.pt is missing" in err, err
    assert not left, f"processes left: {left}"
    assert not (folder / "lock").exists()  # released
