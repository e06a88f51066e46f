"""``plan run`` on local processes, ``python -m planner.runtime`` under torchrun, bad input, faults."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_helpers import HERE, REPO, free_port, make_plan, with_profile

from planner.commands import run as command
from planner.errors import PlanError, PlannerError
from planner.runtime.__main__ import main as rank_main

MLP = "runtime_models:mlp"


@pytest.fixture
def env_path(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Child processes find the test models (``runtime_models``) and the package."""
    path = os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    return {**os.environ, "PYTHONPATH": path}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.distributed
def test_plan_run_trains_and_writes_a_report(
    tmp_path: Path, env_path: dict, capfd: pytest.CaptureFixture[str]
) -> None:
    with_profile(make_plan(MLP, cuts=["_3"], replicas=[2, 1], schedule="1f1b"), tmp_path)
    argv = [str(tmp_path / "plan.json"), "--steps", "3", "--timeout", "30", "--model", MLP]
    assert command.run(_args(*argv)) == 0
    out = capfd.readouterr().out
    assert "step 3/3  loss" in out and "samples/s" in out
    assert "predicted vs measured" in out and "x the prediction" in out
    report = json.loads((tmp_path / "plan.report.json").read_text())
    assert report["format"] == "planner.runtime-report/1"
    assert len(report["losses"]) == 3 and report["measured_steps"] == 2
    assert sorted(r["rank"] for r in report["ranks"]) == [0, 1, 2]
    assert [s["ranks"] for s in report["stages"]] == [[0, 1], [2]]
    first = next(r for r in report["ranks"] if r["rank"] == 0)
    assert (
        first["compute_s"] > 0 and first["bytes_sent"] > 0 and first["microbatches_per_step"] == 2
    )
    comparison = report["comparison"]
    assert [c["stage"] for c in comparison["stages"]] == [0, 1]
    assert comparison["predicted_samples_per_s"] > 0 and comparison["measured_samples_per_s"] > 0
    # 3 layers (_0.._2) x (0.05 + 0.10) ms x 2 microbatches per replica of stage 0
    assert comparison["stages"][0]["predicted_compute_ms"] == pytest.approx(0.9)


def test_corrupt_plan_is_refused_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "planner.plan/1", "stages": [')
    with pytest.raises(PlanError, match="not valid JSON"):
        command.run(_args(str(bad)))
    assert command.main([str(bad)]) == 2


def test_plan_for_another_model_is_refused_before_starting(tmp_path: Path) -> None:
    plan = make_plan(MLP, cuts=["_3"], replicas=[1, 1])
    doc = plan.to_dict()
    doc["profile"]["graph_hash"] = "0123456789abcdef"
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="graph hash"):
        command.run(_args(str(tmp_path / "plan.json"), "--trust-model"))


def test_rank_refuses_a_plan_for_more_ranks_than_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_plan(MLP, cuts=["_3"], replicas=[2, 1]).save(tmp_path / "plan.json")
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    assert rank_main([str(tmp_path / "plan.json"), "--trust-model"]) == 2
    assert time.monotonic() - start < 30  # refused before any rendezvous
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only 2 processes were started; start 3" in err[0]


