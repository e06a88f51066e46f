"""``python -m planner.runtime PLAN.json``: one rank of a run, under torchrun or ``plan run``.

Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the
environment. Exit status 0 on success, 2 on bad input (checked before joining the process
group; one line on stderr), 1 when the run fails (a lost peer, a timeout).

A plan's model that is not built in is code from a file: it runs only with ``--model REF`` (the
same reference) or ``--trust-model``, which ``plan run`` passes on to its ranks; the current
folder is searched for it only then (``python -m`` put it first on the import path: it is taken
off). Started by ``plan run``, the rank ends when the launcher does (see
:func:`planner.runtime.launch.follow_launcher`). Otherwise (torchrun) rank 0 holds the
checkpoint folder's lock.

Example:
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --master-addr 10.0.0.1 \\
        --master-port 29500 --rdzv-backend static -m planner.runtime plan.json --steps 50 \\
        --model mymodels:mlp
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run this process's rank; returns the exit status."""
    from planner.errors import PlannerError
    from planner.models.registry import check_trusted, is_builtin
    from planner.plan import Plan
    from planner.runtime.checkpoint import checkpoint_lock
    from planner.runtime.config import RunConfig, add_run_arguments
    from planner.runtime.launch import LAUNCHER_ENV
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
        model = plan.profile.model
        check_trusted(model, named=config.model, trust=config.trust_model)
        search_cwd = not is_builtin(model)  # trusted by now
        # plan run holds the folder's lock itself; under torchrun rank 0 does
        holds_lock = config.checkpoint_dir is not None and env.rank == 0
        holds_lock = holds_lock and LAUNCHER_ENV not in os.environ
        with (
            checkpoint_lock(config.checkpoint_dir)
            if holds_lock and config.checkpoint_dir is not None
            else contextlib.nullcontext()
        ):
            train(
                plan,
                lambda: load_spec(plan, seed=config.seed, search_cwd=search_cwd),
                config,
                env,
            )
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


def _entry() -> int:
    """The ``python -m`` entry: follow the launcher, take the current folder off the path, run."""
    from planner.runtime.launch import follow_launcher

    follow_launcher()
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]  # no module from the current folder runs unless the model is trusted
    return main()


if __name__ == "__main__":
    sys.exit(_entry())
