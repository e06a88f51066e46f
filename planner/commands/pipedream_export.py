"""``plan export-pipedream``: a profile to PipeDream's graph.txt."""

from __future__ import annotations

import argparse

from planner._io import check_outputs, printable
from planner.errors import ProfileError
from planner.profile.format import Profile

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", metavar="PROFILE.json", help="a planner profile")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="graph.txt to write")


def run(args: argparse.Namespace) -> int:
    from planner.profile.pipedream import write_graph_txt

    outputs = check_outputs(
        [("-o", args.output)], inputs=[("profile", args.profile)], error=ProfileError
    )
    profile = Profile.load(args.profile)
    write_graph_txt(profile, args.output)
    print(
        f"{len(profile.layers)} layers of {printable(profile.model)}: "
        f"{outputs.announce(args.output)}"
    )
    return 0
