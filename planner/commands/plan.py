"""``plan``: profile (or reuse a shipped profile), optimize, print and write the plan."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from planner._io import Outputs, check_outputs, printable
from planner.commands._args import positive_float, positive_int
from planner.commands.profile import add_profiling_arguments, measure, resolve_device
from planner.errors import PlanError, PlannerError, ProfileError
from planner.optimize.cost import PIPEDREAM_DEFAULT_MEMORY_BYTES
from planner.planning import PlanOptions, make_plan, planner_memory_note, shipped_profile
from planner.profile.format import Profile
from planner.schedules import RANK_SCHEDULES, OptimizerKind, Schedule
from planner.topology import (
    CPU_LOOPBACK,
    CPU_LOOPBACK_NAME,
    DEFAULT_BANDWIDTH_GBPS,
    DEFAULT_INTER_NODE_BANDWIDTH_GBPS,
    DEFAULT_MEMORY_GB,
    GIB,
    PRESETS,
    Topology,
    parse_bandwidth,
    with_loopback_links,
)

if TYPE_CHECKING:
    from planner.plan import Plan
    from planner.runtime.report import RunReport

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to plan (one of)")
    source = what.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        help="torchvision name, gpt2-small/-medium/-tiny, hf:<model_type> (hf:gpt2, hf:llama; "
        "--model-config sets fields) or package.module:factory; a shipped profile is used when "
        "one exists (--device v100: PipeDream's V100 profile)",
    )
    source.add_argument(
        "--profile", metavar="FILE", help="a profile JSON (plan profile, import-pipedream)"
    )
    source.add_argument(
        "--calibrate",
        metavar="REPORT.json",
        help="re-plan from what `plan run` measured: rescale the run's profile "
        "(compute) and topology (communication) to the report, then plan "
        "with the run's settings unless options say otherwise",
    )

    devices = parser.add_argument_group("devices")
    devices.add_argument("--gpus", type=positive_int, help="number of devices")
    devices.add_argument(
        "--gpus-per-node", type=positive_int, help="devices per server (two levels)"
    )
    devices.add_argument(
        "--topology",
        metavar="PRESET|FILE",
        help=f"a preset ({', '.join(sorted([*PRESETS, CPU_LOOPBACK_NAME]))}) or a topology JSON "
        "file; with a preset, --gpus counts all devices across its servers (cpu-loopback: "
        "CPU processes of this machine over gloo, the default for a CPU profile)",
    )
    devices.add_argument(
        "--bandwidth",
        type=parse_bandwidth,
        default=None,
        metavar="GB/s",
        help=f"link bandwidth inside a server (default {DEFAULT_BANDWIDTH_GBPS:g} GB/s; "
        "units: 25, 25GB/s, 100Gbit/s)",
    )
    devices.add_argument(
        "--inter-node-bandwidth",
        type=parse_bandwidth,
        default=None,
        metavar="GB/s",
        help=f"bandwidth across servers (default {DEFAULT_INTER_NODE_BANDWIDTH_GBPS:g} GB/s)",
    )
    devices.add_argument(
        "--memory-gb",
        type=positive_float,
        default=None,
        help=f"memory per device in GiB (default {DEFAULT_MEMORY_GB:g}; under --cost-model "
        "pipedream PipeDream's own default, 16e9 bytes)",
    )

    how = parser.add_argument_group("how to train")
    how.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="minibatch size: samples per optimizer step (default: the profile's batch "
        "size times the devices for 1f1b/gpipe, the profile's batch for pipedream)",
    )
    how.add_argument(
        "--schedule",
        choices=[*(s.value for s in Schedule), "auto"],
        default=None,
        help="pipeline schedule (default: 1f1b, synchronous with a flush); interleaved-1f1b, "
        "zb-h1 and zbv run one pipeline whose ranks hold several stages or split the backward; "
        "auto: the fastest of 1f1b and those three that fits, by simulation (the plan names the "
        "runner-up); pipedream is asynchronous (stale weights) and never chosen by auto",
    )
    how.add_argument(
        "--microbatches",
        type=_microbatches,
        default=None,
        metavar="M|auto",
        help="microbatches per minibatch (default for 1f1b/gpipe, and auto: try up to 6 "
        "divisors of the minibatch whose microbatch is within 1/4..4x the profiled batch, "
        "closest first, and keep the fastest; pipedream: the divisor whose microbatch is "
        "closest to the profiled batch)",
    )
    how.add_argument(
        "--optimizer",
        choices=[o.value for o in OptimizerKind],
        default="sgd",
        help="training optimizer, for memory (default: sgd)",
    )
    how.add_argument(
        "--recompute",
        action="store_true",
        help="recompute activations in backward instead of storing them",
    )

    solve = parser.add_argument_group("solver")
    solve.add_argument(
        "--solver", choices=("dp", "ilp"), default="dp", help="dynamic program or exact ILP"
    )
    solve.add_argument(
        "--straight", action="store_true", help="no replication: one device per stage"
    )
    solve.add_argument(
        "--cost-model",
        choices=("planner", "pipedream"),
        default="planner",
        help="planner's cost model, or PipeDream's optimizer's assumptions",
    )
    solve.add_argument("--no-memory-limit", action="store_true", help="ignore device memory")
    solve.add_argument(
        "--time-limit",
        type=positive_float,
        default=60.0,
        help="seconds the ILP may take (default 60)",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "-o", "--output", metavar="FILE", help="plan JSON to write (default: plan-MODEL-NGPUS.json)"
    )
    out.add_argument(
        "--json", action="store_true", help="print the plan JSON on stdout and nothing else"
    )
    out.add_argument("--png", metavar="FILE", help="draw the plan's simulated timeline to FILE")

    profiling = parser.add_argument_group("profiling (only when no profile exists for --model)")
    add_profiling_arguments(profiling)
    profiling.add_argument(
        "--profile-batch-size",
        type=positive_int,
        default=None,
        help="batch size to profile at (default: 1 sequence for the bundled GPTs, else 32, "
        "less if it does not fit in half of the free memory)",
    )


def _microbatches(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def _calibrated(
    args: argparse.Namespace, run: _Run, path: Path, outputs: Outputs
) -> tuple[Profile, Path, Topology]:
    """The profile and topology a run's report implies, with the run's settings as defaults."""
    from planner.runtime.calibrate import calibrate

    profile, topology = calibrate(run.profile, run.plan.topology, run.report, plan=run.plan)
    profile.save(path)
    print(f"{profile.calibration}; {outputs.announce(path)}", file=sys.stderr)
    args.schedule = args.schedule or str(run.plan.schedule)
    args.batch_size = args.batch_size or run.plan.minibatch_size
    args.microbatches = args.microbatches or run.plan.microbatches
    if args.gpus is None and args.topology is None:
        return profile, path, topology
    return profile, path, _topology(args)


@dataclass(frozen=True, kw_only=True)
class _Run:
    """A run to calibrate from: its report, and the plan and profile it ran."""

    report: RunReport
    plan: Plan
    plan_path: Path
    profile: Profile
    profile_path: Path


def _run_of(report_path: str) -> _Run:
    from planner.plan import find_profile_file, load_plan_and_profile
    from planner.runtime.calibrate import check_report_matches
    from planner.runtime.report import RunReport

    report = RunReport.load(report_path)
    plan_path = Path(report.plan)
    if not plan_path.is_file():
        plan_path = Path(report_path).parent / plan_path.name
    plan, profile = load_plan_and_profile(str(plan_path))
    check_report_matches(report, plan, profile, report_path=report_path)
    return _Run(
        report=report,
        plan=plan,
        plan_path=plan_path,
        profile=profile,
        profile_path=find_profile_file(plan, plan_path),
    )


def _check_outputs(
    args: argparse.Namespace, output: Path, profile_out: Path | None, run: _Run | None
) -> Outputs:
    """Refuse, before any work, outputs that are inputs or cannot be written."""
    outputs = [("-o", output)]
    if profile_out is not None:
        outputs.append(("-o (the profile written beside it)", profile_out))
    if args.png:
        outputs.append(("--png", Path(args.png)))
    inputs: list[tuple[str, str | Path]] = []
    if run is not None:
        inputs += [
            ("report", args.calibrate),
            ("run's plan", run.plan_path),
            ("run's profile", run.profile_path),
        ]
    elif profile_out is None:
        inputs.append(("profile", _profile_input(args)))
    if args.topology and args.topology not in (*PRESETS, CPU_LOOPBACK_NAME):
        inputs.append(("topology file", args.topology))
    return check_outputs(outputs, inputs=inputs, error=PlannerError)


def _profile_input(args: argparse.Namespace) -> Path:
    """The profile file ``plan`` will read; ``_will_profile(args)`` must be False."""
    if args.profile:
        return Path(args.profile)
    shipped = _shipped(args)
    assert shipped is not None
    return Path(shipped)


def _will_profile(args: argparse.Namespace) -> bool:
    """Whether ``--model`` must be profiled here (no usable shipped profile)."""
    if args.profile or args.calibrate:
        return False
    shipped = _shipped(args)
    return shipped is None or bool(args.leaf_modules) or args.input_shape is not None


def _topology(args: argparse.Namespace) -> Topology:
    if args.topology == CPU_LOOPBACK_NAME:  # measured links for any count: --gpus says how many
        if args.bandwidth:
            raise PlannerError(
                "--bandwidth does not combine with --topology cpu-loopback (its links are "
                "measured); give one of them"
            )
        return with_loopback_links(
            _topology(argparse.Namespace(**{**vars(args), "topology": None}))
        )
    if args.topology:
        if args.bandwidth or args.inter_node_bandwidth:
            raise PlannerError(
                "--bandwidth options do not combine with --topology; edit the topology file"
            )
        nodes = 1
        if args.topology in PRESETS and args.gpus:
            per_node = PRESETS[args.topology]["gpus_per_node"]
            if args.gpus % per_node:
                raise PlannerError(
                    f"--gpus {args.gpus} is not a multiple of {per_node}, the "
                    f"devices in one {args.topology} server"
                )
            nodes = args.gpus // per_node
        topology = Topology.resolve(args.topology, nodes)
        if args.memory_gb:
            topology = dataclasses.replace(topology, memory_bytes=args.memory_gb * 1024**3)
        return topology
    if args.gpus is None:
        raise PlannerError("say how many devices: --gpus N (or --topology PRESET|FILE)")
    return Topology.from_args(
        gpus=args.gpus,
        gpus_per_node=args.gpus_per_node,
        bandwidth_gbps=(args.bandwidth or DEFAULT_BANDWIDTH_GBPS * 1e9) / 1e9,
        inter_node_bandwidth_gbps=(
            args.inter_node_bandwidth or DEFAULT_INTER_NODE_BANDWIDTH_GBPS * 1e9
        )
        / 1e9,
        # PipeDream's optimizer defaults to 16e9 bytes, not 16 GiB: its numbers need its default
        memory_gb=args.memory_gb
        or (
            PIPEDREAM_DEFAULT_MEMORY_BYTES / 1024**3
            if args.cost_model == "pipedream"
            else DEFAULT_MEMORY_GB
        ),
    )


def _loopback_default(args: argparse.Namespace, profile: Profile) -> bool:
    """Whether the plan gets the ``cpu-loopback`` links: a CPU profile describes CPU processes
    of one machine talking over gloo on loopback, unless the user gave the links."""
    return profile.device == "cpu" and args.topology is None and args.bandwidth is None


def _loopback_line() -> str:
    """The plan summary's first line when the plan got the ``cpu-loopback`` links."""
    links = CPU_LOOPBACK
    ring = with_loopback_links(Topology.from_args(gpus=1)).levels[0]
    return (
        f"links: cpu-loopback preset (gloo on loopback between this machine's CPU processes, "
        f"measured: {links.latency_s * 1e6:.3g} us a message, "
        f"{links.bandwidth_bytes_per_s / 1e9:.3g} GB/s; "
        f"all-reduce {ring.ring_bandwidth_bytes_per_s / 1e9:.3g} GB/s + "
        f"{ring.ring_latency_s * 1e6:.3g} us a step; {links.op_overhead_s * 1e6:.3g} us of "
        "runtime per operation and the optimizer's step; "
        f"{links.process_bytes / GIB:.2g} GiB per process in each stage's memory); "
        "pass --bandwidth or --topology for GPUs"
    )


