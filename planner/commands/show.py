"""``plan show``: print a plan's stage table again."""

from __future__ import annotations

import argparse

from planner.plan import Plan

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN.json", help="a plan written by `plan`")


def run(args: argparse.Namespace) -> int:
    print(Plan.load(args.plan).describe())
    return 0
