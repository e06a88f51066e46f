"""``plan export``: a plan in the form torch.distributed.pipelining, DeepSpeed or PipeDream take."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from planner._io import atomic_write_text, check_outputs, printable
from planner.errors import PlanError
from planner.export import ExportFormat, export_plan
from planner.plan import find_profile_file, load_plan_and_profile

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN.json", help="a plan written by `plan`")
    parser.add_argument(
        "--format", required=True, choices=[f.value for f in ExportFormat], help="target system"
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="FILE",
        help="the plan's profile (default: the path recorded in the plan)",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="file to write (pipedream also writes FILE's stem + .conf.json)",
    )


def run(args: argparse.Namespace) -> int:
    plan, profile = load_plan_and_profile(args.plan, args.profile)
    inputs = [
        ("plan", args.plan),
        ("plan's profile", find_profile_file(plan, args.plan, args.profile)),
    ]
    check_outputs([("-o", args.output)], inputs=inputs, error=PlanError)  # before any work
    exported = export_plan(plan, profile, ExportFormat(args.format))  # in memory only
    out = Path(args.output)
    files = {out: exported.text} | {
        out.with_name(out.stem + suffix): text for suffix, text in exported.companions.items()
    }
    outputs = check_outputs(
        [("-o", path) if path == out else ("-o (its companion)", path) for path in files],
        inputs=inputs,
        error=PlanError,
    )  # the companions too, now that their names are known, before anything is written
    for path, text in files.items():
        atomic_write_text(path, text)
    for note in exported.notes:
        print(f"note: {printable(note)}", file=sys.stderr)
    print(outputs.announce(*files))
    return 0
