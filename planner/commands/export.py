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
        help="file to write (pipedream also writes FILE's stem + .conf.json, torch-pipelining "
        "FILE's stem + .py with the split policy and + .csv with every rank's schedule actions)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="REF",
        help="the plan's model reference, to confirm you trust it when it is your code "
        "(torch-pipelining and deepspeed rebuild the model to name its modules)",
    )
    parser.add_argument(
        "--trust-model", action="store_true", help="run the plan's model code without --model"
    )


def run(args: argparse.Namespace) -> int:
    plan, profile = load_plan_and_profile(args.plan, args.profile)
    inputs = [
        ("plan", args.plan),
        ("plan's profile", find_profile_file(plan, args.plan, args.profile)),
    ]
    check_outputs([("-o", args.output)], inputs=inputs, error=PlanError)  # before any work
    fmt = ExportFormat(args.format)
    exported = export_plan(
        plan, profile, fmt, model=_model(plan, profile, fmt, args), plan_path=args.plan
    )
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


def _model(plan, profile, fmt: ExportFormat, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The plan's model, rebuilt for the exports that name its modules (None otherwise)."""
    if fmt is ExportFormat.PIPEDREAM or profile.source == "pipedream":
        return None
    from planner.models import load_model
    from planner.models.registry import check_trusted, is_builtin

    check_trusted(profile.model, named=args.model, trust=args.trust_model)
    return load_model(
        profile.model,
        batch_size=plan.microbatch_size,
        input_shape=profile.input_shape or None,
        dtype=profile.dtype,
        search_cwd=not is_builtin(profile.model),
    )
