"""``plan import-pipedream``: PipeDream's graph.txt to a profile."""

from __future__ import annotations

import argparse

from planner._io import check_input_file, check_outputs, printable
from planner.commands._args import positive_int
from planner.errors import ProfileError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", metavar="GRAPH.txt", help="PipeDream profile (graph.txt)")
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="profile JSON to write"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="the batch size PipeDream profiled at (default: inferred where "
        "the graph allows, else required)",
    )
    parser.add_argument(
        "--model", default=None, help="model name to record (default: the folder name)"
    )


def run(args: argparse.Namespace) -> int:
    from planner.profile.pipedream import read_graph_txt

    check_input_file(args.graph, ProfileError, "graph.txt")
    outputs = check_outputs(
        [("-o", args.output)], inputs=[("graph.txt", args.graph)], error=ProfileError
    )
    profile = read_graph_txt(args.graph, batch_size=args.batch_size, model=args.model)
    profile.save(args.output)
    print(
        f"imported {len(profile.layers)} layers of {printable(profile.model)} "
        f"(batch {profile.batch_size}); {outputs.announce(args.output)}"
    )
    return 0
