"""The ``plan`` command.

``plan --model resnet50 --gpus 8`` plans (profiling first when no shipped profile exists);
subcommands do one step each: ``plan profile``, ``plan import-pipedream``,
``plan export-pipedream``, ``plan show``, ``plan export``, ``plan simulate``, ``plan run``.

Errors the user can fix print one line on stderr and exit with status 2; nothing half-written
is left behind (every file is written to a temporary name and renamed), and outputs are checked
before any work (see :func:`planner._io.check_outputs`). A reader that closes the pipe early
(``plan show plan.json | head -1``) ends the command quietly with status 141, what a shell reports
for a process ended by SIGPIPE, so ``set -o pipefail`` scripts still see that output was cut.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from planner._io import printable
from planner.errors import PlannerError

__all__ = ["BROKEN_PIPE_STATUS", "main"]

BROKEN_PIPE_STATUS = 141
"""Exit status when stdout's reader went away: 128 + SIGPIPE, as a shell reports ``head``'s writer."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class _Command:
    help: str
    example: str
    module: str  # module with add_arguments(parser) and run(args) -> int


_COMMANDS: dict[str, _Command] = {
    "profile": _Command(
        "measure a model's per-layer costs and write a profile",
        "plan profile --model resnet50 --batch-size 32 -o profiles/resnet50.json",
        "planner.commands.profile",
    ),
    "import-pipedream": _Command(
        "convert PipeDream's graph.txt into a profile",
        "plan import-pipedream graph.txt -o profile.json",
        "planner.commands.pipedream_import",
    ),
    "export-pipedream": _Command(
        "convert a profile into PipeDream's graph.txt",
        "plan export-pipedream profile.json -o graph.txt",
        "planner.commands.pipedream_export",
    ),
    "show": _Command(
        "print a plan's stage table",
        "plan show plan.json",
        "planner.commands.show",
    ),
    "export": _Command(
        "write a plan in the form other systems take",
        "plan export plan.json --format deepspeed -o parts.json",
        "planner.commands.export",
    ),
    "simulate": _Command(
        "simulate a plan and draw its timeline",
        "plan simulate plan.json --png gantt.png",
        "planner.commands.simulate",
    ),
    "run": _Command(
        "train with a plan on local processes",
        "plan run plan.json --steps 50",
        "planner.commands.run",
    ),
}


def _build_subparser(name: str) -> tuple[_Parser, Callable[[argparse.Namespace], int]]:
    command = _COMMANDS[name]
    module = importlib.import_module(command.module)
    parser = _Parser(
        prog=f"plan {name}",
        description=command.help,
        epilog=f"example:\n  {command.example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module.run


def _main_parser() -> _Parser:
    from planner.commands import plan as plan_command

    commands = "\n".join(f"  plan {name:<17} {c.help}" for name, c in _COMMANDS.items())
    parser = _Parser(
        prog="plan",
        description=(
            "Plan pipeline-parallel training: profile (or reuse a shipped profile), choose stage "
            "boundaries and replication for the devices, print the plan and write it as JSON."
        ),
        epilog=(
            "examples:\n"
            "  plan --model resnet50 --gpus 8\n"
            "  plan --profile profiles/gpt2-small.json --gpus 16 --gpus-per-node 8 --schedule 1f1b -o plan.json\n"
            "  plan --calibrate plan.report.json            # re-plan from what `plan run` measured\n"
            f"\nsubcommands (plan SUBCOMMAND --help for each):\n{commands}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan_command.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``plan`` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except PlannerError as exc:
        # one line, whatever a file's names hold (newlines, terminal escapes)
        print(f"plan: error: {printable(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_STATUS


def _dispatch(args: list[str]) -> int:
    if args and args[0] in _COMMANDS:
        parser, run = _build_subparser(args[0])
        return run(parser.parse_args(args[1:]))
    from planner.commands import plan as plan_command

    return plan_command.run(_main_parser().parse_args(args))


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test harness: nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
