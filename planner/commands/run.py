"""``plan run PLAN.json``: train with a plan on local processes, one per rank.

Everything that can be wrong with the input (plan file, model, options) is checked here, in the
launching process, before any rank starts; such errors are :class:`planner.errors.PlannerError`s,
which the ``plan`` command prints as one line with exit status 2.

Example:
    plan run plan.json --steps 20 --lr 0.05
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from planner._io import printable
from planner.models.registry import check_trusted, is_builtin
from planner.plan import Plan
from planner.runtime.checkpoint import checkpoint_lock, resume_state
from planner.runtime.comm import Placement
from planner.runtime.config import Engine, RunConfig, add_run_arguments, resolve_backend
from planner.runtime.data import data_source
from planner.runtime.launch import launch_local
from planner.runtime.loops import condition_notes, training_notes
from planner.runtime.report import check_run_outputs
from planner.runtime.torch_engine import check_expressible
from planner.runtime.worker import load_spec, prepare

__all__ = ["add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``plan run``."""
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Check the plan against its model, start one process per rank, wait; the exit status.

    Raises:
        PlannerError: Bad options, an unreadable plan, or a plan that does not match its model.
    """
    config = RunConfig.from_args(args)
    plan = Plan.load(config.plan_path)
    check_run_outputs(config, plan)  # report and checkpoint folder writable, not inputs
    world = Placement(ranks=tuple(s.ranks for s in plan.stages)).world_size_needed
    backend = resolve_backend(config.backend, local_ranks=world)  # nccl without GPUs fails here
    config = config.with_threads(world)  # every rank of a local run shares this machine
    if config.engine is Engine.TORCH:  # refused once here, not once per rank
        check_expressible(plan, config)
    # a plan's model that is code runs only when trusted (--model REF or --trust-model)
    check_trusted(plan.profile.model, named=config.model, trust=config.trust_model)
    spec = load_spec(plan, seed=config.seed, search_cwd=not is_builtin(plan.profile.model))
    prep = prepare(plan, spec, rank=0, world_size=world)
    if config.engine is Engine.TORCH:  # tied weights across stages: known once the model is cut
        check_expressible(plan, config, shared=prep.shared)
    notes = training_notes(plan, config)  # bad optimizer options fail here
    notes += condition_notes(plan, config, backend=backend)
    data_source(
        spec,
        data=config.data,
        minibatch_size=plan.minibatch_size,
        seed=config.seed,
        input_shape=plan.profile.input_shape,
    )  # a bad --data fails here, not in a rank
    if config.resume:  # no checkpoint, or nothing left to run: say so before starting
        assert config.checkpoint_dir is not None
        resume_state(
            config.checkpoint_dir, rank=0, stage=None, replica=0, plan="", steps=config.steps
        )
    if config.log_every:
        print(
            f"plan run: {printable(plan.profile.model)}, {len(plan.stages)} stages on {world} processes, "
            f"schedule {plan.schedule}, minibatch {plan.minibatch_size} = {plan.microbatches} x "
            f"{plan.microbatch_size}, {config.steps} steps",
            flush=True,
        )
    for note in notes:
        print(f"plan run: {note}", flush=True)
    with (  # one run per checkpoint folder; released when this process ends, however
        checkpoint_lock(config.checkpoint_dir)
        if config.checkpoint_dir is not None
        else contextlib.nullcontext()
    ):
        result = launch_local(config, world_size=world)
    if result.status != 0:
        print(f"plan run: failed: {result.describe()}", file=sys.stderr, flush=True)
    return result.status


def main(argv: list[str] | None = None) -> int:
    """``python -m planner.commands.run PLAN.json ...``: ``plan run`` without the ``plan`` CLI."""
    from planner.errors import PlannerError

    parser = argparse.ArgumentParser(
        prog="plan run", description="train with a plan on local processes, one per rank"
    )
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except PlannerError as exc:
        print(f"plan run: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]  # `python -m` put the current folder first: no code from there unasked
    sys.exit(main())
