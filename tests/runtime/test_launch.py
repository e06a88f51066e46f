"""``plan run`` on local processes, ``python -m planner.runtime`` under torchrun, bad input, faults."""

from __future__ import annotations

import argparse
import json
import os
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
