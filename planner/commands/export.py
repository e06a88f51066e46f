"""``plan export``: a plan in the form torch.distributed.pipelining, DeepSpeed or PipeDream take."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from planner._io import atomic_write_text
from planner.export import ExportFormat, export_plan
from planner.plan import load_plan_and_profile

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
    exported = export_plan(plan, profile, ExportFormat(args.format))
    out = Path(args.output)
    atomic_write_text(out, exported.text)
    written = [str(out)]
    for suffix, text in exported.companions.items():
        companion = out.with_name(out.stem + suffix)
        atomic_write_text(companion, text)
        written.append(str(companion))
    for note in exported.notes:
        print(f"note: {note}", file=sys.stderr)
    print("wrote " + ", ".join(written))
    return 0
