"""``python -m planner.runtime PLAN.json``: one rank of a run, under torchrun or ``plan run``.

Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the
environment. Exit status 0 on success, 2 on bad input (checked before joining the process
group; one line on stderr), 1 when the run fails (a lost peer, a timeout).

Example:
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --master-addr 10.0.0.1 \\
        --master-port 29500 --rdzv-backend static -m planner.runtime plan.json --steps 50
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run this process's rank; returns the exit status."""
    from planner.errors import PlannerError
    from planner.plan import Plan
    from planner.runtime.config import RunConfig, add_run_arguments
    from planner.runtime.worker import DistEnv, load_spec, train

    parser = argparse.ArgumentParser(
        prog="python -m planner.runtime", description="run one rank of a plan (under torchrun)"
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "?")
    try:
        config = RunConfig.from_args(args)
        env = DistEnv.from_environ()
        plan = Plan.load(config.plan_path)
        train(plan, lambda: load_spec(plan, seed=config.seed), config, env)
    except PlannerError as exc:
        print(f"planner.runtime: rank {rank}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a failed run: one line, the traceback on request
        if os.environ.get("PLANNER_TRACEBACK"):
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"planner.runtime: rank {rank}: {type(exc).__name__}: {first}"
            " (PLANNER_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
