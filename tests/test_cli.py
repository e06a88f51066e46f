"""The `plan` command end to end, as a subprocess in a fresh temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner.plan import Plan

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "pipedream-profiles"


def plan_cmd(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "planner.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def planned(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    cwd = tmp_path_factory.mktemp("fresh")
    result = plan_cmd("--model", "resnet50", "--gpus", "8", cwd=cwd)
    return cwd, result


def test_plan_resnet50_on_8_gpus_writes_a_valid_plan(planned):
    cwd, result = planned
    assert result.returncode == 0, result.stderr
    assert "using the shipped profile" in result.stderr
    written = cwd / "plan-resnet50-8gpus.json"
    assert f"wrote {written.name}" in result.stdout
    plan = Plan.load(written)
    assert plan.topology.num_devices == 8
    assert sum(stage.replicas for stage in plan.stages) <= 8
    assert "bottleneck" in result.stdout and "samples/s" in result.stdout


def test_show_prints_the_same_table(planned):
    cwd, result = planned
    shown = plan_cmd("show", "plan-resnet50-8gpus.json", cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() in result.stdout


def test_json_output_parses_and_is_alone_on_stdout(tmp_path):
    result = plan_cmd("--model", "resnet50", "--gpus", "4", "--json", "-o", "p.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["format"] == "planner.plan/1"
    assert Plan.from_dict(doc) == Plan.load(tmp_path / "p.json")


def test_export_formats(planned):
    cwd, _ = planned
    for fmt in ("torch-pipelining", "deepspeed", "pipedream"):
        out = cwd / f"export-{fmt}.txt"
        result = plan_cmd(
            "export", "plan-resnet50-8gpus.json", "--format", fmt, "-o", str(out), cwd=cwd
        )
        if fmt == "deepspeed" and result.returncode == 2:
            assert "not contiguous" in result.stderr  # a DAG-order plan DeepSpeed cannot express
            continue
        assert result.returncode == 0, result.stderr
        assert out.stat().st_size > 0
    conf = json.loads((cwd / "export-pipedream.conf.json").read_text())
    assert set(conf) == {"module_to_stage_map", "stage_to_rank_map"}
    assert "stage_id=0" in (cwd / "export-pipedream.txt").read_text()


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _bad_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    plan_doc = None
    good_plan = tmp / "good-plan.json"
    if good_plan.exists():
        plan_doc = json.loads(good_plan.read_text())
    truncated_profile = _write(
        tmp / "trunc.json", '{"format": "planner.profile/1", "model": "x", "lay'
    )
    old_profile = _write(
        tmp / "old.json",
        json.dumps({"format": "planner.profile/0", "model": "x", "batch_size": 1, "layers": []}),
    )
    graph = _write(
        tmp / "graph.txt", "node1 -- Input -- forward_compute_time=1.0, backward_compute_"
    )
    corrupt_plan = _write(tmp / "corrupt-plan.json", "{not json")
    cases = [
        ("unknown model", ["--model", "resnet5000", "--gpus", "8"]),
        ("zero gpus", ["--model", "resnet50", "--gpus", "0"]),
        ("gpus not a number", ["--model", "resnet50", "--gpus", "eight"]),
        (
            "gpus-per-node not dividing",
            ["--model", "resnet50", "--gpus", "16", "--gpus-per-node", "6"],
        ),
        ("negative bandwidth", ["--model", "resnet50", "--gpus", "8", "--bandwidth", "-5"]),
        ("no devices given", ["--model", "resnet50"]),
        ("no model or profile", ["--gpus", "8"]),
        ("unknown schedule", ["--model", "resnet50", "--gpus", "8", "--schedule", "zigzag"]),
        ("unknown preset", ["--model", "resnet50", "--topology", "dgx-9000"]),
        ("missing profile", ["--profile", str(tmp / "nope.json"), "--gpus", "8"]),
        ("truncated profile", ["--profile", truncated_profile, "--gpus", "8"]),
        ("wrong-version profile", ["--profile", old_profile, "--gpus", "8"]),
        (
            "batch not divisible",
            ["--model", "resnet50", "--gpus", "8", "--batch-size", "30", "--microbatches", "4"],
        ),
        ("infeasible memory", ["--model", "resnet50", "--gpus", "2", "--memory-gb", "0.01"]),
        (
            "bad input shape",
            [
                "profile",
                "--model",
                "resnet50",
                "--batch-size",
                "2",
                "--input-shape",
                "3,0,224",
                "-o",
                "p.json",
            ],
        ),
        (
            "untraceable model",
            [
                "profile",
                "--model",
                "cli_models:untraceable",
                "--batch-size",
                "2",
                "--input-shape",
                "8",
                "-o",
                "p.json",
            ],
        ),
        ("truncated graph.txt", ["import-pipedream", graph, "--batch-size", "8", "-o", "p.json"]),
        ("missing plan", ["show", str(tmp / "nope.json")]),
        ("corrupt plan", ["show", corrupt_plan]),
        ("simulate missing plan", ["simulate", str(tmp / "nope.json")]),
        ("run corrupt plan", ["run", corrupt_plan]),
        ("export unknown format", ["export", corrupt_plan, "--format", "megatron", "-o", "x.json"]),
    ]
    if plan_doc is not None:
        plan_doc["profile"]["sha256"] = "f" * 64
        mismatched = _write(tmp / "mismatch-plan.json", json.dumps(plan_doc))
        cases.append(
            (
                "plan/profile mismatch",
                ["export", mismatched, "--format", "deepspeed", "-o", "x.json"],
            )
        )
    return cases


def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, planned):
    cwd, _ = planned
    (tmp_path / "good-plan.json").write_text((cwd / "plan-resnet50-8gpus.json").read_text())
    cases = _bad_cases(tmp_path)
    assert len(cases) >= 15
    inputs = {p.name for p in tmp_path.iterdir()}
    failures = []
    for label, args in cases:
        result = plan_cmd(*args, cwd=tmp_path, timeout=120)
        # informational lines (e.g. "using the shipped profile ...") may come first; the error
        # itself is the last line, alone
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if ": error: " in line]
        leftovers = {p.name for p in tmp_path.iterdir()} - inputs
        if (
            result.returncode != 2
            or len(errors) != 1
            or not lines
            or lines[-1] != errors[0]
            or "Traceback" in result.stderr
            or leftovers
        ):
            failures.append(
                f"{label}: status {result.returncode}, stderr {result.stderr!r}, "
                f"new files {sorted(leftovers)}"
            )
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.slow
def test_run_then_calibrate_replans_from_the_report(tmp_path):
    made = plan_cmd(
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
        "tiny.json",
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    ran = plan_cmd("run", "tiny.json", "--steps", "3", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "tiny.report.json").is_file()
    again = plan_cmd("--calibrate", "tiny.report.json", "-o", "again.json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "calibrated from tiny.json" in again.stderr
    plan = Plan.load(tmp_path / "again.json")
    assert plan.minibatch_size == 8 and plan.microbatches == 4
    assert "calibrated" in json.loads((tmp_path / "again.profile.json").read_text())["calibration"]
    # the loss: -o onto the run's plan replaced the plan and its measured profile, and
    # calibrating again compounded the scaling; now refused before anything is written
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    onto = plan_cmd("--calibrate", "tiny.report.json", "-o", "tiny.json", cwd=tmp_path)
    assert onto.returncode == 2 and "is the run's plan" in onto.stderr, onto.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == kept
    twice = plan_cmd("--calibrate", "tiny.report.json", "-o", "again.json", cwd=tmp_path)
    assert twice.returncode == 0, twice.stderr
    assert "replaced again.profile.json" in twice.stderr and "replaced again.json" in twice.stdout
    assert json.loads((tmp_path / "again.profile.json").read_text()) == json.loads(
        kept["again.profile.json"]
    )  # the same run calibrates the same raw profile to the same result: nothing compounds


def test_written_and_replaced_files_are_named(tmp_path, monkeypatch, capsys):
    """In process: the first plan says "wrote", the second "replaced"; --json says it on stderr."""
    from planner.cli import main
    from planner.profile.format import LayerProfile, Profile

    monkeypatch.chdir(tmp_path)
    layers = tuple(
        LayerProfile(
            name=f"l{i}",
            op="Linear",
            forward_ms=1.0,
            backward_ms=2.0,
            output_bytes=(4096,),
            parameter_bytes=4096,
            inputs=(i - 1,) if i else (),
        )
        for i in range(4)
    )
    Profile(model="mlp", batch_size=32, layers=layers).save(tmp_path / "m.json")
    profile = "m.json"
    assert main(["--profile", profile, "--gpus", "2", "-o", "p.json"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("wrote p.json")
    assert main(["--profile", profile, "--gpus", "2", "-o", "p.json"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("replaced p.json")
    assert main(["--profile", profile, "--gpus", "2", "-o", "p.json", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["format"] == "planner.plan/1"
    assert err.strip() == "replaced p.json"
    assert main(["export-pipedream", profile, "-o", "g.txt"]) == 0
    assert capsys.readouterr().out.strip().endswith("wrote g.txt")
    assert main(["import-pipedream", "g.txt", "--batch-size", "32", "-o", "g.json"]) == 0
    assert capsys.readouterr().out.strip().endswith("wrote g.json")
    assert main(["import-pipedream", "g.txt", "--batch-size", "32", "-o", "g.json"]) == 0
    assert capsys.readouterr().out.strip().endswith("replaced g.json")
    assert main(["simulate", "p.json", "--csv", "e.csv"]) == 0
    assert "wrote e.csv (" in capsys.readouterr().out
    assert main(["export", "p.json", "--format", "pipedream", "-o", "x.txt"]) == 0
    assert main(["export", "p.json", "--format", "pipedream", "-o", "x.txt"]) == 0
    assert capsys.readouterr().out.strip().endswith("replaced x.txt, x.conf.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "e.csv",
        "g.json",
        "g.txt",
        "m.json",
        "p.json",
        "x.conf.json",
        "x.txt",
    ]  # no temporary or probe file left


def test_a_machine_with_a_gpu_profiles_it_instead_of_using_the_cpu_profile(
    tmp_path, monkeypatch, capsys
):
    """Issue 13: on a CUDA machine the main job measures the local GPU (CUDA mocked here)."""
    import torch

    from planner.cli import main
    from planner.commands import plan as plan_command
    from planner.commands import profile as profile_command

    monkeypatch.setattr(profile_command, "_nvidia_device_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen: list[str] = []

    class Measured(Exception):
        pass

    def fake_measure(args, batch, **kwargs):
        seen.append(profile_command.resolve_device(args.device))
        raise Measured

    monkeypatch.setattr(plan_command, "measure", fake_measure)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Measured):
        main(["--model", "resnet50", "--gpus", "2", "-o", "p.json"])
    assert seen == ["cuda"]
    assert "profiling on cuda" in capsys.readouterr().err
    # an explicit --device cpu keeps the shipped CPU profile, and without a GPU that is the default
    assert main(["--model", "resnet50", "--gpus", "2", "--device", "cpu", "-o", "a.json"]) == 0
    monkeypatch.setattr(profile_command, "_nvidia_device_present", lambda: False)
    assert main(["--model", "resnet50", "--gpus", "2", "-o", "b.json"]) == 0
    assert seen == ["cuda"]


def test_plan_profiles_at_the_microbatch_the_options_fix(tmp_path, monkeypatch):
    """--batch-size 16 --microbatches 4: profiled at 4, the size a rank runs (no extrapolation)."""
    from planner.cli import main
    from planner.commands import plan as plan_command

    batches: list[int] = []

    class Measured(Exception):
        pass

    def fake_measure(args, batch, **kwargs):
        batches.append(batch)
        raise Measured

    monkeypatch.setattr(plan_command, "measure", fake_measure)
    monkeypatch.chdir(tmp_path)
    for extra, expected in (
        (["--batch-size", "16", "--microbatches", "4"], 4),
        (["--batch-size", "16", "--microbatches", "4", "--profile-batch-size", "2"], 2),
        (["--batch-size", "16"], 1),  # not fixed: the model's default (1 sequence for the GPTs)
    ):
        with pytest.raises(Measured):
            main(["--model", "gpt2-tiny", "--gpus", "2", "--device", "cpu", "-o", "p.json", *extra])
        assert batches[-1] == expected