def _say_ignored(args: argparse.Namespace, why: str) -> None:
    """One line naming the profiling-only options given that do nothing, since ``why``."""
    given = [
        option
        for option, value, default in (
            ("--profile-batch-size", args.profile_batch_size, None),
            ("--threads", args.threads, None),
            ("--clock", args.clock, "auto"),
            ("--warmup", args.warmup, None),
            ("--reps", args.reps, None),
            # --device v100 chose the shipped profile itself: it did something
            (
                "--device",
                None if args.device == "v100" and not args.profile else args.device,
                None,
            ),
            ("--dtype", args.dtype, "float32"),
        )
        if value != default
    ]
    if given:
        print(
            f"{', '.join(given)} only matter when profiling and {why}; to measure with them, "
            "run `plan profile ... -o FILE` and plan with --profile FILE",
            file=sys.stderr,
        )


def _shipped(args: argparse.Namespace) -> Path | None:
    """The shipped profile ``plan`` uses for ``--model``: PipeDream's V100 one for --device v100,
    none for --device cuda (the local GPU is profiled; the shipped profiles are CPU or V100)."""
    device = resolve_device(getattr(args, "device", None))  # with a GPU here: cuda
    if device == "cuda":
        return None
    if device != "v100":
        return shipped_profile(args.model)
    from planner.profile.v100 import V100_MODELS

    found = shipped_profile(f"{args.model}-v100")
    if found is None:
        raise ProfileError(
            f"no V100 profile is shipped for {args.model} (PipeDream's: {', '.join(V100_MODELS)}); "
            f"measure your GPU instead: plan profile --model {args.model} --device cuda "
            f"--batch-size 32 -o {args.model}.json, then plan --profile {args.model}.json"
        )
    return found


