"""Bad input to every command: exit status 2, one line on stderr, no traceback, nothing written.

Every case runs in a copy of one small, valid folder (a profile, its plan, a topology file,
PipeDream's graph.txt of the profile and a run report of the plan), changes one thing, and checks
that the command refuses it with one line naming the problem and that every file in the folder is
byte-identical afterwards, with no file added or removed. The commands run in process through
``planner.cli.main``; a few run as real subprocesses to prove the exit status. ``plan run`` cases
stop at its checks: a rank starting would fail the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from planner.cli import main
from planner.planning import PlanOptions, make_plan
from planner.profile.format import LayerProfile, Profile
from planner.profile.pipedream import graph_txt
from planner.runtime.report import (
    Comparison,
    RankStats,
    RunReport,
    StageComparison,
    StageStats,
    StepStats,
)
from planner.topology import Topology

REPO = Path(__file__).resolve().parents[1]
PROFILE, PLAN, TOPOLOGY, GRAPH, REPORT = (
    "tiny.profile.json",
    "tiny.json",
    "topo.json",
    "graph.txt",
    "tiny.report.json",
)
NON_FINITE = r"is (NaN|-?Infinity|-?1e999|\d+…?); every number must be finite"
UNWRITABLE = "/proc/planner-bad-input"  # no process, root included, can create files in /proc


# --- the valid folder every case starts from -------------------------------------------------


def _profile() -> Profile:
    layers = tuple(
        LayerProfile(
            name=f"layer{i}",
            op=f"Linear({64}, {64})",
            forward_ms=1.0 + i,
            backward_ms=2.0 + i,
            output_bytes=(1024,),
            parameter_bytes=16640,
            inputs=(i - 1,) if i else (),
            saved_bytes=2048,
            buffer_bytes=8,
            target=f"layer{i}",
            forward_samples_ms=(1.0 + i, 1.1 + i),
            backward_samples_ms=(2.0 + i, 2.1 + i),
        )
        for i in range(4)
    )
    return Profile(
        model="tiny-mlp",
        batch_size=4,
        layers=layers,
        input_shape=(64,),
        threads=1,
        warmup=1,
        reps=2,
        whole_step_ms=22.0,
        timer="wall",
    )


def _report(plan: Any) -> RunReport:
    ranks = tuple(
        RankStats(
            rank=r,
            stage=s,
            replica=0,
            microbatches_per_step=plan.microbatches,
            samples_per_step=plan.minibatch_size,
            steps=2,
            wall_s=1.0,
            compute_s=0.5,
            wait_s=0.2,
            send_s=0.1,
            sync_s=0.0,
            update_s=0.1,
            bytes_sent=100,
            bytes_received=100,
        )
        for s, stage in enumerate(plan.stages)
        for r in stage.ranks
    )
    return RunReport(
        plan=PLAN,
        model=plan.profile.model,
        schedule=str(plan.schedule),
        world_size=len(ranks),
        minibatch_size=plan.minibatch_size,
        microbatches=plan.microbatches,
        steps=3,
        measured_steps=2,
        samples_per_s=16.0,
        losses=(3.0, 2.5, 2.0),
        step_stats=tuple(
            StepStats(step=i, loss=x, wall_s=0.5, samples_per_s=16.0)
            for i, x in enumerate((3.0, 2.5, 2.0))
        ),
        ranks=ranks,
        stages=tuple(
            StageStats.of(s, [r for r in ranks if r.stage == s]) for s in range(len(plan.stages))
        ),
        backend="gloo",
        threads=1,
        torch_version="2",
        comparison=Comparison(
            stages=tuple(
                StageComparison(
                    stage=s,
                    predicted_compute_ms=200.0,
                    measured_compute_ms=250.0,
                    predicted_comm_ms=1.0,
                    measured_comm_ms=5.0,
                    predicted_idle=0.1,
                    measured_idle=0.3,
                )
                for s in range(len(plan.stages))
            ),
            predicted_samples_per_s=20.0,
            measured_samples_per_s=16.0,
        ),
    )


def _build_golden() -> dict[str, bytes]:
    profile = _profile()
    topology = Topology.from_args(gpus=2)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / PROFILE
        profile.save(path)
        plan = make_plan(profile, path, topology, PlanOptions(straight=True, microbatches=2))
        plan = dataclasses.replace(plan, profile=dataclasses.replace(plan.profile, path=PROFILE))
        files = {
            PROFILE: path.read_bytes(),
            PLAN: (plan.to_json() + "\n").encode(),
            TOPOLOGY: (json.dumps(topology.to_dict(), indent=1) + "\n").encode(),
            GRAPH: graph_txt(profile).encode(),
            REPORT: (json.dumps(_report(plan).to_dict(), indent=1) + "\n").encode(),
        }
    return files


GOLDEN = _build_golden()


def _doc(name: str) -> Any:
    return json.loads(GOLDEN[name])


def _numeric_paths(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple]:
    """Every numeric leaf of a JSON document, as a key path."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numeric_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numeric_paths(v, (*path, i))


def _with(doc: Any, path: tuple, raw: str) -> str:
    """``doc`` as JSON text with the value at ``path`` replaced by the raw text ``raw``."""
    doc = json.loads(json.dumps(doc))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "@@RAW@@"
    return json.dumps(doc, indent=1).replace('"@@RAW@@"', raw)


# --- setup helpers: each changes the copied folder -------------------------------------------