def test_plan_cli_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = pytest.importorskip("planner.cli")
    assert cli.main(["run", str(tmp_path / "missing.json")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_runtime_errors_are_planner_errors() -> None:
    from planner.runtime.config import RunError

    assert issubclass(RunError, PlannerError)


@pytest.mark.distributed
def test_two_torchrun_nodes_on_loopback(tmp_path: Path, env_path: dict) -> None:
    make_plan(MLP, cuts=["_3"], replicas=[1, 1], schedule="gpipe").save(tmp_path / "plan.json")
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "--rdzv-backend",
                "static",
                "-m",
                "planner.runtime",
                str(tmp_path / "plan.json"),
                "--steps",
                "2",
                "--timeout",
                "30",
                "--model",
                MLP,
            ],
            env={**env_path, "OMP_NUM_THREADS": "1"},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    assert "step 2/2  loss" in outputs[1]  # the last stage (node 1) prints the losses
    report = json.loads((tmp_path / "plan.report.json").read_text())
    assert report["world_size"] == 2 and len(report["ranks"]) == 2


def test_missing_data_folder_is_refused_before_starting(tmp_path: Path) -> None:
    make_plan(MLP, cuts=["_3"], replicas=[1, 1]).save(tmp_path / "plan.json")
    with pytest.raises(PlannerError, match="not a folder"):
        command.run(
            _args(str(tmp_path / "plan.json"), "--data", str(tmp_path / "none"), "--model", MLP)
        )


# --- trust: a plan's model that is code runs only when the user says so -----------------------

USER_MODEL = """
import os
import signal
import pathlib

pathlib.Path(os.environ["MARKER_FILE"]).write_text("imported")

from runtime_models import mlp  # noqa: E402,F401
"""


@pytest.fixture
def user_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A plan whose model is ``usermodel:mlp``, from ``usermodel.py`` in the plan's folder,
    which writes ``$MARKER_FILE`` when imported."""
    doc = make_plan(MLP, cuts=["_3"], replicas=[1, 1]).to_dict()
    doc["profile"]["model"] = "usermodel:mlp"
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    (tmp_path / "usermodel.py").write_text(USER_MODEL)
    return tmp_path / "plan.json"


def _command(
    plan: Path, entry: str, *argv: str, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """``python -m ENTRY PLAN ARGV`` in the plan's folder (where usermodel.py is)."""
    return subprocess.run(
        [sys.executable, "-m", entry, str(plan.name), *argv],
        cwd=plan.parent,
        env={**env, "MARKER_FILE": str(plan.parent / "marker"), "RANK": "0", "WORLD_SIZE": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["planner.commands.run", "planner.runtime"])
def test_a_plans_model_in_the_current_folder_does_not_run_without_trust(
    user_plan: Path, env_path: dict, entry: str
) -> None:
    done = _command(user_plan, entry, "--steps", "1", env=env_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "'usermodel:mlp'" in lines[0] and "--trust-model" in lines[0]
    assert not (user_plan.parent / "marker").exists()  # usermodel.py never ran
    assert not (user_plan.parent / "plan.report.json").exists()


@pytest.mark.slow
def test_a_plans_model_runs_with_trust_model(user_plan: Path, env_path: dict) -> None:
    # trusted: the model is imported (from the current folder) and checked; a missing data
    # folder then stops the run before any rank starts
    done = _command(
        user_plan, "planner.commands.run", "--trust-model", "--data", "none", env=env_path
    )
    assert (user_plan.parent / "marker").read_text() == "imported"
    assert done.returncode == 2 and "not a folder" in done.stderr, done.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_a_plans_model_runs_when_named_on_the_command_line(user_plan: Path, env_path: dict) -> None:
    done = _command(
        user_plan,
        "planner.commands.run",
        "--model",
        "usermodel:mlp",
        "--steps",
        "2",
        "--timeout",
        "60",
        env=env_path,
    )
    assert done.returncode == 0, done.stderr
    assert "step 2/2  loss" in done.stdout
    assert (user_plan.parent / "marker").read_text() == "imported"
    assert (user_plan.parent / "plan.report.json").is_file()


@pytest.mark.parametrize(
    ("model", "argv", "message"),
    [
        ("sys:exit", [], "'sys:exit' is code from a file"),
        ("sys:exit", ["--trust-model"], "factory 'sys:exit' failed: SystemExit"),
        ("os:getcwd", ["--model", "os:getcwd"], "returned str"),
        (MLP, ["--model", "other:model"], "is not the plan's model"),
        ("gpt2-tiny", ["--model", MLP], "is not the plan's model"),
    ],
)
def test_a_plans_model_is_checked_before_starting(
    tmp_path: Path, model: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = make_plan(MLP, cuts=["_3"], replicas=[1, 1]).to_dict()
    doc["profile"]["model"] = model
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    assert command.main([str(tmp_path / "plan.json"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_nccl_without_gpus_is_refused_before_starting(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_plan(MLP, cuts=["_3"], replicas=[1, 1]).save(tmp_path / "plan.json")
    with pytest.raises(PlannerError, match="--backend nccl needs CUDA"):
        command.run(_args(str(tmp_path / "plan.json"), "--backend", "nccl", "--model", MLP))


# --- a rank ends with its launcher -------------------------------------------------------------

_RANK = (
    "import time\n"
    "from planner.runtime.launch import follow_launcher\n"
    "follow_launcher()\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)
_LAUNCHER = (
    "import os, subprocess, sys, time\n"
    "env = dict(os.environ, PLANNER_LAUNCHER_PID=str(os.getpid()))\n"
    "rank = subprocess.Popen([sys.executable, '-c', sys.argv[1]], env=env, process_group=0)\n"
    "print(rank.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def _gone(pid: int, timeout: float = 20.0) -> bool:
    """Whether ``pid`` has ended (or is a zombie nobody reaped) within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_rank_ends_when_its_launcher_is_killed() -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, _RANK], stdout=subprocess.PIPE, text=True
    )
    rank = None
    try:
        assert launcher.stdout is not None
        rank = int(launcher.stdout.readline())
        assert launcher.stdout.readline().strip() == "ready"
        launcher.kill()
        launcher.wait(timeout=60)
        assert _gone(rank), "the rank outlived its launcher"
    finally:
        launcher.kill()
        if rank is not None and not _gone(rank, timeout=0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank, signal.SIGKILL)


@pytest.mark.slow
def test_a_rank_whose_launcher_is_already_gone_exits_at_once() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _RANK],
        env={**os.environ, "PLANNER_LAUNCHER_PID": "1"},  # not its parent: the launcher died
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "ready" not in done.stdout


def test_rank_0_under_torchrun_holds_the_checkpoint_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from planner.runtime.checkpoint import checkpoint_lock

    make_plan(MLP, cuts=["_3"], replicas=[1, 1]).save(tmp_path / "plan.json")
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PLANNER_LAUNCHER_PID", raising=False)
    argv = [str(tmp_path / "plan.json"), "--trust-model", "--checkpoint-dir", str(tmp_path / "c")]
    with checkpoint_lock(tmp_path / "c"):  # another run holds it
        assert rank_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another run" in err[0], err


# --- the launcher alone, with fake ranks (shell scripts instead of python) ---------------------

_FAKE_RANKS = """#!/bin/sh
# started as: fake-python -P -m planner.runtime PLAN ...; behaves by $RANK
case "$RANK" in
  0) trap '' TERM                      # deaf to SIGTERM: needs the SIGKILL after the grace period
     sleep 600 &                       # a grandchild: ends with the rank's process group
     echo $! > "$FAKE_DIR/grandchild"
     while :; do sleep 0.1; done ;;
  1) while [ ! -s "$FAKE_DIR/grandchild" ]; do sleep 0.05; done
     exit 3 ;;                         # fails first
  *) while :; do sleep 0.1; done ;;   # an ordinary rank: ends at the SIGTERM
esac
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_the_launcher_names_the_first_failure_and_ends_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from planner.runtime.config import RunConfig
    from planner.runtime.launch import GRACE_S, launch_local

    fake = tmp_path / "fake-python"
    fake.write_text(_FAKE_RANKS)
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    result = launch_local(RunConfig(plan_path="plan.json"), world_size=3, python=str(fake))
    err = capsys.readouterr().err
    assert result.first_failure == 1 and result.status == 3, (result, err)
    assert result.returncodes == (-signal.SIGKILL, 3, -signal.SIGTERM), (result, err)
    assert result.describe() == "rank 1 failed first: it exited with status 3"
    assert "rank 1 exited with status 3; stopping the other ranks" in err, err
    assert _gone(int((tmp_path / "grandchild").read_text()), timeout=GRACE_S + 20)


def test_the_launcher_reports_success(tmp_path: Path) -> None:
    from planner.runtime.config import RunConfig
    from planner.runtime.launch import launch_local

    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    result = launch_local(RunConfig(plan_path="plan.json"), world_size=2, python=str(fake))
    assert result.status == 0 and result.first_failure is None and result.returncodes == (0, 0)