def _shipped_line(path: Path, profile: Profile, model: str) -> str:
    """The first line of a plan from a shipped profile: which device the profile stands for."""
    measure = (
        f"for your GPUs, profile them: plan profile --model {model} --device cuda "
        f"--batch-size {profile.batch_size} -o {model}.json, then plan --profile {model}.json"
    )
    if profile.source == "pipedream-mapped":
        return (
            f"planning for NVIDIA V100 GPUs with PipeDream's V100 profile {path} ({profile.model}, "
            f"batch {profile.batch_size}, mapped onto its fx layers); {measure}"
        )
    line = (
        f"using the shipped profile {path} ({profile.model}, batch {profile.batch_size}, "
        f"measured on {profile.device}{', ' + profile.machine if profile.machine else ''})"
    )
    if profile.device == "cpu" and resolve_device(None) == "cpu":  # no usable GPU here
        v100 = shipped_profile(f"{model}-v100") is not None
        hint = " for V100 GPUs add --device v100 (PipeDream's profile);" if v100 else ""
        line += f"; this plan is for CPUs:{hint} {measure}"
    return line


def _planned_microbatch(args: argparse.Namespace) -> int | None:
    """The microbatch the plan will run when the options fix it (``--batch-size B --microbatches
    M``): profiled at that size, per-layer times need no extrapolation from another batch."""
    m = args.microbatches
    if args.batch_size and isinstance(m, int) and m > 0 and args.batch_size % m == 0:
        return int(args.batch_size // m)
    return None


def _profile(args: argparse.Namespace, path: Path | None, outputs: Outputs) -> tuple[Profile, Path]:
    if args.profile:
        _say_ignored(args, "--profile is given")
        return Profile.load(args.profile), Path(args.profile)
    shipped = _shipped(args)
    if path is None:
        assert shipped is not None
        profile = Profile.load(shipped)
        print(printable(_shipped_line(shipped, profile, args.model)), file=sys.stderr)
        _say_ignored(args, f"the shipped profile {shipped.name} is used")
        return profile, shipped
    from planner.models import load_model, model_names

    if ":" not in args.model and args.model not in model_names():
        load_model(args.model, batch_size=1)  # raises the error listing the closest names
    from planner.profile.measure import default_profile_batch

    batch = (
        args.profile_batch_size or _planned_microbatch(args) or default_profile_batch(args.model)
    )
    print(
        f"no shipped profile for {args.model}; profiling on "
        f"{resolve_device(args.device)} at batch {batch}",
        file=sys.stderr,
    )
    profile = measure(
        args,
        batch,
        ranks_on_host=args.gpus_per_node or args.gpus,  # as a rank of this plan would run
        fit_batch=args.profile_batch_size is None,
        batch_option="--profile-batch-size",
    )
    profile.save(path)
    print(f"{outputs.announce(path)} (the profile)", file=sys.stderr)
    return profile, path


def _check_rank_schedule_options(args: argparse.Namespace) -> None:
    """Options a rank schedule (or auto) cannot honour, refused before any work."""
    name = args.schedule
    if args.solver == "ilp":
        raise PlanError(
            f"--solver ilp plans pipedream, 1f1b and gpipe; {name} is planned by the DP and the "
            "simulator; drop --solver or use --schedule 1f1b"
        )
    if args.cost_model == "pipedream":
        raise PlanError(
            f"--cost-model pipedream has no {name} schedule (PipeDream's formulas know one "
            "pipeline schedule); drop --cost-model or use --schedule pipedream"
        )
    if name != "auto" and args.straight:
        print(f"note: --straight does nothing under {name}: its stages are never replicated")
    if name != "auto" and args.recompute:
        raise PlanError(
            f"schedule {name} does not recompute activations (torch's schedules do not); drop "
            "--recompute or use --schedule 1f1b"
        )


def run(args: argparse.Namespace) -> int:
    if args.schedule in {*(s.value for s in RANK_SCHEDULES), "auto"}:  # before any work
        _check_rank_schedule_options(args)
    if args.model and args.model_config is not None:
        # imported only when needed: planner.models.hf imports torch (seconds of start-up)
        from planner.models.hf import with_model_config

        args.model = with_model_config(args.model, args.model_config)
    run_ = None
    if args.calibrate:
        default = Path(args.calibrate).name.replace(".report.json", "") + ".calibrated.json"
        output = Path(default if args.output is None else args.output)
        run_ = _run_of(args.calibrate)
    else:
        topology = _topology(args)
        name = args.model or Path(args.profile).stem
        safe = name.split("{")[0].replace(":", "_").replace("/", "_")
        default = f"plan-{safe}-{topology.num_devices}gpus.json"
        output = Path(default if args.output is None else args.output)
    profile_out = (
        output.with_name(output.stem + ".profile.json")
        if run_ is not None or _will_profile(args)
        else None
    )
    outputs = _check_outputs(args, output, profile_out, run_)
    if run_ is not None:
        assert profile_out is not None
        profile, profile_path, topology = _calibrated(args, run_, profile_out, outputs)
    else:
        profile, profile_path = _profile(args, profile_out, outputs)
    if args.model and profile.source == "pipedream":
        raise ProfileError("a PipeDream profile cannot be rebuilt by --model; use --profile")
    if run_ is None and _loopback_default(args, profile):
        topology = with_loopback_links(topology)
        if not args.json:  # the JSON names its topology cpu-loopback and carries its links
            print(_loopback_line())
    options = PlanOptions(
        schedule=Schedule(
            Schedule.ONE_F_ONE_B if args.schedule in (None, "auto") else args.schedule
        ),
        auto_schedule=args.schedule == "auto",
        minibatch_size=args.batch_size,
        microbatches=None if args.microbatches == "auto" else args.microbatches,
        auto_microbatches=args.microbatches == "auto",
        optimizer=OptimizerKind(args.optimizer),
        solver=args.solver,
        straight=args.straight,
        recompute=args.recompute,
        cost_model=args.cost_model,
        memory_constraint=not args.no_memory_limit,
        time_limit_s=args.time_limit,
    )
    plan = make_plan(profile, profile_path, topology, options)
    plan.save(output)
    if args.png:
        from planner.planning import draw_plan

        draw_plan(plan, profile, args.png)
    written = outputs.announce(output, *([args.png] if args.png else []))
    note = planner_memory_note(plan, profile)  # --cost-model pipedream: the planner's memory too
    if args.json:
        print(plan.to_json())
        print(*([note] if note else []), written, sep="\n", file=sys.stderr)
    else:
        print(plan.describe())
        print(*([note] if note else []), f"\n{written}", sep="\n")
    return 0