Setup = Callable[[Path], None]


def write(name: str, text: str | bytes) -> Setup:
    def setup(folder: Path) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def raw_value(source: str, name: str, path: tuple, raw: str) -> Setup:
    return write(name, _with(_doc(source), path, raw))


def fifo(name: str) -> Setup:
    return lambda folder: os.mkfifo(folder / name)


def folder_(name: str) -> Setup:
    return lambda folder: (folder / name).mkdir(parents=True)


def symlink(name: str, target: str) -> Setup:
    return lambda folder: (folder / name).symlink_to(target)


def hardlink(name: str, target: str) -> Setup:
    return lambda folder: os.link(folder / target, folder / name)


def copy(name: str, source: str) -> Setup:
    return lambda folder: shutil.copyfile(folder / source, folder / name)


def chain(*setups: Setup) -> Setup:
    def setup(folder: Path) -> None:
        for s in setups:
            s(folder)

    return setup


def replaced_profile(**changes: Any) -> Setup:
    """The profile changed and the plan's recorded sha256 updated to match: a consistent pair."""

    def setup(folder: Path) -> None:
        doc = {**_doc(PROFILE), **changes}
        text = json.dumps(doc, indent=1) + "\n"
        (folder / PROFILE).write_text(text)
        plan = _doc(PLAN)
        plan["profile"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
        (folder / PLAN).write_text(json.dumps(plan, indent=1) + "\n")

    return setup


# --- the cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: str  # a regular expression the one stderr line must match
    setup: Setup | None = None


def case(id: str, argv: str, expect: str, setup: Setup | None = None) -> Case:
    return Case(id, tuple(argv.split()), expect, setup)


PLAN_CMD = f"--profile {PROFILE} --gpus 2"
SAME = "would destroy the input"
IS_FOLDER = "is a folder"
FILE_PARENT = "is a file, not a folder"
CANNOT_WRITE = "cannot write in the folder"
NOT_REGULAR = "not a regular file"

CASES: list[Case] = [
    # plan: outputs that are inputs, directly, through links and derived names
    case("plan-o-profile", f"{PLAN_CMD} -o {PROFILE}", f"-o {PROFILE} is the profile.*{SAME}"),
    case(
        "plan-schedule-zbv-recompute",
        f"{PLAN_CMD} --schedule zbv --recompute",
        "does not recompute activations",
    ),
    case(
        "plan-schedule-interleaved-ilp",
        f"{PLAN_CMD} --schedule interleaved-1f1b --solver ilp",
        "--solver ilp plans pipedream, 1f1b and gpipe",
    ),
    case(
        "plan-schedule-zb-h1-microbatches-torch-refuses",
        f"--profile {PROFILE} --gpus 3 --schedule zb-h1 --batch-size 28 --microbatches 7",
        r"no shape of zb-h1 can run.*multiple of its 2 rounds.*use 6 or 8 microbatches",
    ),
    case(
        "plan-schedule-zbv-one-device",
        f"--profile {PROFILE} --gpus 1 --schedule zbv",
        r"zbv need at least 2 ranks and as many layers as stages.*4 layers on 1 device",
    ),
    case(
        "plan-schedule-auto-pipedream-model",
        f"{PLAN_CMD} --schedule auto --cost-model pipedream",
        "has no auto schedule",
    ),
    case("plan-o-dot-profile", f"{PLAN_CMD} -o ./{PROFILE}", SAME),
    case("plan-o-symlink", f"{PLAN_CMD} -o link.json", SAME, symlink("link.json", PROFILE)),
    case("plan-o-hardlink", f"{PLAN_CMD} -o hard.json", SAME, hardlink("hard.json", PROFILE)),
    case("plan-o-topology", f"{PLAN_CMD} --topology {TOPOLOGY} -o {TOPOLOGY}", "topology file"),
    case("plan-png-profile", f"{PLAN_CMD} -o x.json --png {PROFILE}", f"--png.*{SAME}"),
    case("plan-png-is-o", f"{PLAN_CMD} -o x.json --png x.json", "is also -o"),
    case(
        "plan-shipped-profile-via-link",
        "--model resnet50 --gpus 2 -o shipped.json",
        SAME,
        symlink("shipped.json", str(REPO / "profiles" / "resnet50.json")),
    ),
    case(
        "plan-profiles-derived-is-topology",
        "--model gpt2-tiny --gpus 2 --topology x.profile.json -o x.json",
        r"-o \(the profile written beside it\) x.profile.json is the topology file",
        copy("x.profile.json", TOPOLOGY),
    ),
    # plan: outputs that cannot be written
    case("plan-o-folder", f"{PLAN_CMD} -o sub", IS_FOLDER, folder_("sub")),
    case("plan-o-dot", f"{PLAN_CMD} -o .", "not a file name"),
    case("plan-o-empty", f"{PLAN_CMD} -o=", "not a file name"),
    case("plan-o-under-file", f"{PLAN_CMD} -o {PLAN}/x.json", FILE_PARENT),
    case("plan-o-deep-under-file", f"{PLAN_CMD} -o {PLAN}/a/b/x.json", FILE_PARENT),
    case("plan-o-unwritable", f"{PLAN_CMD} -o {UNWRITABLE}/x.json", CANNOT_WRITE),
    case("plan-o-device", f"{PLAN_CMD} -o /dev/null", NOT_REGULAR),
    case("plan-o-fifo", f"{PLAN_CMD} -o ff", NOT_REGULAR, fifo("ff")),
    case("plan-png-unwritable", f"{PLAN_CMD} -o x.json --png {UNWRITABLE}/g.png", CANNOT_WRITE),
    case("plan-png-folder", f"{PLAN_CMD} -o x.json --png sub", IS_FOLDER, folder_("sub")),
    case(
        "plan-model-o-under-file",
        f"--model gpt2-tiny --gpus 2 -o {PLAN}/x.json",
        FILE_PARENT,
    ),
    case(
        "plan-model-o-unwritable",
        f"--model gpt2-tiny --gpus 2 -o {UNWRITABLE}/x.json",
        CANNOT_WRITE,
    ),
    case(
        "plan-model-derived-profile-folder",
        "--model gpt2-tiny --gpus 2 -o x.json",
        "x.profile.json is a folder",
        folder_("x.profile.json"),
    ),
    # plan: inputs
    case("plan-profile-dev-zero", "--profile /dev/zero --gpus 2 -o x.json", NOT_REGULAR),
    case("plan-profile-fifo", "--profile ff --gpus 2 -o x.json", NOT_REGULAR, fifo("ff")),
    case("plan-profile-folder", "--profile sub --gpus 2 -o x.json", IS_FOLDER, folder_("sub")),
    case("plan-profile-missing", "--profile nope.json --gpus 2 -o x.json", "does not exist"),
    case(
        "plan-profile-empty",
        "--profile e.json --gpus 2 -o x.json",
        "not valid JSON",
        write("e.json", ""),
    ),
    case(
        "plan-profile-truncated",
        "--profile t.json --gpus 2 -o x.json",
        "not valid JSON",
        write("t.json", GOLDEN[PROFILE][:-40]),
    ),
    case(
        "plan-profile-binary",
        "--profile b.json --gpus 2 -o x.json",
        "not UTF-8",
        write("b.json", b"\x89PNG\r\n\x1a\n\xff\xfe"),
    ),
    case(
        "plan-profile-is-a-plan",
        f"--profile {PLAN} --gpus 2 -o x.json",
        "has format 'planner.plan/1', expected 'planner.profile/1'",
    ),
    case(
        "plan-profile-batch-0",
        "--profile b.json --gpus 2 -o x.json",
        "invalid at batch_size",
        raw_value(PROFILE, "b.json", ("batch_size",), "0"),
    ),
    case(
        "plan-profile-negative-time",
        "--profile b.json --gpus 2 -o x.json",
        "invalid at layers/1/forward_ms",
        raw_value(PROFILE, "b.json", ("layers", 1, "forward_ms"), "-1.5"),
    ),
    case(
        "plan-profile-string-time",
        "--profile b.json --gpus 2 -o x.json",
        "invalid at layers/0/backward_ms",
        raw_value(PROFILE, "b.json", ("layers", 0, "backward_ms"), '"fast"'),
    ),
    case(
        "plan-profile-later-input",
        "--profile b.json --gpus 2 -o x.json",
        "topological order",
        raw_value(PROFILE, "b.json", ("layers", 1, "inputs"), "[3]"),
    ),
    case(
        "plan-profile-huge-int",
        "--profile b.json --gpus 2 -o x.json",
        "cannot be read|finite",
        raw_value(PROFILE, "b.json", ("layers", 0, "parameter_bytes"), "9" * 5000),
    ),
    case("plan-topology-dev-zero", f"{PLAN_CMD} --topology /dev/zero -o x.json", NOT_REGULAR),
    case(
        "plan-topology-fifo",
        f"{PLAN_CMD} --topology ff.json -o x.json",
        NOT_REGULAR,
        fifo("ff.json"),
    ),
    case(
        "plan-topology-folder",
        f"{PLAN_CMD} --topology d.json -o x.json",
        IS_FOLDER,
        folder_("d.json"),
    ),
    case(
        "plan-topology-bool-devices",
        f"{PLAN_CMD} --topology b.json -o x.json",
        "levels/0/devices must be a whole number",
        raw_value(TOPOLOGY, "b.json", ("levels", 0, "devices"), "true"),
    ),
    case(
        "plan-topology-zero-memory",
        f"{PLAN_CMD} --topology b.json -o x.json",
        "memory_bytes must be positive",
        raw_value(TOPOLOGY, "b.json", ("memory_bytes",), "0"),
    ),
    case("plan-gpus-0", f"--profile {PROFILE} --gpus 0 -o x.json", "must be at least 1"),
    case("plan-gpus-nan", f"--profile {PROFILE} --gpus nan -o x.json", "not a whole number"),
    case("plan-memory-nan", f"{PLAN_CMD} --memory-gb nan -o x.json", "must be a positive number"),
    case("plan-memory-inf", f"{PLAN_CMD} --memory-gb inf -o x.json", "must be a positive number"),
    case("plan-bandwidth-nan", f"{PLAN_CMD} --bandwidth nan -o x.json", "bandwidth"),
    case("plan-bandwidth-inf", f"{PLAN_CMD} --bandwidth inf -o x.json", "bandwidth"),
    case(
        "plan-inter-node-bandwidth-nan",
        f"--profile {PROFILE} --gpus 4 --gpus-per-node 2 --inter-node-bandwidth nan -o x.json",
        "bandwidth",
    ),
    case("plan-time-limit-nan", f"{PLAN_CMD} --time-limit nan -o x.json", "positive number"),
    case("plan-batch-size-0", f"{PLAN_CMD} --batch-size 0 -o x.json", "at least 1"),
    case("plan-microbatches-x", f"{PLAN_CMD} --microbatches x -o x.json", "not a whole number"),
    # plan --calibrate
    case("calibrate-o-run-plan", f"--calibrate {REPORT} -o {PLAN}", f"-o {PLAN} is the run's plan"),
    case(
        "calibrate-o-run-profile",
        f"--calibrate {REPORT} -o {PROFILE}",
        f"-o {PROFILE} is the run's profile",
    ),
    case(
        "calibrate-derived-is-run-profile",
        f"--calibrate {REPORT} -o tiny",
        r"-o \(the profile written beside it\) tiny.profile.json is the run's profile",
    ),
    case("calibrate-o-report", f"--calibrate {REPORT} -o {REPORT}", "is the report"),
    case(
        "calibrate-png-plan",
        f"--calibrate {REPORT} -o x.json --png {PLAN}",
        "--png tiny.json is the run's plan",
    ),
    case("calibrate-o-unwritable", f"--calibrate {REPORT} -o {UNWRITABLE}/x.json", CANNOT_WRITE),
    case("calibrate-o-under-file", f"--calibrate {REPORT} -o {REPORT}/x.json", FILE_PARENT),
    case(
        "calibrate-plan-replaced",
        f"--calibrate {REPORT} -o x.json",
        "the plan was replaced after the run",
        raw_value(PLAN, PLAN, ("schedule",), '"gpipe"'),
    ),
    case(
        "calibrate-twice-from-one-run",
        f"--calibrate {REPORT} -o x.json",
        "already calibrated from this run",
        replaced_profile(calibration=f"calibrated from {PLAN}: compute 1.25x the profile"),
    ),
    case("calibrate-report-dev-zero", "--calibrate /dev/zero -o x.json", NOT_REGULAR),
    case("calibrate-report-fifo", "--calibrate ff -o x.json", NOT_REGULAR, fifo("ff")),
    case("calibrate-report-folder", "--calibrate d -o x.json", IS_FOLDER, folder_("d")),
    case("calibrate-report-missing", "--calibrate nope.report.json -o x.json", "does not exist"),
    case("calibrate-report-is-plan", f"--calibrate {PLAN} -o x.json", "is not a runtime report"),
    case(
        "calibrate-report-zero-rate",
        "--calibrate r.json -o x.json",
        "invalid at samples_per_s",
        raw_value(REPORT, "r.json", ("samples_per_s",), "0"),
    ),
    case(
        "calibrate-report-string-rank",
        "--calibrate r.json -o x.json",
        "invalid at ranks/0/compute_s",
        raw_value(REPORT, "r.json", ("ranks", 0, "compute_s"), '"slow"'),
    ),
    case(
        "calibrate-report-missing-field",
        "--calibrate r.json -o x.json",
        "invalid at \\(top level\\).*'steps' is a required property",
        write("r.json", json.dumps({k: v for k, v in _doc(REPORT).items() if k != "steps"})),
    ),
    case(
        "calibrate-report-plan-missing",
        "--calibrate r.json -o x.json",
        "does not exist",
        raw_value(REPORT, "r.json", ("plan",), '"gone.json"'),
    ),
    # plan profile
    case(
        "profile-o-folder",
        "profile --model gpt2-tiny --batch-size 2 -o sub",
        IS_FOLDER,
        folder_("sub"),
    ),
    case(
        "profile-o-under-file",
        f"profile --model gpt2-tiny --batch-size 2 -o {PLAN}/p.json",
        FILE_PARENT,
    ),
    case(
        "profile-o-unwritable",
        f"profile --model gpt2-tiny --batch-size 2 -o {UNWRITABLE}/p.json",
        CANNOT_WRITE,
    ),
    case("profile-o-device", "profile --model gpt2-tiny --batch-size 2 -o /dev/null", NOT_REGULAR),
    case("profile-o-dot", "profile --model gpt2-tiny --batch-size 2 -o .", "not a file name"),
    case("profile-batch-0", "profile --model gpt2-tiny --batch-size 0 -o p.json", "at least 1"),
    case(
        "profile-bad-shape",
        "profile --model gpt2-tiny --batch-size 2 --input-shape 3,x -o p.json",
        "not a shape",
    ),
    # plan import-pipedream
    case("import-o-graph", f"import-pipedream {GRAPH} -o {GRAPH}", f"is the graph.txt.*{SAME}"),
    case(
        "import-o-link-to-graph",
        f"import-pipedream {GRAPH} -o l.json",
        SAME,
        symlink("l.json", GRAPH),
    ),
    case("import-o-folder", f"import-pipedream {GRAPH} -o sub", IS_FOLDER, folder_("sub")),
    case("import-o-under-file", f"import-pipedream {GRAPH} -o {GRAPH}/p.json", FILE_PARENT),
    case("import-o-unwritable", f"import-pipedream {GRAPH} -o {UNWRITABLE}/p.json", CANNOT_WRITE),
    case("import-dev-zero", "import-pipedream /dev/zero -o p.json", NOT_REGULAR),
    case("import-fifo", "import-pipedream ff -o p.json", NOT_REGULAR, fifo("ff")),
    case("import-folder", "import-pipedream d -o p.json", IS_FOLDER, folder_("d")),
    case("import-missing", "import-pipedream nope.txt -o p.json", "does not exist"),
    case(
        "import-nan-time",
        "import-pipedream g.txt --batch-size 4 -o p.json",
        "forward_ms|finite|nan",
        write(
            "g.txt",
            GOLDEN[GRAPH]
            .decode()
            .replace("forward_compute_time=1.000", "forward_compute_time=nan", 1),
        ),
    ),
    case(
        "import-garbage",
        "import-pipedream g.txt --batch-size 4 -o p.json",
        "g.txt",
        write("g.txt", "this is not a graph\n"),
    ),
    case("import-batch-0", f"import-pipedream {GRAPH} --batch-size 0 -o p.json", "at least 1"),
    # plan export-pipedream
    case("export-pd-o-profile", f"export-pipedream {PROFILE} -o {PROFILE}", SAME),
    case(
        "export-pd-o-hardlink",
        f"export-pipedream {PROFILE} -o h.txt",
        SAME,
        hardlink("h.txt", PROFILE),
    ),
    case("export-pd-o-folder", f"export-pipedream {PROFILE} -o sub", IS_FOLDER, folder_("sub")),
    case("export-pd-o-under-file", f"export-pipedream {PROFILE} -o {PLAN}/g.txt", FILE_PARENT),
    case(
        "export-pd-o-unwritable", f"export-pipedream {PROFILE} -o {UNWRITABLE}/g.txt", CANNOT_WRITE
    ),
    case("export-pd-dev-zero", "export-pipedream /dev/zero -o g.txt", NOT_REGULAR),
    case("export-pd-fifo", "export-pipedream ff -o g.txt", NOT_REGULAR, fifo("ff")),
    case("export-pd-folder", "export-pipedream d -o g.txt", IS_FOLDER, folder_("d")),
    case(
        "export-pd-plan-given", f"export-pipedream {PLAN} -o g.txt", "expected 'planner.profile/1'"
    ),
    # plan show
    case("show-dev-zero", "show /dev/zero", NOT_REGULAR),
    case("show-fifo", "show ff", NOT_REGULAR, fifo("ff")),
    case("show-folder", "show d", IS_FOLDER, folder_("d")),
    case("show-missing", "show nope.json", "does not exist"),
    case("show-empty", "show e.json", "not valid JSON", write("e.json", "")),
    case("show-truncated", "show t.json", "not valid JSON", write("t.json", GOLDEN[PLAN][:-30])),
    case("show-profile-given", f"show {PROFILE}", "expected 'planner.plan/1'"),
    case("show-list", "show l.json", "invalid at \\(top level\\)", write("l.json", "[1, 2]")),
    case(
        "show-minibatch-s-0",
        "show p.json",
        "invalid at predicted/minibatch_s",
        raw_value(PLAN, "p.json", ("predicted", "minibatch_s"), "0"),
    ),
    case(
        "show-samples-per-s-0",
        "show p.json",
        "invalid at predicted/samples_per_s",
        raw_value(PLAN, "p.json", ("predicted", "samples_per_s"), "0"),
    ),
    case(
        "show-rank-outside",
        "show p.json",
        "outside the topology",
        raw_value(PLAN, "p.json", ("stages", 0, "ranks"), "[7]"),
    ),
    case(
        "show-nested",
        "show n.json",
        "nested too deeply|not valid JSON",
        write("n.json", "[" * 50_000),
    ),
    # plan export
    *(
        case(f"export-{fmt}-o-{what}", f"export {PLAN} --format {fmt} -o {target}", SAME)
        for fmt in ("torch-pipelining", "deepspeed", "pipedream")
        for what, target in (("plan", PLAN), ("profile", PROFILE))
    ),
    case(
        "export-companion-is-plan",
        "export q.conf.json --format pipedream -o q.txt",
        r"-o \(its companion\) q.conf.json is the plan",
        copy("q.conf.json", PLAN),
    ),
    case("export-o-folder", f"export {PLAN} --format pipedream -o sub", IS_FOLDER, folder_("sub")),
    case("export-o-under-file", f"export {PLAN} --format pipedream -o {PLAN}/x.txt", FILE_PARENT),
    case(
        "export-o-unwritable",
        f"export {PLAN} --format pipedream -o {UNWRITABLE}/x.txt",
        CANNOT_WRITE,
    ),
    case("export-dev-zero", "export /dev/zero --format pipedream -o x.txt", NOT_REGULAR),
    case("export-fifo", "export ff --format pipedream -o x.txt", NOT_REGULAR, fifo("ff")),
    case(
        "export-profile-fifo",
        f"export {PLAN} --profile ff --format pipedream -o x.txt",
        NOT_REGULAR,
        fifo("ff"),
    ),
    case(
        "export-profile-folder",
        f"export {PLAN} --profile d --format pipedream -o x.txt",
        IS_FOLDER,
        folder_("d"),
    ),
    case("export-bad-format", f"export {PLAN} --format onnx -o x.txt", "invalid choice"),
    # plan simulate
    case("simulate-csv-plan", f"simulate {PLAN} --csv {PLAN}", f"--csv {PLAN} is the plan"),
    case("simulate-csv-profile", f"simulate {PLAN} --csv {PROFILE}", "is the plan's profile"),
    case("simulate-png-plan", f"simulate {PLAN} --png {PLAN}", "--png tiny.json is the plan"),
    case(
        "simulate-png-side-file-is-profile",
        f"simulate {PLAN} --profile g.memory.png --png g.png",
        r"--png \(memory chart\) g.memory.png is the plan's profile",
        copy("g.memory.png", PROFILE),
    ),
    case("simulate-png-is-csv", f"simulate {PLAN} --png x.png --csv x.png", "is also --png"),
    case(
        "simulate-csv-is-side-file",
        f"simulate {PLAN} --png x.png --csv x.partition.png",
        r"is also --png \(partition chart\)",
    ),
    case("simulate-csv-folder", f"simulate {PLAN} --csv sub", IS_FOLDER, folder_("sub")),
    case("simulate-png-under-file", f"simulate {PLAN} --png {PLAN}/g.png", FILE_PARENT),
    case("simulate-csv-unwritable", f"simulate {PLAN} --csv {UNWRITABLE}/e.csv", CANNOT_WRITE),
    case("simulate-png-unwritable", f"simulate {PLAN} --png {UNWRITABLE}/g.png", CANNOT_WRITE),
    case("simulate-minibatches-0", f"simulate {PLAN} --minibatches 0", "at least 1"),
    case("simulate-dev-zero", "simulate /dev/zero", NOT_REGULAR),
    case("simulate-fifo", "simulate ff", NOT_REGULAR, fifo("ff")),
    case("simulate-folder", "simulate d", IS_FOLDER, folder_("d")),
    case("simulate-profile-dev-zero", f"simulate {PLAN} --profile /dev/zero", NOT_REGULAR),
    case("simulate-profile-folder", f"simulate {PLAN} --profile d", IS_FOLDER, folder_("d")),
    case(
        "simulate-profile-other",
        f"simulate {PLAN} --profile o.json",
        "differs from the plan's",
        raw_value(PROFILE, "o.json", ("layers", 0, "forward_ms"), "1.5"),
    ),
    case(
        "simulate-profile-lost",
        "simulate p.json",
        "cannot find the plan's profile",
        raw_value(PLAN, "p.json", ("profile", "path"), '"gone.json"'),
    ),
    case(
        "simulate-layer-name-with-escapes",
        "simulate p.json",
        r"plan names layers the profile lacks \(evil\?\[2J\?name",
        write(
            "p.json",
            GOLDEN[PLAN].decode().replace('"layer0"', json.dumps("evil\x1b[2J\nname"), 1),
        ),
    ),
    # plan run: the checks before any rank starts
    case("run-report-plan", f"run {PLAN} --report {PLAN}", f"--report {PLAN} is the plan"),
    case("run-report-profile", f"run {PLAN} --report {PROFILE}", "is the plan's profile"),
    case("run-report-folder", f"run {PLAN} --report sub", IS_FOLDER, folder_("sub")),
    case("run-report-under-file", f"run {PLAN} --report {PLAN}/r.json", FILE_PARENT),
    case("run-report-unwritable", f"run {PLAN} --report {UNWRITABLE}/r.json", CANNOT_WRITE),
    case("run-report-device", f"run {PLAN} --report /dev/null", NOT_REGULAR),
    case(
        "run-default-report-folder",
        f"run {PLAN}",
        r"the report \(beside the plan; or --report\) tiny.report.json is a folder",
        chain(lambda f: (f / REPORT).unlink(), folder_(REPORT)),
    ),
    case(
        "run-checkpoint-dir-file",
        f"run {PLAN} --checkpoint-dir {PROFILE} --checkpoint-every 1",
        "--checkpoint-dir tiny.profile.json is the plan's profile",
    ),
    case(
        "run-checkpoint-dir-a-file",
        f"run {PLAN} --checkpoint-dir {GRAPH} --checkpoint-every 1",
        f"--checkpoint-dir {GRAPH} is a file, not a folder",
    ),
    case(
        "run-checkpoint-dir-under-file",
        f"run {PLAN} --checkpoint-dir {GRAPH}/ck --checkpoint-every 1",
        FILE_PARENT,
    ),
    case(
        "run-checkpoint-dir-unwritable",
        f"run {PLAN} --checkpoint-dir {UNWRITABLE}/ck --checkpoint-every 1",
        CANNOT_WRITE,
    ),
    case("run-dev-zero", "run /dev/zero", NOT_REGULAR),
    case("run-fifo", "run ff", NOT_REGULAR, fifo("ff")),
    case("run-folder", "run d", IS_FOLDER, folder_("d")),
    case("run-missing", "run nope.json", "does not exist"),
    case("run-steps-0", f"run {PLAN} --steps 0", "--steps must be at least 1"),
    case("run-lr-nan", f"run {PLAN} --lr nan", "--lr must be positive"),
    case("run-lr-inf", f"run {PLAN} --lr inf", "--lr must be positive"),
    case("run-momentum-nan", f"run {PLAN} --momentum nan", "--momentum must be in"),
    case("run-timeout-inf", f"run {PLAN} --timeout inf", "--timeout must be positive"),
    case("run-resume-without-dir", f"run {PLAN} --resume", "need --checkpoint-dir"),
    case(
        "run-engine-torch-pipedream",
        f"run {PLAN} --engine torch",
        "torch.distributed.pipelining has no pipedream schedule",
        raw_value(PLAN, PLAN, ("schedule",), '"pipedream"'),
    ),
    case(
        "run-minibatch-s-0",
        "run p.json",
        "invalid at predicted/minibatch_s",
        raw_value(PLAN, "p.json", ("predicted", "minibatch_s"), "0"),
    ),
]

# Non-finite values in every numeric field of every file format, each through a command that
# reads it: NaN everywhere, and the other spellings (Infinity, -Infinity, an overflowing literal)
# in the fields people edit by hand.
_READERS = {
    PROFILE: lambda f: f"--profile {f} --gpus 2 -o x.json",
    PLAN: lambda f: f"show {f}",
    TOPOLOGY: lambda f: f"{PLAN_CMD} --topology {f} -o x.json",
    REPORT: lambda f: f"--calibrate {f} -o x.json",
}
for _source, _reader in _READERS.items():
    for _path in _numeric_paths(_doc(_source)):
        _name = "/".join(map(str, _path))
        _file = "bad." + _source
        CASES.append(
            case(
                f"nan-{_source}-{_name}",
                _reader(_file),
                NON_FINITE,
                raw_value(_source, _file, _path, "NaN"),
            )
        )
for _source, _path in [
    (PROFILE, ("layers", 0, "forward_ms")),
    (PROFILE, ("layers", 2, "backward_ms")),
    (PROFILE, ("whole_step_ms",)),
    (PLAN, ("predicted", "minibatch_s")),
    (PLAN, ("stages", 0, "memory_bytes")),
    (PLAN, ("topology", "levels", 0, "bandwidth_bytes_per_s")),
    (TOPOLOGY, ("memory_bytes",)),
    (TOPOLOGY, ("levels", 0, "bandwidth_bytes_per_s")),
    (REPORT, ("samples_per_s",)),
    (REPORT, ("comparison", "stages", 0, "measured_compute_ms")),
]:
    for _raw in ("Infinity", "-Infinity", "1e999"):
        _file = "bad." + _source
        CASES.append(
            case(
                f"{_raw}-{_source}-{'/'.join(map(str, _path))}",
                _READERS[_source](_file),
                NON_FINITE,
                raw_value(_source, _file, _path, _raw),
            )
        )
# The same NaN profile through every command that reads a profile.
for _argv in (
    "export-pipedream bad.json -o g.txt",
    f"export {PLAN} --profile bad.json --format pipedream -o x.txt",
    f"simulate {PLAN} --profile bad.json",
):
    CASES.append(
        case(
            f"nan-profile-via-{_argv.split()[0]}",
            _argv,
            NON_FINITE,
            raw_value(PROFILE, "bad.json", ("layers", 1, "forward_ms"), "NaN"),
        )
    )
# The same NaN plan through every command that reads a plan.
for _argv in (
    "export bad.json --format deepspeed -o x.json",
    "simulate bad.json --csv e.csv",
    "run bad.json",
):
    CASES.append(
        case(
            f"nan-plan-via-{_argv.split()[0]}",
            _argv,
            NON_FINITE,
            raw_value(PLAN, "bad.json", ("stages", 0, "compute_s"), "NaN"),
        )
    )


# --- the checks ------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, Any]:
    """Every entry under ``folder`` (hidden ones too): its kind and, for files, its bytes."""
    entries: dict[str, Any] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            info = path.lstat()
            key = str(path.relative_to(folder))
            if stat.S_ISLNK(info.st_mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                entries[key] = ("file", path.read_bytes())
            else:
                entries[key] = ("other", stat.S_IFMT(info.st_mode))
    return entries


def _no_launch(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("plan run started ranks for an input it should have refused")


def _call(argv: tuple[str, ...]) -> int:
    try:
        return main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code or 0)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    for name, data in GOLDEN.items():
        (work / name).write_bytes(data)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import planner.commands.run as run_command

    monkeypatch.setattr(run_command, "launch_local", _no_launch)
    return work


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] if not c.argv[0].startswith("-") else "plan" for c in CASES}
    assert commands >= {
        "plan",
        "profile",
        "import-pipedream",
        "export-pipedream",
        "show",
        "export",
        "simulate",
        "run",
    }
    assert any("--calibrate" in c.argv for c in CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_refused_in_one_line_and_nothing_written(
    bad: Case, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if bad.setup is not None:
        bad.setup(folder)
    before = _snapshot(folder)
    status = _call(bad.argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert status == 2, (status, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("plan"), err
    assert "Traceback" not in err
    assert re.search(bad.expect, lines[0]), lines[0]
    assert _snapshot(folder) == before


# --- real processes: the exit status as a shell sees it --------------------------------------


def _plan_process(folder: Path, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planner.cli", *argv],
        cwd=folder,
        env={**os.environ, "MPLBACKEND": "Agg"},
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


@pytest.mark.parametrize(
    "argv",
    [
        f"--profile {PROFILE} --gpus 2 -o {PROFILE}",
        f"export-pipedream {PROFILE} -o {UNWRITABLE}/g.txt",
        "show /dev/zero",
        "show ff",
        f"run {PLAN} --report {PLAN}",
    ],
)
def test_subprocess_exit_status_is_2(folder: Path, argv: str) -> None:
    os.mkfifo(folder / "ff")
    before = _snapshot(folder)
    result = _plan_process(folder, *argv.split())
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert _snapshot(folder) == before


def test_closed_pipe_ends_quietly(folder: Path) -> None:
    """``plan show plan.json | head -0``: the reader is gone before the first write."""
    process = subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "show", PLAN],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    with contextlib.closing(process.stderr):
        err = process.stderr.read()
    assert process.wait(timeout=300) == 141
    assert err == ""


# --- names from files reach the terminal without control characters -------------------------


def test_control_characters_in_names_are_not_printed(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = "tiny\x1b]0;owned\x07\x1b[2J"
    replaced_profile(model=evil)(folder)
    plan = _doc(PLAN)
    plan["profile"]["sha256"] = hashlib.sha256((folder / PROFILE).read_bytes()).hexdigest()
    plan["profile"]["model"] = evil
    plan["stages"][0]["layers"] = [f"{name}" for name in plan["stages"][0]["layers"]]
    plan["baselines"][0]["note"] = "bad\x1b[31m note"
    (folder / PLAN).write_text(json.dumps(plan))
    for argv in (("show", PLAN), ("simulate", PLAN), ("export-pipedream", PROFILE, "-o", "g.txt")):
        assert _call(argv) == 0
        out, err = capsys.readouterr()
        assert "\x1b" not in out + err and "\x07" not in out + err, argv
        if argv[0] != "export-pipedream":
            assert "tiny?]0;owned??[2J" in out


# --- the folder itself is valid: every case fails for its own reason -------------------------


def test_the_valid_folder_is_accepted_by_every_command(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ("--profile", PROFILE, "--gpus", "2", "--topology", TOPOLOGY, "-o", "x.json"),
        ("show", PLAN),
        ("simulate", PLAN, "--csv", "e.csv"),
        ("export", PLAN, "--format", "pipedream", "-o", "x.txt"),
        ("export-pipedream", PROFILE, "-o", "g.txt"),
        ("import-pipedream", GRAPH, "--batch-size", "4", "-o", "g.json"),
        ("--calibrate", REPORT, "-o", "cal.json"),
    ):
        assert _call(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "calibrated from tiny.json: compute" in err
    assert (folder / "cal.profile.json").is_file() and (folder / "cal.json").is_file()


def test_calibrating_a_calibrated_run_records_both_scalings(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run of a calibrated plan scales relative to it; the profile records both, in order."""
    assert _call(("--calibrate", REPORT, "-o", "cal.json")) == 0
    first = json.loads((folder / "cal.profile.json").read_text())
    report = _doc(REPORT)
    report["plan"] = "cal.json"
    plan = json.loads((folder / "cal.json").read_text())
    report.update(
        schedule=plan["schedule"],
        minibatch_size=plan["minibatch_size"],
        microbatches=plan["microbatches"],
        world_size=1 + max(max(s["ranks"]) for s in plan["stages"]),
    )
    ranks = [r for s in plan["stages"] for r in s["ranks"]]
    report["ranks"] = [{**report["ranks"][0], "rank": r, "stage": 0} for r in ranks]
    report["stages"] = [{**report["stages"][0], "stage": 0, "ranks": ranks}]
    report["comparison"]["stages"] = report["comparison"]["stages"][:1]
    assert len(plan["stages"]) == 1  # the links' fitted latency makes data parallelism best
    (folder / "cal.report.json").write_text(json.dumps(report))
    assert _call(("--calibrate", "cal.report.json", "-o", "cal2.json")) == 0, (
        capsys.readouterr().err
    )
    second = json.loads((folder / "cal2.profile.json").read_text())
    assert second["calibration"].startswith("calibrated from cal.json: ")
    assert second["calibration"].endswith("; before that, " + first["calibration"])
    scale = (250.0 + 50.0) / 200.0  # (measured compute + the optimizer's 50 ms) / predicted
    assert second["layers"][0]["forward_ms"] == pytest.approx(
        first["layers"][0]["forward_ms"] * scale
    )


# --- seeded mutations: whatever a file holds, status 0 or 2, and a refusal is one line --------

_MUTANTS = [None, True, -1, 0, 1, 1000, 1.5, -0.5, "", "x", [], {}, [1], {"a": 1}, "1f1b"]


def _mutated(doc: Any, rng: Any) -> tuple[Any, tuple]:
    doc = json.loads(json.dumps(doc))
    paths: list[tuple] = []

    def walk(value: Any, path: tuple) -> None:
        paths.append(path)
        items = (
            value.items()
            if isinstance(value, dict)
            else enumerate(value)
            if isinstance(value, list)
            else ()
        )
        for key, item in items:
            walk(item, (*path, key))

    walk(doc, ())
    path = rng.choice(paths[1:])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(_MUTANTS)
    return doc, path


@pytest.mark.parametrize("seed", range(6))
def test_mutated_files_never_give_a_traceback(
    seed: int, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import random

    rng = random.Random(seed)
    readers = {
        PROFILE: ("--profile", "m.json", "--gpus", "2", "-o", "x.json"),
        PLAN: ("simulate", "m.json"),
        TOPOLOGY: ("--profile", PROFILE, "--gpus", "2", "--topology", "m.json", "-o", "x.json"),
        REPORT: ("--calibrate", "m.json", "-o", "x.json"),
    }
    for _ in range(15):
        source = rng.choice(sorted(readers))
        doc, path = _mutated(_doc(source), rng)
        (folder / "m.json").write_text(json.dumps(doc))
        status = _call(readers[source])
        err = capsys.readouterr().err
        assert status in (0, 2), (source, path, err)
        if status == 2:
            assert len(err.splitlines()) == 1 and "Traceback" not in err, (source, path, err)
