"""How long after a fault every process of a ``plan run`` has ended (the run promises 10 s).

For each fault, a fresh ``plan run`` of a two-rank gpt2-tiny plan (made once with ``plan``), many
steps so it is still training; after the first logged step the fault is injected and the process
table (``/proc``) is polled until no process carrying the run's environment marker is left:

* ``rank0``: SIGKILL to rank 0;  ``last``: SIGKILL to the last rank;
* ``rendezvous``: rank 1 is stopped before it joins, rank 0 waits in the rendezvous, rank 1 is
  killed;
* ``sigterm`` / ``sigkill``: the signal to the launcher.

Prints one line per fault: seconds from the fault to the last rank gone and to the last process
(the launcher included) gone, the launcher's exit
status and the first line it printed about the failure. Linux only.

Example:
    python benchmarks/fault_cleanup.py --faults rank0,sigterm
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

FAULTS = ("rank0", "last", "rendezvous", "sigterm", "sigkill")
POLL_LIMIT_S = 120.0


def _processes(marker: str) -> dict[int, tuple[str, int]]:
    """Live (not zombie) processes with ``marker`` in their environment: pid -> (RANK, ppid)."""
    needle = f"FAULT_CLEANUP={marker}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if needle in environ and fields[0] != "Z":
            rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), "")
            found[int(entry.name)] = (rank, int(fields[1]))
    return found


def _plan(folder: Path) -> Path:
    plan = folder / "tiny.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "planner.cli",
            "--model",
            "gpt2-tiny",
            "--gpus",
            "2",
            "--straight",
            "--batch-size",
            "8",
            "--microbatches",
            "4",
            "--profile-batch-size",
            "4",
            "--reps",
            "1",
            "--warmup",
            "0",
            "-o",
            str(plan),
        ],
        check=True,
        capture_output=True,
        cwd=folder,
    )
    return plan


def _connected(port: int) -> bool:
    """Whether a TCP connection to or from local ``port`` is established: rank 0 serves the
    store and its own client has connected (rank 1, stopped, cannot have)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            ends = (fields[1], fields[2])
            if fields[3] == "01" and any(int(e.rsplit(":", 1)[1], 16) == port for e in ends):
                return True
    return False


def measure(plan: Path, fault: str) -> tuple[float, float, int, str]:
    """Seconds from ``fault`` until every rank, and every process of the run (the launcher too),
    ended; the launcher's exit status; its first line about the failure."""
    marker = uuid.uuid4().hex
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "planner.commands.run",
            str(plan),
            "--steps",
            "1000000",
            "--timeout",
            "60",
            "--log-every",
            "1",
        ],
        env={**os.environ, "FAULT_CLEANUP": marker},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=plan.parent,
    )
    assert launcher.stdout is not None
    try:

        def ranks() -> dict[int, int]:
            while True:
                found = {
                    int(r): pid
                    for pid, (r, ppid) in _processes(marker).items()
                    if r and ppid == launcher.pid
                }
                if len(found) == 2:
                    return found
                if launcher.poll() is not None:
                    raise RuntimeError(f"the run ended early: {launcher.stderr.read()!r}")  # type: ignore[union-attr]
                time.sleep(0.05)

        if fault == "rendezvous":
            pids = ranks()
            os.kill(pids[1], signal.SIGSTOP)
            environ = Path(f"/proc/{pids[0]}/environ").read_bytes()
            port = int(environ.split(b"MASTER_PORT=")[1].split(b"\0")[0])
            while not _connected(port):
                time.sleep(0.05)
            os.kill(pids[1], signal.SIGKILL)
        else:
            sel = selectors.DefaultSelector()
            sel.register(launcher.stdout, selectors.EVENT_READ)
            out = b""
            while b"step 1/" not in out:
                if sel.select(timeout=1.0):
                    chunk = os.read(launcher.stdout.fileno(), 65536)
                    if not chunk:
                        raise RuntimeError("the run ended before its first step")
                    out += chunk
            pids = ranks()
            if fault in ("rank0", "last"):
                os.kill(pids[0 if fault == "rank0" else 1], signal.SIGKILL)
            else:
                launcher.send_signal(signal.SIGTERM if fault == "sigterm" else signal.SIGKILL)
        start = time.monotonic()
        ranks_s = None
        while time.monotonic() - start < POLL_LIMIT_S:
            left = _processes(marker)
            if ranks_s is None and not any(r for r, _ in left.values()):
                ranks_s = time.monotonic() - start
            if not left:
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - start
        _, err = launcher.communicate(timeout=POLL_LIMIT_S)
        lines = [x for x in err.decode(errors="replace").splitlines() if x.startswith("plan run:")]
        return ranks_s or elapsed, elapsed, launcher.returncode, lines[0] if lines else ""
    finally:
        for pid in _processes(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS)
    )
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    print(
        f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        plan = _plan(Path(tmp))
        for fault in faults:
            ranks_s, all_s, status, line = measure(plan, fault)
            print(
                f"{fault:<11} ranks ended {ranks_s:5.2f} s, every process {all_s:5.2f} s after "
                f"the fault; launcher status {status}; {line}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
